"""The container and what it relies on: the Dockerfile's invariants (checked by a parser that is
shown to catch each violation), the compose example's wiring, `/health` vs `/ready`, the drain
on SIGTERM (a real `yunque serve` process: an in-flight stream finishes, new requests get 503
with Retry-After, exit 0; past the grace period the rest is cut and it still exits 0), and TLS
end to end with a certificate authority made here (the official `openai` client trusting it).

No test builds or runs the image: that needs a docker daemon (README: Serving in a container)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from serve_util import build_model_dir, free_port, make_server

from yunque.config import load_config
from yunque.serve import ServeConfig
from yunque.serve.auth import create_key

ROOT = Path(__file__).resolve().parents[2]
MSG = [{"role": "user", "content": "Scan the quick brown fox."}]
PORT = 8000  # the image's API port
SECRET_NAME = re.compile(r"(?i)(secret|passw|token|credential|api_?key|private_?key|(^|_)key$)")
SECRET_FILE = re.compile(r"(?i)(keys?\.json|\.pem$|\.key$|\.crt$|\.p12$|(^|/)\.env|id_rsa|id_ed25519|secret)")
API_KEY = re.compile(r"yq-[A-Za-z0-9_-]{43}")


# -- the Dockerfile --------------------------------------------------------------------------------
def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, continuation lines joined."""
    out, current = [], ""
    for line in text.splitlines():
        if not current and line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if current.strip():
            word, _, rest = current.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        current = ""
    return out


def exec_form(args: str) -> list[str] | None:
    try:
        v = json.loads(args)
    except json.JSONDecodeError:
        return None
    return v if isinstance(v, list) and all(isinstance(x, str) for x in v) else None


def dockerfile_problems(text: str, ignore: str) -> list[str]:
    """What is wrong with a Dockerfile for the server image (empty: nothing)."""
    ins = instructions(text)
    problems = []
    users = [a for i, a in ins if i == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append("runs as root: the last USER must be an unprivileged user")
    ports = {p.split("/")[0] for i, a in ins if i == "EXPOSE" for p in a.split()}
    if ports != {str(PORT)}:
        problems.append(f"EXPOSE must publish the API port {PORT} only, got {sorted(ports)}")
    checks = [a for i, a in ins if i == "HEALTHCHECK"]
    if len(checks) != 1 or checks[0].upper() == "NONE" or f"127.0.0.1:{PORT}/ready" not in checks[0]:
        problems.append(f"one HEALTHCHECK on http://127.0.0.1:{PORT}/ready is needed")
    entry = [exec_form(a) for i, a in ins if i == "ENTRYPOINT"]
    cmd = [exec_form(a) for i, a in ins if i == "CMD"]
    if len(entry) != 1 or entry[0] is None or entry[0][:2] != ["yunque", "serve"]:
        problems.append('ENTRYPOINT must be the exec form ["yunque", "serve"] (a shell would not pass SIGTERM on)')
    if len(cmd) != 1 or cmd[0] is None:
        problems.append("CMD must be one exec-form list of `yunque serve` flags")
    else:
        flags = dict(zip(cmd[0][::2], cmd[0][1::2]))
        if flags.get("--port") != str(PORT) or flags.get("--model") != "/model" or flags.get("--host") != "0.0.0.0":
            problems.append(f"CMD must serve /model on 0.0.0.0:{PORT}, got {cmd[0]}")
    for i, a in ins:
        if i in ("ENV", "ARG"):
            pairs = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)(?:=(\S*))?", a)
            if "=" not in a and " " in a:  # the legacy `ENV NAME value`
                pairs = [tuple(a.split(None, 1))]
            for name, value in pairs:
                if SECRET_NAME.search(name) and value:
                    problems.append(f"{i} {name} bakes a secret into the image")
        if i in ("COPY", "ADD"):
            srcs = [s for s in (exec_form(a) or a.split())[:-1] if not s.startswith("--")]
            if i == "ADD" or any(SECRET_FILE.search(s) for s in srcs):
                problems.append(f"{i} {a}: copies a secret (or fetches from outside) into the image")
            if "." in srcs:
                problems.append(f"{i} {a}: copies the whole build context (list what the image needs)")
            for s in srcs:
                if not dockerignore_allows(ignore, s):
                    problems.append(f"{i} {s}: not in .dockerignore's allow-list, so the build cannot find it")
    if API_KEY.search(text):
        problems.append("an API key is written in the Dockerfile")
    return problems


