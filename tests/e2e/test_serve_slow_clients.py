"""Slow, stalled and garbage clients against a real server on 127.0.0.1, with raw sockets
(faults.md case 19): incomplete requests time out, open connections stay bounded below the fd
limit, ``/health`` keeps answering, and the log does not flood.

Counts are bounded (a few hundred sockets at most), every socket is loopback, every wait bounded.
The same under a real file-descriptor limit, in a ``sd35trt serve`` process, is in test_serve.py.
"""

from __future__ import annotations

import concurrent.futures
import json
import socket
import threading

import httpx
import pytest
from serving import SMALL, live_server, wait_until

pytestmark = pytest.mark.slow

READ_TIMEOUT = 1.0
PARTIAL = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slow"  # headers never finished


def connect(address, send: bytes = b"") -> socket.socket:
    s = socket.create_connection(address, timeout=10)
    if send:
        s.sendall(send)
    return s


def connect_many(address, count: int, send: bytes = b"") -> list[socket.socket]:
    # in parallel: a full accept queue makes a connect wait for the client's SYN retry (1 s)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        return list(pool.map(lambda _: connect(address, send), range(count)))


def read_until_closed(s: socket.socket, timeout_s: float) -> bytes | None:
    """What the server sent before closing ``s``; ``None`` if it is still open after ``timeout_s``."""
    s.settimeout(timeout_s)
    data = b""
    try:
        while chunk := s.recv(4096):
            data += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    finally:
        s.close()
    return data


def test_stalled_connections_are_bounded_closed_in_time_and_health_stays_fast(runtime):
    """faults.md case 19: idle and header-trickling sockets, far more than the connection bound."""
    n, bound = 120, 16
    with live_server(runtime, max_connections=bound, read_timeout_s=READ_TIMEOUT, log_level="info") as srv:
        guard = srv.state.guard
        idle = connect_many(srv.address, n // 2)
        partial = connect_many(srv.address, n // 2, PARTIAL)
        closed = lambda: guard.totals["evicted"] + guard.totals["read_timeout"]  # noqa: E731
        wait_until(lambda: closed() >= n - bound, 10, "the surplus to be closed")
        assert guard.open_count <= bound
        health = httpx.get(srv.url + "/health", timeout=2)  # answers while the flood is held
        assert health.status_code == 200 and health.json()["status"] == "alive"

        answers = [read_until_closed(s, READ_TIMEOUT + 5) for s in partial]
        silences = [read_until_closed(s, READ_TIMEOUT + 5) for s in idle]
        assert all(a is not None for a in answers + silences), "a stalled connection was left open"
        # those held until the deadline get 408, the others made room (408 too when the server had
        # read some of their bytes by then); the idle ones asked nothing and get no answer
        assert all(a == b"" or a.startswith(b"HTTP/1.1 408 ") for a in answers)
        assert sum(a.startswith(b"HTTP/1.1 408 ") for a in answers) >= bound
        assert all(a == b"" for a in silences), silences[:3]
        wait_until(lambda: guard.open_count == 0, 5, "every stalled connection to be closed")
        assert guard.totals["evicted"] + guard.totals["read_timeout"] >= n and guard.totals["refused"] == 0
        metrics = httpx.get(srv.url + "/metrics").text
        assert 'sd35trt_connections_closed_total{reason="evicted"}' in metrics
    log = srv.log.getvalue()
    assert "Traceback" not in log
    summaries = [line for line in log.splitlines() if "slow clients:" in line]
    assert 1 <= len(summaries) <= 2, summaries  # one line per 10 s (and one at shutdown), not per socket


def test_a_trickled_body_gets_408_and_the_connection_is_closed(runtime):
    """faults.md case 19: headers complete, then the body a byte at a time."""
    with live_server(runtime, read_timeout_s=READ_TIMEOUT) as srv:
        head = (
            b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 400\r\nX-Request-ID: trickle-1\r\n\r\n"
        )
        s = connect(srv.address, head)
        stop = threading.Event()

        def trickle() -> None:
            for byte in b'{"prompt": "a very slow cat"' * 10:
                if stop.wait(0.2):
                    return
                try:
                    s.send(bytes([byte]))
                except OSError:
                    return

        t = threading.Thread(target=trickle, daemon=True)
        t.start()
        answer = read_until_closed(s, READ_TIMEOUT + 5)
        stop.set()
        t.join(5)
        assert answer is not None and answer.startswith(b"HTTP/1.1 408 "), answer
        head_text, _, body = answer.partition(b"\r\n\r\n")
        assert b"x-request-id: trickle-1" in head_text.lower()
        assert json.loads(body)["error"] == "read_timeout"
        assert (
            'sd35trt_requests_rejected_total{reason="read_timeout"} 1.0'
            in httpx.get(srv.url + "/metrics").text
        )


def test_a_kept_alive_connection_must_send_its_next_request_in_time(runtime):
    """faults.md case 19: one complete request, then the next one's headers stall."""
    with live_server(runtime, read_timeout_s=READ_TIMEOUT) as srv:
        s = connect(srv.address, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        s.settimeout(5)
        first = b""
        while b"\r\n\r\n" not in first:
            first += s.recv(4096)
        head, _, body = first.partition(b"\r\n\r\n")
        length = int(
            next(h for h in head.lower().split(b"\r\n") if h.startswith(b"content-length:")).split()[1]
        )
        while len(body) < length:
            body += s.recv(4096)
        assert head.startswith(b"HTTP/1.1 200 ") and json.loads(body)["status"] == "alive"
        s.sendall(PARTIAL)
        answer = read_until_closed(s, READ_TIMEOUT + 5)
        assert answer is not None and answer.startswith(b"HTTP/1.1 408 "), answer


def test_requests_in_progress_are_never_dropped_and_a_full_house_gets_503(runtime):
    """faults.md case 19: the bound closes stalled connections only, never one with a request."""
    with live_server(runtime, max_connections=3, read_timeout_s=READ_TIMEOUT, queue_size=8) as srv:
        srv.batcher.pause()
        results: list = []

        def post(i: int) -> None:
            results.append(
                httpx.post(srv.url + "/generate", json={"prompt": f"held {i}", **SMALL}, timeout=120)
            )

        posts = [threading.Thread(target=post, args=(i,)) for i in range(3)]
        for t in posts:
            t.start()
        wait_until(lambda: srv.batcher.stats().queued == 3, 30, "three queued requests")
        extra = connect(srv.address, PARTIAL)
        answer = read_until_closed(extra, 5)
        assert answer is not None and answer.startswith(b"HTTP/1.1 503 "), answer
        assert b"retry-after: 1" in answer.lower()
        assert srv.state.guard.totals["refused"] == 1
        srv.batcher.resume()
        for t in posts:
            t.join(120)
        assert [r.status_code for r in results] == [200] * 3


def test_garbage_requests_are_answered_400_without_flooding_the_log(runtime):
    """faults.md case 19: uvicorn warns once per malformed request; the log keeps five per kind."""
    with live_server(runtime, log_level="info") as srv:
        answers = [read_until_closed(connect(srv.address, b"NOT HTTP AT ALL\r\n\r\n"), 5) for _ in range(40)]
        assert all(a is not None and a.startswith(b"HTTP/1.1 400 ") for a in answers)
    warnings = [line for line in srv.log.getvalue().splitlines() if "Invalid HTTP request" in line]
    assert 1 <= len(warnings) <= 5, len(warnings)
