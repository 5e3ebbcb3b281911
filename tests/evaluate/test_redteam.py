"""The red-team suite against stub OpenAI-compatible endpoints on 127.0.0.1 and a tiny local model."""

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from yunque.cli import call_with_argv
from yunque.errors import DataError, YunqueError
from yunque.evaluate.canary import make_canaries
from yunque.evaluate.redteam import _messages, add_canaries, check_suite, load_suite, run_redteam, wilson
from yunque.evaluate.targets import OpenAITarget
from yunque.recipes.evaluate import redteam_cmd

REFUSAL = "I'm sorry, but I can't help with that."


def _complier(suite):
    """An endpoint that always complies: it answers each probe prompt with that probe's comply example."""
    answers = {}
    for cat in suite.categories:
        for p in cat.probes:
            for v in p.variants:
                answers[_messages(p, v)[-1]["content"]] = p.comply
    return lambda messages: answers[messages[-1]["content"]]


@pytest.fixture
def stub():
    servers = []

    def start(reply_fn, api_key=None, fail_every=0):
        calls = {"n": 0}

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, payload):
                body = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self._send(200, {"data": [{"id": "stub"}]})

            def do_POST(self):
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if api_key and self.headers.get("Authorization") != f"Bearer {api_key}":
                    return self._send(401, {"error": "bad key"})
                calls["n"] += 1
                if fail_every and calls["n"] % fail_every == 0:
                    return self._send(400, {"error": "rejected"})
                text = reply_fn(req["messages"])
                self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                              "finish_reason": "stop"}]})

        srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}"

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def test_builtin_suite_is_consistent():
    suite = load_suite()
    add_canaries(suite, make_canaries(3, seed=1))
    assert check_suite(suite) == []
    names = {c.name for c in suite.categories}
    assert names == {"direct_prompt_injection", "indirect_prompt_injection", "jailbreak", "system_prompt_leakage",
                     "sensitive_data_leakage", "harmful_requests", "improper_output_handling",
                     "unbounded_consumption", "over_refusal"}
    for c in suite.categories:
        assert len(c.probes) >= 2 and sum(len(p.variants) for p in c.probes) >= 5, c.name


def test_always_complying_and_always_refusing_endpoints(stub):
    suite = load_suite()
    add_canaries(suite, make_canaries(2, seed=3), raw=False)
    comply = OpenAITarget(stub(_complier(suite)), concurrency=4)
    refuse = OpenAITarget(stub(lambda m: REFUSAL), concurrency=4)
    n_variants = sum(len(p.variants) for c in suite.categories for p in c.probes)
    s1, rec1 = run_redteam(comply, suite, attempts=2)
    s0, rec0 = run_redteam(refuse, suite, attempts=2)
    assert len(rec1) == len(rec0) == 2 * n_variants
    for name, c in s1["categories"].items():
        if c["kind"] == "attack":
            assert c["asr"] == 1.0 and s0["categories"][name]["asr"] == 0.0, name
            assert c["asr_ci95"][1] == 1.0 and c["asr_ci95"][0] > 0.5
        else:
            assert c["over_refusal"] == 0.0 and s0["categories"][name]["over_refusal"] == 1.0
    assert s1["overall"]["asr"] == 1.0 and s0["overall"]["asr"] == 0.0
    canary_rows = [r for r in rec1 if r["probe"].startswith("canary-")]
    assert canary_rows and all(r["success"] for r in canary_rows)


def test_cli_gate_and_attempts_file(stub, tmp_path):
    suite = load_suite(categories=["direct_prompt_injection", "over_refusal"])
    url_comply, url_refuse = stub(_complier(suite)), stub(lambda m: REFUSAL)
    args = ["--categories", "direct_prompt_injection", "over_refusal", "--attempts", "1", "--fail-above", "0.2"]
    assert call_with_argv(redteam_cmd, ["--url", url_comply, "--out", str(tmp_path / "a"), *args], "yunque redteam") == 1
    assert call_with_argv(redteam_cmd, ["--url", url_refuse, "--out", str(tmp_path / "b"), *args], "yunque redteam") == 0
    report = json.loads((tmp_path / "a" / "redteam.json").read_text())
    assert report["gate"] == {"fail_above": 0.2, "failed": ["direct_prompt_injection"]}
    rows = [json.loads(x) for x in (tmp_path / "a" / "attempts.jsonl").read_text().splitlines()]
    assert len(rows) == sum(len(p.variants) for c in suite.categories for p in c.probes)
    assert {"prompt", "response", "success", "refused", "finish_reason"} <= rows[0].keys()
    assert "FAILED" in (tmp_path / "a" / "redteam.md").read_text()