def dockerignore_allows(ignore: str, path: str) -> bool:
    """Whether `path` (a file or folder of the build context) is in the allow-list."""
    allowed = [ln[1:].rstrip("/") for ln in ignore.splitlines() if ln.startswith("!")]
    return any(path.rstrip("/") == a or path.startswith(a + "/") for a in allowed)


def read(name: str) -> str:
    return (ROOT / name).read_text(encoding="utf-8")


def test_dockerfile_keeps_its_invariants():
    assert dockerfile_problems(read("Dockerfile"), read(".dockerignore")) == []


def _drop_healthcheck(text: str) -> str:
    return re.sub(r"^HEALTHCHECK .*?\n(?=\S)", "", text, flags=re.M | re.S)


@pytest.mark.parametrize(
    "label, change, expect",
    [
        ("root at the end", lambda t: t.replace("ENTRYPOINT", "USER root\nENTRYPOINT"), "runs as root"),
        ("no USER", lambda t: re.sub(r"^USER .*\n", "", t, flags=re.M), "runs as root"),
        ("uid 0", lambda t: re.sub(r"^USER .*$", "USER 0:0", t, flags=re.M), "runs as root"),
        ("another port", lambda t: t.replace("EXPOSE 8000", "EXPOSE 8000 22"), "EXPOSE"),
        ("no HEALTHCHECK", _drop_healthcheck, "HEALTHCHECK"),
        ("a secret in ENV", lambda t: t.replace("USER yunque", "ENV OPENAI_API_KEY=sk-1\nUSER yunque"), "secret"),
        ("legacy ENV", lambda t: t.replace("USER yunque", "ENV YUNQUE_TOKEN abc\nUSER yunque"), "secret"),
        (
            "a secret in ARG",
            lambda t: t.replace("USER yunque", "ARG YUNQUE_JWT_SECRET=hunter2\nUSER yunque"),
            "secret",
        ),
        (
            "keys copied",
            lambda t: t.replace("USER yunque", "COPY keys/keys.json /etc/yunque/keys/\nUSER yunque"),
            "secret",
        ),
        ("a key written", lambda t: t + "\n# yq-" + "A" * 43 + "\n", "API key"),
        ("the whole context", lambda t: t.replace("COPY yunque ./yunque", "COPY . ."), "whole build context"),
        (
            "shell-form entrypoint",
            lambda t: t.replace('ENTRYPOINT ["yunque", "serve"]', "ENTRYPOINT yunque serve"),
            "exec form",
        ),
        ("loopback only", lambda t: t.replace('"0.0.0.0"', '"127.0.0.1"'), "0.0.0.0"),
    ],
)
def test_the_dockerfile_check_catches(label, change, expect):
    """The invariant check fails on each kind of broken Dockerfile (so its pass above means something)."""
    text = read("Dockerfile")
    changed = change(text)
    assert changed != text, f"the {label!r} edit did not apply: update it to the Dockerfile"
    problems = dockerfile_problems(changed, read(".dockerignore"))
    assert any(expect in p for p in problems), (label, problems)


