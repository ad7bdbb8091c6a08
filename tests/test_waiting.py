"""The wait helper the server and cluster tests rely on: every "not ready yet" is tolerated."""

from __future__ import annotations

import http.server
import threading
import time

import pytest
import requests

from waiting import http_ok, wait_until


def test_every_kind_of_not_ready_is_tolerated_until_ready():
    answers = iter([requests.ConnectionError("refused"), requests.ReadTimeout("held"), False,
                    OSError("reset"), True])

    def ready():
        a = next(answers)
        if isinstance(a, Exception):
            raise a
        return a

    assert wait_until(ready, 10, interval_s=0) is None


def test_deadline_and_giving_up_say_why():
    def never():
        raise requests.ReadTimeout("read timed out")

    t0 = time.monotonic()
    problem = wait_until(never, 0.3, interval_s=0.05)
    assert time.monotonic() - t0 >= 0.3 and "not ready after" in problem and "ReadTimeout: read timed out" in problem
    assert "gave up" in wait_until(never, 60, gave_up=lambda: True)


class _SlowThenOk(http.server.BaseHTTPRequestHandler):
    calls = 0

    def do_GET(self):  # noqa: N802
        type(self).calls += 1
        if type(self).calls == 1:
            time.sleep(0.6)  # holds the connection past the client's read timeout
        self.send_response(503 if type(self).calls == 2 else 200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_http_ok_waits_through_a_read_timeout_and_a_503():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowThenOk)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/healthz"
        with pytest.raises(requests.ReadTimeout):
            http_ok(url, timeout_s=0.2)  # first call: held connection
        assert wait_until(lambda: http_ok(url, timeout_s=2), 10, interval_s=0) is None
        assert _SlowThenOk.calls == 3  # the 503 was waited through too
    finally:
        server.shutdown()
