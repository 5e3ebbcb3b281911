"""The web page's server side without a browser: public static files with a strict CSP and the
other security headers, nothing inline or third-party in them, the JSON routes behind the key,
`--ui off`, the model card's hash check (and what it refuses to read), the runs reader."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from webui_util import build, make_runs, serve_config

from yunque.serve.auth import create_key
from yunque.serve.webui import CSP

UI = Path(__file__).resolve().parents[2] / "yunque" / "serve" / "ui"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return make_runs(tmp_path_factory.getbasetemp() / "webui")


@pytest.fixture(scope="module")
def served(runs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("webui_api")
    cfg = serve_config(tmp)
    key = create_key(tmp / "keys.json", "tester")
    with TestClient(build(runs / "run-a" / "model", cfg, runs)) as client:
        yield client, {"Authorization": f"Bearer {key}"}


def test_page_is_public_and_locked_down(served):
    client, _ = served
    r = client.get("/ui/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert csp == CSP
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'none'" and directives["script-src"] == "'self'"
    assert directives["connect-src"] == "'self'" and directives["frame-ancestors"] == "'none'"
    assert "unsafe" not in csp and "http" not in csp and "*" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "no-referrer"
    assert '<meta name="yunque-auth" content="on">' in r.text and '<meta name="yunque-runs" content="on">' in r.text
    for name, kind in (("main.js", "text/javascript"), ("app.css", "text/css"), ("icon.svg", "image/svg+xml")):
        f = client.get(f"/ui/{name}")
        assert f.status_code == 200 and f.headers["content-type"].startswith(kind), name
        assert f.headers["content-security-policy"] == CSP and f.headers["x-content-type-options"] == "nosniff"
    r = client.get("/ui", follow_redirects=False)
    assert r.status_code == 308 and r.headers["location"] == "/ui/"
    for missing in ("/ui/nope.js", "/ui/..%2Fkeys.json", "/ui/sub/main.js", "/ui/%2E%2E/app.py"):
        r = client.get(missing)  # nothing but the shipped files (401: the client normalised the path away from /ui)
        assert r.status_code in (401, 404) and r.json()["error"]["code"] in ("not_found", "invalid_api_key"), missing
    assert client.get("/ui/%2E%2E/yunque/card").status_code in (401, 404)  # the public prefix opens no other route


def test_page_files_have_nothing_inline_nothing_third_party_and_no_html_sinks():
    files = {p.name: p.read_text(encoding="utf-8") for p in UI.iterdir()}
    assert {"index.html", "main.js", "api.js", "chat.js", "card.js", "runs.js", "health.js", "chart.js"} <= set(files)
    html = files["index.html"]
    scripts = re.findall(r"<script\b[^>]*>(.*?)</script>", html, re.S)
    assert scripts and all(s.strip() == "" for s in scripts)  # src= only
    assert not re.search(r"\son[a-z]+\s*=", html, re.I)  # no inline event handlers
    assert not re.search(r"\sstyle\s*=", html, re.I) and "<style" not in html
    for name, text in files.items():
        # the SVG namespace is a name, not a fetch
        urls = [u for u in re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}", text) if "www.w3.org" not in u]
        assert not urls, (name, urls)
        if name.endswith(".js"):
            for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "Function("):
                assert sink not in text, (name, sink)
            assert "localStorage" not in text, name  # the key lives in sessionStorage only


def test_json_routes_need_the_key(served):
    client, auth = served
    for path in ("/yunque/card", "/yunque/card/verify", "/yunque/status", "/yunque/runs", "/yunque/runs/run-a"):
        assert client.get(path).status_code == 401, path
        bad = client.get(path, headers={"Authorization": "Bearer yq-" + "x" * 43})
        assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key", path
        assert client.get(path, headers=auth).status_code == 200, path
    # the key in a URL is not a key
    assert client.get("/yunque/card?api_key=" + auth["Authorization"][7:]).status_code == 401


def test_model_card_describes_the_model_and_its_training_run(served, runs):
    from yunque.formats.hf import read_config
    from yunque.formats.model_limits import parameter_count

    client, auth = served
    card = client.get("/yunque/card", headers=auth).json()
    cfg = read_config(runs / "run-a" / "model")
    assert card["architecture"] == "LlamaForCausalLM" and card["parameters"] == parameter_count(cfg)
    assert card["layers"] == 1 and list(card["weights_dtype"]) == ["float32"]
    assert card["quantization"] is None and card["adapter"] is None and card["serving_dtype"] == "float32"
    [run] = card["runs"]
    recorded = json.loads((runs / "run-a" / "run.json").read_text())
    assert run["of"] == "model" and run["run_json"] == "run-a/run.json" and run["method"] == "pretrain"
    assert run["steps"] == 12 and run["config"] == recorded["config"]
    assert run["files_sha256"]["model.safetensors"] == recorded["files_sha256"]["model/model.safetensors"]
    v = client.get("/yunque/card/verify", headers=auth).json()
    assert v["verdict"] == "verified"
    assert {f["file"] for f in v["files"]} == set(run["files_sha256"]) and all(f["status"] == "ok" for f in v["files"])


def test_hash_check_catches_changed_missing_and_unrecorded_files(runs, tmp_path):
    from yunque.formats.hf import load_model
    from yunque.serve.card import ModelCard

    run = tmp_path / "run"
    shutil.copytree(runs / "run-a", run, ignore=shutil.ignore_patterns("checkpoints"))
    model_dir = run / "model"
    card = ModelCard(load_model(model_dir), "m", model_dir, None, "float32")
    assert card.verify()["verdict"] == "verified"
    weights = model_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    v = card.verify()
    assert v["verdict"] == "mismatch"
    assert {f["file"]: f["status"] for f in v["files"]}["model.safetensors"] == "mismatch"
    weights.unlink()
    assert {f["file"]: f["status"] for f in card.verify()["files"]}["model.safetensors"] == "missing"
    # weights the record does not name are never vouched for
    shutil.copy(runs / "run-a" / "model" / "model.safetensors", weights)
    shutil.copy(weights, model_dir / "model-extra.safetensors")
    v = card.verify()
    assert v["verdict"] == "unrecorded"
    assert {f["file"]: f["status"] for f in v["files"]}["model-extra.safetensors"] == "unrecorded"


def test_card_reads_no_file_outside_the_run_a_record_names(runs, tmp_path):
    from yunque.formats.hf import load_model
    from yunque.serve.card import ModelCard, find_record

    run = tmp_path / "run"
    shutil.copytree(runs / "run-a", run, ignore=shutil.ignore_patterns("checkpoints"))
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours\n")
    record = json.loads((run / "run.json").read_text())
    record["files_sha256"] = {"../secret.txt": "0" * 64, str(secret): "0" * 64, "model/../../secret.txt": "0" * 64}
    (run / "run.json").write_text(json.dumps(record))
    assert find_record(run / "model") is None
    card = ModelCard(load_model(run / "model"), "m", run / "model", None, "float32")
    assert card.facts()["runs"] == []
    v = card.verify()
    assert v["verdict"] == "unrecorded" and [f["file"] for f in v["files"]] == ["model.safetensors"]


def test_status_shows_the_engine_and_the_callers_rate_limit(served, tmp_path):
    client, _ = served
    keys = Path(client.app.app.state.service.cfg.auth.keys_file)
    auth = {"Authorization": "Bearer " + create_key(keys, "slow", rpm=2)}  # refills 1/30 of a request per second
    before = client.get("/yunque/status", headers=auth).json()
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0}
    assert client.post("/v1/chat/completions", json=body, headers=auth).status_code == 200
    s = client.get("/yunque/status", headers=auth).json()
    assert s["key"] == "slow" and s["engine"]["status"] == "ok" and s["max_batch"] == 4
    assert s["completion_tokens"] >= before["completion_tokens"] + 1 and s["running"] == 0 and s["queue_depth"] == 0
    r = s["rate_limit"]
    assert before["rate_limit"]["requests"] == {"limit": 2, "remaining": 2, "reset_s": 0.0}  # reading took nothing
    assert r["requests"]["limit"] == 2 and r["requests"]["remaining"] == 1 and 0 < r["requests"]["reset_s"] <= 30
    assert r["tokens"]["limit"] == 60_000


def test_runs_routes(served, runs):
    client, auth = served
    listing = client.get("/yunque/runs", headers=auth).json()
    assert [r["name"] for r in listing["runs"]] == ["run-a", "run-b"]
    assert listing["runs"][0]["method"] == "pretrain" and listing["runs"][0]["steps"] == 12
    a = client.get("/yunque/runs/run-a", headers=auth).json()
    m = a["metrics"]
    assert m["train"]["step"] == list(range(1, 13)) and m["points"] == 12 and m["skipped_lines"] == 0
    assert all(isinstance(x, float) for x in m["train"]["loss"] + m["train"]["lr"])
    assert m["eval"]["step"][:3] == [4, 8, 12] and len(m["eval"]["val_loss"]) == len(m["eval"]["step"])
    assert a["run"]["method"] == "pretrain" and a["run"]["steps"] == 12
    [ev] = a["evals"]
    assert ev["file"] == "eval/eval.json" and ev["data"] == "test.jsonl"
    assert ev["models"] == [
        {"name": "model", "examples": 40, "metrics": {"exact_match": 62.5, "rougeL": 71.25, "perplexity": 3.18}}
    ]
    [rt] = a["redteam"]
    assert rt["file"] == "redteam/redteam.json" and rt["overall"]["asr"] == 0.15 and rt["gate"]["failed"] == []
    assert [c["key"] for c in rt["categories"]] == ["prompt_injection", "benign"]
    b = client.get("/yunque/runs/run-b", headers=auth).json()
    assert b["metrics"]["points"] == 8 and b["evals"] == [] and b["redteam"] == []
    for name in ("nope", "..", "run-a%2F..%2F..", "%2e%2e"):
        assert client.get(f"/yunque/runs/{name}", headers=auth).status_code == 404, name


def test_metrics_reader_skips_bad_lines_and_thins_long_runs(tmp_path):
    from yunque.serve.runs import MAX_POINTS, read_metrics

    rows = [json.dumps({"step": i, "kind": "train", "loss": 10 / i, "lr": 1e-3}) for i in range(1, 5001)]
    rows += [
        "not json",
        "[1, 2]",
        json.dumps({"kind": "train", "loss": 1}),
        '{"step": 3, "kind": "train", "loss": NaN}',
    ]
    rows += [json.dumps({"step": 5000, "kind": "eval", "val_loss": 1.5, "val_ppl": "x"})]
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    m = read_metrics(tmp_path / "metrics.jsonl")
    assert m["points"] == 5000 and len(m["train"]["step"]) == MAX_POINTS
    assert m["train"]["step"][0] == 1 and m["train"]["step"][-1] == 5000
    assert m["skipped_lines"] == 3  # the NaN-loss row is a row, just not a point
    assert m["eval"] == {"step": [5000], "val_loss": [1.5]}


def test_without_a_runs_directory_the_runs_routes_say_how_to_get_one(runs, tmp_path):
    cfg = serve_config(tmp_path)
    key = create_key(tmp_path / "keys.json", "tester")
    with TestClient(build(runs / "run-b" / "model", cfg)) as client:
        r = client.get("/yunque/runs", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 404 and "--runs DIR" in r.json()["error"]["message"]
        assert '<meta name="yunque-runs" content="off">' in client.get("/ui/").text


def test_ui_off_removes_the_routes(runs, tmp_path):
    cfg = serve_config(tmp_path)
    key = create_key(tmp_path / "keys.json", "tester")
    auth = {"Authorization": f"Bearer {key}"}
    with TestClient(build(runs / "run-b" / "model", cfg, runs, ui=False)) as client:
        assert client.get("/ui/").status_code == 401  # no longer public: an unknown path like any other
        for path in ("/ui/", "/ui/main.js", "/yunque/card", "/yunque/status", "/yunque/runs"):
            assert client.get(path, headers=auth).status_code == 404, path
        assert client.get("/v1/models", headers=auth).status_code == 200


def test_auth_off_page_says_so(runs, tmp_path):
    cfg = serve_config(tmp_path, auth={"required": False})
    with TestClient(build(runs / "run-b" / "model", cfg)) as client:
        assert '<meta name="yunque-auth" content="off">' in client.get("/ui/").text
        # no Authorization header at all: anonymous (it used to be a 401 even with auth off)
        assert client.get("/v1/models").status_code == 200
        assert client.get("/yunque/status").json()["key"] == "anonymous"


def test_serve_cmd_checks_ui_flags_before_loading(tmp_path):
    from yunque.errors import YunqueError
    from yunque.recipes.serve import serve_cmd

    with pytest.raises(YunqueError, match="--ui off"):
        serve_cmd(model=str(tmp_path / "no-model"), runs=str(tmp_path), ui="off")
    with pytest.raises(YunqueError, match="not a directory"):
        serve_cmd(model=str(tmp_path / "no-model"), runs=str(tmp_path / "missing"))


def test_card_of_an_adapter_and_of_an_imported_model(runs, tmp_path):
    """The adapter's own run.json vouches for the adapter; `yunque import`'s record for the model."""
    from yunque.data.manifest import sha256_file
    from yunque.formats.hf import load_model
    from yunque.serve.card import ModelCard

    model_dir = tmp_path / "imported"
    shutil.copytree(runs / "run-b" / "model", model_dir)
    files = {p.name: sha256_file(p) for p in model_dir.iterdir()}
    (model_dir / "gguf_import.json").write_text(
        json.dumps({"source": "/models/x.gguf", "sha256": "ab" * 32, "gguf": {"name": "x"}, "files": files})
    )
    run = tmp_path / "lora-run"
    adapter = run / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]})
    )
    (adapter / "adapter_model.safetensors").write_bytes(b"not really safetensors, only hashed")
    recorded = {"adapter/adapter_model.safetensors": sha256_file(adapter / "adapter_model.safetensors")}
    (run / "run.json").write_text(json.dumps({"method": "lora", "steps": 3, "files_sha256": recorded}))
    card = ModelCard(load_model(model_dir), "m", model_dir, adapter, "float32")
    facts = card.facts()
    assert facts["imported_from"]["file"] == "x.gguf" and facts["imported_from"]["files_sha256"] == files
    assert facts["adapter"]["r"] == 8 and facts["adapter"]["target_modules"] == ["q_proj", "v_proj"]
    [lora] = facts["runs"]
    assert lora["of"] == "adapter" and lora["method"] == "lora" and lora["run_json"] == "lora-run/run.json"
    v = card.verify()
    assert v["verdict"] == "verified"
    assert {(f["of"], f["file"]) for f in v["files"]} == {("model", n) for n in files} | {
        ("adapter", "adapter_model.safetensors")
    }
    (adapter / "adapter_model.safetensors").write_bytes(b"swapped")
    assert card.verify()["verdict"] == "mismatch"