def test_dockerignore_is_an_allow_list_without_secrets():
    lines = [ln.strip() for ln in read(".dockerignore").splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", "the first pattern must exclude everything; the image's files are then allowed by name"
    allowed = [ln[1:] for ln in lines if ln.startswith("!")]
    assert allowed and not any(SECRET_FILE.search(a) for a in allowed), allowed
    for a in allowed:
        assert (ROOT / a).exists(), f".dockerignore allows {a}, which does not exist"


def test_compose_example_wiring():
    """Only the proxy publishes a port; the model and keys are read-only mounts; the proxy waits for
    /ready; the stop grace period outlasts the drain; the image's settings file loads strictly."""
    compose = yaml.safe_load(read("compose.yaml"))
    server, proxy = compose["services"]["yunque"], compose["services"]["proxy"]
    assert "ports" not in server and server["expose"] == [str(PORT)]
    assert proxy["ports"] == ["443:443"]
    assert proxy["depends_on"]["yunque"]["condition"] == "service_healthy"
    mounts = {m["target"]: m for m in server["volumes"] if isinstance(m, dict)}
    assert mounts["/model"]["read_only"] is True and mounts["/etc/yunque/keys"]["read_only"] is True
    assert server["read_only"] is True and not str(server["user"]).startswith(("0", "root"))

    # deploy/serve.yaml is what the Dockerfile copies to /etc/yunque/serve.yaml
    assert "COPY deploy/serve.yaml /etc/yunque/serve.yaml" in read("Dockerfile")
    cfg = load_config(ServeConfig, ROOT / "deploy" / "serve.yaml")
    assert cfg.auth.required and cfg.auth.keys_file.parent == Path("/etc/yunque/keys")
    grace = float(server["stop_grace_period"].rstrip("s"))
    assert grace > cfg.drain_timeout_s, "the runtime would kill the server before its drain ends"
    caddy = read("deploy/Caddyfile")
    assert f"reverse_proxy yunque:{PORT}" in caddy and "health_uri /ready" in caddy


# -- /health, /ready and the drain, in process ------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("container"))


@pytest.fixture(scope="module")
def endless_model_dir(tmp_path_factory):
    """A model that never ends a greedy reply: its output head scores every stop token 0, below the
    best of the other tokens at every step, so a reply runs to max_tokens (a drain test needs a
    request that is surely still generating when SIGTERM comes)."""
    import torch

    from yunque.formats.hf import load_model, save_model
    from yunque.tokenizer import Tokenizer

    d = build_model_dir(tmp_path_factory.mktemp("endless"))
    model, tok = load_model(d), Tokenizer.from_dir(d)
    with torch.no_grad():
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
        model.lm_head.weight[tok.stop_ids] = 0.0
    save_model(model, d)
    return d


def run_in_thread(app, grace_s: float):
    """The draining server in a thread (signals go to the main thread: the test calls handle_exit)."""
    from yunque.serve.server import draining_server, uvicorn_config

    service = app.app.state.service
    port = free_port()
    server = draining_server(uvicorn_config(app, "127.0.0.1", port, service.cfg, "warning"), service, grace_s)
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and t.is_alive(), "server did not start"
        time.sleep(0.02)
    return server, t, f"http://127.0.0.1:{port}"


def stream_lines(url: str, key: str, max_tokens: int, out: list, started: threading.Event) -> None:
    body = {"model": "tiny", "messages": MSG, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    try:
        with httpx.stream(
            "POST", url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, json=body, timeout=60
        ) as r:
            out.append(r.status_code)
            for line in r.iter_lines():
                out.append(line)
                started.set()
    except httpx.TransportError as e:
        out.append(e)
    finally:
        started.set()


def test_ready_is_not_health(model_dir, tmp_path):
    """/health: alive (200) whatever the engine does; /ready: 503 once the engine is down or the
    server drains. Both answer without credentials."""
    srv, key, app = make_server(model_dir, tmp_path)
    service = app.app.state.service
    with srv:
        assert httpx.get(srv.url + "/ready").json() == {"status": "ready"}
        service.engine.error = RuntimeError("boom")  # as the engine thread leaves it when it dies
        r, h = httpx.get(srv.url + "/ready"), httpx.get(srv.url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "engine_failed" and "boom" in r.json()["error"]
        assert h.status_code == 200 and h.json()["status"] == "engine_failed"
        service.engine.error = None
        service.draining = True
        assert httpx.get(srv.url + "/ready").json() == {"status": "draining"}
        assert httpx.get(srv.url + "/health").status_code == 200
        r = httpx.post(
            srv.url + "/v1/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": "tiny", "prompt": "hi", "max_tokens": 2},
        )
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert r.json()["error"]["code"] == "shutting_down"
        service.draining = False
    assert not service.started


def test_drain_past_its_grace_period_cuts_the_rest_and_stops(model_dir, tmp_path):
    srv, key, app = make_server(model_dir, tmp_path, slow_s=0.1)  # 60 tokens take 6 s
    app.app.state.engine.stop_ids = set()
    server, t, url = run_in_thread(app, grace_s=0.5)
    out, started = [], threading.Event()
    client = threading.Thread(target=stream_lines, args=(url, key, 60, out, started))
    client.start()
    assert started.wait(30)
    t0 = time.monotonic()
    server.handle_exit(signal.SIGTERM, None)
    t.join(15)
    client.join(15)
    assert not t.is_alive() and not client.is_alive()
    assert time.monotonic() - t0 < 5  # 0.5 s of grace, then a second for uvicorn to close what is left
    assert out[0] == 200 and "data: [DONE]" not in out, out[-3:]  # cut, not finished


def test_a_second_signal_stops_at_once(model_dir, tmp_path):
    srv, key, app = make_server(model_dir, tmp_path, slow_s=0.1)  # 60 tokens take 6 s
    app.app.state.engine.stop_ids = set()
    server, t, url = run_in_thread(app, grace_s=60)
    out, started = [], threading.Event()
    client = threading.Thread(target=stream_lines, args=(url, key, 60, out, started), daemon=True)
    client.start()
    assert started.wait(30)
    server.handle_exit(signal.SIGTERM, None)
    time.sleep(0.3)
    assert t.is_alive()  # draining: the stream has 60 s
    t0 = time.monotonic()
    server.handle_exit(signal.SIGINT, None)
    t.join(10)
    client.join(10)
    assert not t.is_alive() and time.monotonic() - t0 < 3  # the stream had ~5 s to go
    assert out[0] == 200 and "data: [DONE]" not in out, out[-3:]


# -- a real `yunque serve` process ---------------------------------------------------------------
def serve(model_dir: Path, tmp: Path, *flags: str, **cfg) -> tuple[subprocess.Popen, str, int, Path]:
    keys = tmp / "keys.json"
    key = create_key(keys, "container")
    # torch_threads: a fixed count, so start-up skips measuring the free cores
    conf = {"model_name": "tiny", "torch_threads": 1, "auth": {"keys_file": str(keys)}, "limits": {"rpm": 1000}, **cfg}
    (tmp / "serve.yaml").write_text(yaml.safe_dump(conf), encoding="utf-8")
    port = free_port()
    log = tmp / "server.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "yunque", "serve", "--model", str(model_dir), "--port", str(port)]
    with log.open("w") as f:
        proc = subprocess.Popen([*cmd, "--config", str(tmp / "serve.yaml"), *flags], env=env, stdout=f, stderr=f)
    return proc, key, port, log


def wait_ready(proc: subprocess.Popen, url: str, log: Path, verify=True) -> None:
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(url + "/ready", verify=verify).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "server did not become ready"
        time.sleep(0.1)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_sigterm_drains_an_in_flight_stream_then_exits_0(endless_model_dir, tmp_path):
    limits = {"rpm": 1000, "max_len": 1024, "max_prompt_tokens": 128, "max_tokens": 500}
    proc, key, port, log = serve(endless_model_dir, tmp_path, limits=limits, drain_timeout_s=60)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url, log)
        client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
        stream = client.chat.completions.create(
            model="tiny",
            messages=MSG,
            max_tokens=500,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = iter(stream)
        first = next(chunks)  # admitted: the request is in flight
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while (ready := httpx.get(url + "/ready")).status_code == 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert ready.status_code == 503 and ready.json() == {"status": "draining"}
        assert httpx.get(url + "/health").status_code == 200
        r = httpx.post(
            url + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": "tiny", "messages": MSG, "max_tokens": 4},
        )
        assert r.status_code == 503 and int(r.headers["retry-after"]) > 0, r.text
        with pytest.raises(openai.InternalServerError) as e:  # what an OpenAI client sees
            client.completions.create(model="tiny", prompt="hi", max_tokens=4)
        assert e.value.status_code == 503

        rest = [first, *chunks]  # the stream goes on to its end
        assert rest[-1].usage.completion_tokens == 500
        assert [c.choices[0].finish_reason for c in rest if c.choices and c.choices[0].finish_reason] == ["length"]
        assert proc.wait(30) == 0
    finally:
        stop(proc)
    text = log.read_text()
    assert "draining: 1 request(s) in flight" in text, text  # it really was generating at SIGTERM
    assert "drain timeout" not in text


def make_ca(tmp: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate for 127.0.0.1/localhost signed by it, the server's key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)

    def cert(subject, issuer, public_key, signing_key, ca: bool, san=None):
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ca:
            b = b.add_extension(
                x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
            ).add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        else:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False).add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
        return b.sign(signing_key, hashes.SHA256())

    ca_key, srv_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert("yunque test CA", "yunque test CA", ca_key.public_key(), ca_key, ca=True)
    san = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    srv = cert("localhost", "yunque test CA", srv_key.public_key(), ca_key, ca=False, san=san)
    pem = serialization.Encoding.PEM
    (tmp / "ca.pem").write_bytes(ca.public_bytes(pem))
    (tmp / "server.pem").write_bytes(srv.public_bytes(pem))
    (tmp / "server.key").write_bytes(
        srv_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return tmp / "ca.pem", tmp / "server.pem", tmp / "server.key"


def test_tls_end_to_end_with_a_custom_ca(model_dir, tmp_path):
    ca, cert, key_file = make_ca(tmp_path)
    proc, key, port, log = serve(model_dir, tmp_path, "--ssl-certfile", str(cert), "--ssl-keyfile", str(key_file))
    url = f"https://127.0.0.1:{port}"
    trust = ssl.create_default_context(cafile=str(ca))
    try:
        wait_ready(proc, url, log, verify=trust)
        client = openai.OpenAI(
            base_url=url + "/v1", api_key=key, max_retries=0, http_client=openai.DefaultHttpxClient(verify=trust)
        )
        assert [m.id for m in client.models.list()] == ["tiny"]
        r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=4)
        assert r.usage.completion_tokens >= 1
        chunks = list(client.chat.completions.create(model="tiny", messages=MSG, max_tokens=4, stream=True))
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        # Not trusted without the CA, and not served in the clear
        with pytest.raises(openai.APIConnectionError):
            openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0).models.list()
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/health")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        stop(proc)
    assert f"on https://127.0.0.1:{port}/v1" in log.read_text()


def test_tls_flags_are_checked_before_the_model_loads(tmp_path, capsys):
    from yunque.__main__ import main

    ca, cert, key_file = make_ca(tmp_path)
    create_key(tmp_path / "keys.json", "k")
    (tmp_path / "serve.yaml").write_text(f"auth: {{keys_file: {tmp_path / 'keys.json'}}}\n")
    base = ["serve", "--model", str(tmp_path / "no-model"), "--config", str(tmp_path / "serve.yaml")]
    for flags, expect in (
        (["--ssl-certfile", str(cert)], "go together"),
        (["--ssl-certfile", str(cert), "--ssl-keyfile", str(tmp_path / "nope.key")], "nope.key: no such file"),
        (["--ssl-certfile", str(ca), "--ssl-keyfile", str(key_file)], "cannot load the certificate and its key"),
    ):
        assert main(base + flags) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expect in err[0], err
