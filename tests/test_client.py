"""The HTTP client that resends a request no replica answered (`ray_rec.serve.client`), against a
real HTTP server on loopback that plays a dying replica and the ingress's own error page."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from ray_rec.serve.client import retrying_session


class Script:
    """What the server does with each request, in order: ``close`` (drop the connection with no
    answer), ``ingress`` (500 with no X-Request-Id, as HAProxy's error page), ``replica500`` (a
    replica's own 500), ``ok``; the last one repeats."""

    def __init__(self) -> None:
        self.steps: list[str] = ["ok"]
        self.seen = 0


@pytest.fixture
def server() -> Iterator[tuple[str, Script]]:
    script = Script()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            step = script.steps[min(script.seen, len(script.steps) - 1)]
            script.seen += 1
            if step == "close":
                self.close_connection = True
                return
            status, body = {"ingress": (500, b"Internal Server Error"), "replica500": (500, b'{"detail":"boom"}'),
                            "ok": (200, b'{"items":[]}')}[step]
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            if step != "ingress":
                self.send_header("X-Request-Id", f"r{script.seen}")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", script
    httpd.shutdown()
    httpd.server_close()


def test_a_dropped_connection_and_the_ingress_error_page_are_sent_again(server):
    url, script = server
    script.steps = ["close", "ingress", "ok"]
    r = retrying_session(tries=3, pause_s=0.01).post(url + "/v1/recommend", json={"history": ["a"]}, timeout=10)
    assert (r.status_code, r.headers["X-Request-Id"], script.seen) == (200, "r3", 3)


def test_a_replicas_own_error_is_the_answer(server):
    url, script = server
    script.steps = ["replica500", "ok"]
    r = retrying_session(tries=3, pause_s=0.01).post(url + "/v1/score", json={}, timeout=10)
    assert (r.status_code, r.json(), script.seen) == (500, {"detail": "boom"}, 1)


def test_after_the_last_try_the_caller_gets_its_answer_or_error(server):
    url, script = server
    script.steps = ["ingress"]
    r = retrying_session(tries=2, pause_s=0.01).post(url + "/v1/recommend", json={}, timeout=10)
    assert (r.status_code, script.seen) == (500, 2)
    script.steps, script.seen = ["close"], 0
    with pytest.raises(requests.ConnectionError):
        retrying_session(tries=3, pause_s=0.01).post(url + "/v1/recommend", json={}, timeout=10)
    assert script.seen == 3
    with pytest.raises(ValueError, match="tries"):
        retrying_session(tries=0)
