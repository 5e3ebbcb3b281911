"""Slow clients: connections that never finish their headers (or body) are closed after the read
deadline, connections past the cap get a 503, idle keep-alive connections are closed, and normal
clients are served all the while."""

from __future__ import annotations

import socket
import time

import httpx
import pytest
from serve_util import build_model_dir, make_server

MSG = [{"role": "user", "content": "Tell me about the quick brown fox."}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("transport"))


def wait_closed(sockets: list[socket.socket], until: float) -> list[int]:
    """Indexes of the sockets the server has not closed by `until` (monotonic)."""
    still_open = []
    for i, s in enumerate(sockets):
        try:
            while True:
                s.settimeout(max(0.01, until - time.monotonic()))
                if not s.recv(65536):
                    break  # orderly close
        except (ConnectionResetError, BrokenPipeError):
            pass
        except TimeoutError:
            still_open.append(i)
        finally:
            s.close()
    return still_open


def test_slow_clients_are_cut_off_and_others_are_served(model_dir, tmp_path):
    srv, key, _ = make_server(model_dir, tmp_path, limits={"header_timeout_s": 1.0, "body_timeout_s": 1.0, "rpm": 1000})
    auth = f"Authorization: Bearer {key}\r\n".encode()
    slow = [
        b"",  # connects and says nothing
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n",  # headers never finished
        # body never finished
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + auth + b'content-length: 400\r\n\r\n{"mo',
    ]
    with srv:
        socks = []
        for i in range(300):
            s = socket.create_connection(("127.0.0.1", srv.port))
            s.sendall(slow[i % 3])
            socks.append(s)
        t0 = time.monotonic()
        h = {"Authorization": f"Bearer {key}"}
        body = {"model": "tiny", "messages": MSG, "max_tokens": 4}
        r = httpx.post(srv.url + "/v1/chat/completions", headers=h, json=body, timeout=30)
        assert r.status_code == 200, r.text
        still_open = wait_closed(socks, t0 + 6.0)
        assert not still_open, f"{len(still_open)} of 300 slow connections still open after 6 s"
        assert httpx.get(srv.url + "/health").status_code == 200


def test_connection_cap_and_keep_alive(model_dir, tmp_path):
    srv, key, _ = make_server(
        model_dir, tmp_path, limits={"max_connections": 20, "header_timeout_s": 2.0, "keep_alive_s": 0.5}
    )
    with srv:
        held = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(20)]
        time.sleep(0.2)
        over = socket.create_connection(("127.0.0.1", srv.port))
        over.settimeout(5)
        reply = over.recv(65536)
        assert reply.startswith(b"HTTP/1.1 503") and b'"code":"overloaded"' in reply, reply
        over.close()
        assert wait_closed(held, time.monotonic() + 5.0) == []  # their header deadline (2 s)

        s = socket.create_connection(("127.0.0.1", srv.port))
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(5)
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        t0 = time.monotonic()
        assert wait_closed([s], t0 + 5.0) == [] and time.monotonic() - t0 < 2.0  # idle keep-alive: 0.5 s
