"""`yunque chat`: multi-line messages (fences, backslash, pastes on a real terminal) and
`chat --url` on the default install (no `openai`, no `httpx`)."""

from __future__ import annotations

import io
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from serve_util import build_model_dir, make_server

from yunque.chat_input import MessageReader

ROOT = Path(__file__).resolve().parents[2]
PIPED = 'one line\nfirst \\\nsecond\n"""\nlog a\n\n  log b\n"""\n"""\n"""\n/reset\n'
PIPED_MESSAGES = ["one line", "first \nsecond", "log a\n\n  log b", "/reset"]  # the empty block is no message
# Each message read in a child process, printed as JSON: the reader on a real pipe or terminal.
READ_ALL = (
    "from yunque.chat_input import MessageReader\nimport json\nr = MessageReader(prompt='you> ')\n"
    "while (m := r.read()) is not None:\n    print('\\nMSG ' + json.dumps(m), flush=True)\n"
)


def _messages(out: str) -> list[str]:
    return [json.loads(x.split("MSG ", 1)[1]) for x in out.replace("\r", "").splitlines() if "MSG " in x]


def test_reader_joins_fenced_and_continued_lines():
    out = io.StringIO()
    r = MessageReader(io.StringIO(PIPED), out, prompt="> ")
    assert [r.read() for _ in PIPED_MESSAGES] + [r.read()] == PIPED_MESSAGES + [None]
    assert out.getvalue() == "> " * 6  # one prompt per message read (and one at the end), none per line
    assert MessageReader(io.StringIO('"""\nnever closed\n')).read() == "never closed"  # kept, not dropped


def test_reader_on_a_real_pipe():
    r = subprocess.run(
        [sys.executable, "-c", READ_ALL],
        input=PIPED + "a \\\n",
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert r.returncode == 0, r.stderr
    assert _messages(r.stdout) == PIPED_MESSAGES + ["a"]  # a backslash at end of input ends the message


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs a Linux pseudo-terminal")
def test_reader_on_a_terminal_takes_a_paste_as_one_message():
    import pty

    pid, fd = pty.fork()
    if pid == 0:  # the child: the reader on its own terminal
        os.environ.update(TERM="xterm", PYTHONPATH=str(ROOT))
        os.execv(sys.executable, [sys.executable, "-c", READ_ALL])
    out = b""

    def drain(until: float) -> None:
        nonlocal out
        while time.monotonic() < until:
            if select.select([fd], [], [], 0.05)[0]:
                try:
                    out += os.read(fd, 65536)
                except OSError:
                    return

    def wait_prompts(n: int) -> None:
        deadline = time.monotonic() + 60
        while out.count(b"you> ") < n and time.monotonic() < deadline:
            drain(time.monotonic() + 0.1)

    wait_prompts(1)
    os.write(fd, b"line 1\nline 2\n\nline 4\n")  # a paste of a terminal without bracketed paste: one burst
    wait_prompts(2)
    os.write(fd, b"typed\n")
    drain(time.monotonic() + 1.0)  # a second later: the next line is a message of its own
    os.write(fd, b"typed too\n")
    wait_prompts(4)
    os.write(fd, b"\x1b[200~pasted a\npasted b\x1b[201~")  # bracketed paste: sent on the Enter that follows
    drain(time.monotonic() + 0.3)
    os.write(fd, b"\r")
    wait_prompts(5)
    os.write(fd, b"\x04")  # Ctrl-D: end of input
    drain(time.monotonic() + 2)
    os.waitpid(pid, 0)
    got = _messages(out.decode())
    assert got[:3] == ["line 1\nline 2\n\nline 4", "typed", "typed too"], out
    try:
        import readline
    except ImportError:
        return
    if "GNU" in readline.__doc__ and readline._READLINE_LIBRARY_VERSION >= "8.1":  # bracketed paste on by default
        assert got[3:] == ["pasted a\npasted b"], out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chat_cli")
    model_dir = build_model_dir(tmp / "m")
    srv, key, app = make_server(model_dir, tmp)
    with srv:
        yield srv, key, tmp, model_dir


def test_chat_url_works_without_openai_or_httpx(server, monkeypatch, capsys):
    import yunque.serve.service as service
    from yunque.recipes.generate import chat_cmd

    srv, key, tmp, _ = server
    for name in ("openai", "httpx"):  # the default install has neither
        monkeypatch.setitem(sys.modules, name, None)
    for name in ("yunque.serve.client", "yunque.chat_input"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    seen = []
    real = service.apply_chat_template
    monkeypatch.setattr(
        service, "apply_chat_template", lambda tok, msgs, **kw: seen.append(msgs) or real(tok, msgs, **kw)
    )
    monkeypatch.setattr(sys, "stdin", io.StringIO('"""\nError: boom\n  at line 3\n"""\nthanks\n/exit\n'))
    assert chat_cmd(url=srv.url, api_key=key, max_new_tokens=4, temperature=0) == 0
    assert [m[-1]["content"] for m in seen] == ["Error: boom\n  at line 3", "thanks"]
    assert [m["role"] for m in seen[1]] == ["user", "assistant", "user"]  # the first exchange is kept
    assert capsys.readouterr().out.count("\n") == 2  # two streamed replies
    lines = [json.loads(x) for x in (tmp / "audit.jsonl").read_text().splitlines()]
    assert [x["outcome"] for x in lines if x["route"] == "chat"] == ["ok", "ok"]


def test_chat_url_reports_server_errors_in_band(server, monkeypatch, capsys):
    from yunque.errors import YunqueError
    from yunque.serve.client import chat_remote

    srv, key, _, _ = server
    out = io.StringIO()
    # over the server's max_tokens (64): a 400 for this turn, and the chat goes on
    assert chat_remote(srv.url, key, max_tokens=1000, stdin=io.StringIO("hi\n"), stdout=out) == 0
    assert out.getvalue().startswith("[error 400: max_tokens: at most 64")
    with pytest.raises(YunqueError, match="cannot reach"):
        chat_remote("http://127.0.0.1:9", key, stdin=io.StringIO(""), stdout=out)


def test_local_chat_reads_multiline_messages(server, monkeypatch, capsys):
    import yunque.recipes.generate as recipe

    model_dir = server[3]
    seen = []
    real = recipe._chat_ids
    monkeypatch.setattr(recipe, "_chat_ids", lambda tok, msgs: seen.append([dict(m) for m in msgs]) or real(tok, msgs))
    monkeypatch.setattr(sys, "stdin", io.StringIO('"""\nline 1\n\nline 2\n"""\nnext \\\npart\n\n'))
    assert recipe.chat_cmd(model=str(model_dir), max_new_tokens=3, temperature=0) == 0
    assert [m[-1]["content"] for m in seen] == ["line 1\n\nline 2", "next \npart"]
    out, err = capsys.readouterr()
    assert out.count("assistant> ") == 2 and out.count("you> ") == 3 and '"""' in err