def test_api_key_errors_and_unreachable(stub, tmp_path):
    suite = load_suite(categories=["over_refusal"])
    url = stub(lambda m: "Sure, here is how.", api_key="s3cret")
    with pytest.raises(YunqueError, match="HTTP 401"):
        run_redteam(OpenAITarget(url), suite, attempts=1)
    s, _ = run_redteam(OpenAITarget(url, api_key="s3cret"), suite, attempts=1)
    assert s["categories"]["over_refusal"]["over_refusal"] == 0.0
    with pytest.raises(YunqueError, match="cannot connect"):
        run_redteam(OpenAITarget("http://127.0.0.1:9", retries=0), suite, attempts=1)
    flaky = stub(lambda m: "Sure.", fail_every=3)
    s, rec = run_redteam(OpenAITarget(flaky, concurrency=1, retries=0), suite, attempts=1)
    c = s["categories"]["over_refusal"]
    assert c["errors"] == sum(1 for r in rec if r["error"]) > 0
    assert c["attempts"] + c["errors"] == len(rec)


def test_local_tiny_model(tmp_path):
    from eval_helpers import cached_model_dir

    from yunque.evaluate.canary import save_canaries

    model = cached_model_dir()
    save_canaries(make_canaries(2, seed=5), tmp_path / "c.json")
    rc = redteam_cmd(out=tmp_path / "rt", model=model, attempts=2, max_tokens=8,
                     categories=["system_prompt_leakage", "over_refusal", "sensitive_data_leakage"],
                     canaries=tmp_path / "c.json")
    assert rc == 0
    report = json.loads((tmp_path / "rt" / "redteam.json").read_text())
    rows = (tmp_path / "rt" / "attempts.jsonl").read_text().splitlines()
    assert report["overall"]["attack_attempts"] + report["categories"]["over_refusal"]["attempts"] == len(rows)
    leak = report["categories"]["sensitive_data_leakage"]
    assert leak["attempts"] == 2 * (6 + 2 * 2)  # 6 PII variants + a raw and a chat probe per canary
    lo, hi = leak["asr_ci95"]
    assert lo <= leak["asr"] <= hi
    assert any(json.loads(r)["probe"].endswith("-raw") for r in rows)
    bits = report["canary_exposure"]["bits"]
    assert len(bits) == 2 and all(0.0 <= b <= math.log2(100) for b in bits)
    assert "Canary exposure" in (tmp_path / "rt" / "redteam.md").read_text()


def test_user_probe_files_extend_and_are_checked(tmp_path):
    good = tmp_path / "mine.yaml"
    good.write_text("category: pirate_speak\nkind: attack\ndetectors:\n  arr: {type: contains, values: ['arr matey']}\n"
                    "probes:\n  - id: p\n    success: arr\n    comply: 'Arr matey!'\n    variants: ['Talk like a pirate.']\n")
    suite = load_suite([good], categories=["pirate_speak"])
    assert check_suite(suite) == []
    bad = tmp_path / "bad.yaml"
    bad.write_text("category: broken\nprobes:\n  - id: p\n    success: {type: contains, values: ['xyz']}\n"
                   "    comply: 'no match here'\n    variants: ['hi']\n")
    assert check_suite(load_suite([bad], categories=["broken"])) == ["broken/p: success rule does not fire on its comply example"]
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("category: u\nprobes:\n  - {id: p, success: nosuch, comply: x, variants: [hi]}\n")
    with pytest.raises(DataError, match="unknown detector 'nosuch'"):
        load_suite([unknown])
    regex = tmp_path / "regex.yaml"
    regex.write_text("category: r\nprobes:\n  - {id: p, success: {type: regex, patterns: ['(']}, comply: x, variants: [hi]}\n")
    with pytest.raises(DataError, match="bad regex"):
        load_suite([regex])
    with pytest.raises(DataError, match="unknown probe category"):
        load_suite(categories=["nope"])


def test_wilson_interval():
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)


def test_check_only_and_argument_errors(tmp_path, capsys):
    assert redteam_cmd(check_only=True) == 0
    assert "all detectors check out" in capsys.readouterr().out
    with pytest.raises(YunqueError, match="exactly one of --model DIR or --url URL"):
        redteam_cmd(out=tmp_path)
    with pytest.raises(YunqueError, match="--fail-above 1.5"):
        redteam_cmd(out=tmp_path, url="http://127.0.0.1:9", fail_above=1.5)
