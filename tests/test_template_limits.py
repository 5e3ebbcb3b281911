"""Untrusted chat templates are bounded in time and size (issue 24 item 7): loops that never end and
expressions that would build gigabytes end in one clear error, quickly and without the memory."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import pytest

from yunque.errors import YunqueError
from yunque.jinja_sandbox import render_template

VARS = {"messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": True}

BOMBS = {
    "repeat": "{{ 'x' * 10**9 }}",
    "repeat literal": "{{ 'x' * 1000000000 }}",
    "list repeat": "{{ [1, 2] * 1000000000 }}",
    "power": "{{ 2 ** 100000000 }}",
    "squaring": "{% set ns = namespace(n=3) %}{% for i in range(40) %}{% set ns.n = ns.n * ns.n %}{% endfor %}{{ ns.n }}",  # noqa: E501
    "doubling ~": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",  # noqa: E501
    "doubling +": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",  # noqa: E501
    "nested literals": "{% set a = 'x' * 4000 %}{% set b = [a,a,a,a,a,a,a,a,a,a] %}{% set c = [b,b,b,b,b,b,b,b,b,b] %}"
    "{% set d = [c,c,c,c,c,c,c,c,c,c] %}{% set e = {'k': [d,d,d,d,d,d,d,d,d,d]} %}{{ e|string|length }}",
    "center filter": "{{ 'x'|center(1000000000) }}",
    "center method": "{{ 'x'.center(1000000000) }}",
    "ljust method": "{{ 'x'.ljust(1000000000) }}",
    "format filter": "{{ '%1000000000s'|format('x') }}",
    "printf": "{{ '%1000000000s' % 'x' }}",
    "star width": "{{ '%*s' % (1000000000, 'x') }}",
    "str.format": "{{ '{:>1000000000}'.format('x') }}",
    "join": "{% set b = 'x' * 4000000 %}{{ [b] * 1 + [b] }}",
    "join filter": "{% set b = 'x' * 3000000 %}{% set l = [b] %}{{ (l + l)|join }}",
    "replace": "{{ ('x' * 100000)|replace('x', 'y' * 1000) }}",
    "indent": "{{ ('\\n' * 10000)|indent(1000000, blank=True) }}",
    "batch": "{{ [1]|batch(1000000000, 'x')|list|length }}",
    "slice": "{{ range(3)|slice(1000000000)|list|length }}",
    "fromkeys": "{% set b = 'x' * 4000000 %}{{ dict.fromkeys(range(1000), b) }}",
    "namespace copies": "{% set ns = namespace(x='x' * 4000000) %}{{ [ns] * 10 }}",
    "tojson indent": "{{ messages|tojson(indent=1000000) }}",
    "map then join": "{% set b = 'x' * 1000000 %}{{ ''.join(range(100000)|map('replace', '', b)) }}",
    "map then list": "{% set b = 'x' * 1000000 %}{{ range(100000)|map('replace', '', b)|list|length }}",
    "output": "{% for i in range(99999) %}{% for j in range(99999) %}{{ 'x' * 1000 }}{% endfor %}{% endfor %}",
}


@pytest.mark.parametrize("name", BOMBS)
def test_size_bombs_are_refused_before_they_are_built(name):
    t0 = time.monotonic()
    with pytest.raises(YunqueError, match="exceeds its size limit") as e:
        render_template(BOMBS[name], VARS)
    assert time.monotonic() - t0 < 2.5, name  # refused up front, not after building (or timing out)
    assert "\n" not in str(e.value) and str(e.value).startswith("chat template")


def test_bombs_stay_within_memory():
    """All of them in one process capped at 1 GiB of address space: none gets near it."""
    code = textwrap.dedent(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        from yunque.jinja_sandbox import render_template
        from yunque.errors import YunqueError
        for src in {list(BOMBS.values())!r}:
            try:
                render_template(src, {VARS!r})
            except YunqueError:
                pass
            else:
                raise SystemExit("rendered: " + src)
        # VmHWM: this process's own peak (ru_maxrss also counts the parent it was forked from)
        hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")]
        print("ok", hwm[0].split()[1] if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-2000:]
    assert int(r.stdout.split()[1]) < 600_000  # KiB


@pytest.mark.parametrize(
    "src",
    [
        "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
        "{% set r = range(99999)|list %}{% for i in r %}{% for j in r %}{% endfor %}{% endfor %}",
        "{% generation %}{% for i in range(99999) %}{% for j in range(99999) %}x{% endfor %}{% endfor %}{% endgeneration %}",  # noqa: E501
        "{% macro f(n) %}{% for i in range(99999) %}{{ i if false }}{% endfor %}{{ f(n) if n > 0 }}{% endmacro %}{{ f(1) }}{{ f(1) }}"  # noqa: E501
        "{% for i in range(99999) %}{{ f(1) }}{% endfor %}",
    ],
)
def test_loops_that_never_end_are_stopped(monkeypatch, src):
    from yunque import jinja_limits

    monkeypatch.setattr(jinja_limits, "RENDER_SECONDS", 0.5)
    t0 = time.monotonic()
    with pytest.raises(YunqueError, match=r"did not finish within 0.5 s"):
        render_template(src, VARS)
    assert time.monotonic() - t0 < 5
    # the thread is clean afterwards: a normal render works and no stray timeout arrives later
    assert render_template("{{ messages[0]['content'] }}", VARS) == "hi"
    time.sleep(0.7)
    assert render_template("{{ messages[0]['content'] }}", VARS) == "hi"


def test_timeout_in_other_threads_and_no_false_alarms(monkeypatch):
    from yunque import jinja_limits

    monkeypatch.setattr(jinja_limits, "RENDER_SECONDS", 0.5)
    results = {}

    def run(key, src):
        try:
            results[key] = render_template(src, VARS)
        except YunqueError as e:
            results[key] = e

    slow = "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"
    threads = [threading.Thread(target=run, args=("slow", slow))]
    threads += [
        threading.Thread(target=run, args=(f"fast{i}", "{% for m in messages %}{{ m.content }}{% endfor %}"))
        for i in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert isinstance(results["slow"], YunqueError) and "did not finish" in str(results["slow"])
    assert all(results[f"fast{i}"] == "hi" for i in range(8))


def test_recursion_is_one_error():
    with pytest.raises(YunqueError, match="recurses too deeply"):
        render_template("{% macro f(x) %}{{ f(x) }}{% endmacro %}{{ f(1) }}", VARS)


def test_ordinary_templates_are_unaffected():
    src = (
        "{% set ns = namespace(sys='') %}{% for m in messages %}{% set content = '<|' + m['role'] + '|>' ~ m['content'] | trim %}"  # noqa: E501
        "{{ content }}{{ '%s!' % loop.index }}{{ [1, 2] * 2 }}{{ {'a': 1} | tojson(indent=2) }}{% endfor %}"
        "{{ 'x'.center(5) }}{{ ['a', 'b'] | join(', ') }}{{ 2 ** 10 }}"
    )
    assert render_template(src, VARS) == '<|user|>hi1![1, 2, 1, 2]{\n  "a": 1\n}  x  a, b1024'
