"""Slow and stalled clients: a deadline for each request's headers and a bound on open connections.

uvicorn has no header timeout: a client that sends its headers a byte at a time (or nothing) holds a
connection and a file descriptor for ever; with enough of them the server stops accepting (faults.md
case 19). After connecting, and after each response on a kept-alive connection, a client has
``read_timeout_s`` to complete a request's headers (then 408 if it had sent anything, and
disconnected). Beyond ``max_connections`` a new connection evicts the one that has waited longest
without a request in progress, or gets 503 when every one has a request in progress. Closures are
logged as one summary line per interval. The h11 implementation is pinned (uvicorn's "auto" picks
httptools when installed) so these hooks always apply.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("sd35trt.serve")

REASONS = ("read_timeout", "evicted", "refused")


def _raw_response(status: str, code: str, detail: str, retry_after: int | None = None) -> bytes:
    """A complete HTTP/1.1 response written straight to a transport (no request was parsed)."""
    body = json.dumps({"status": "error", "error": code, "detail": detail}).encode()
    head = [
        f"HTTP/1.1 {status}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
        f"x-request-id: {uuid.uuid4().hex}",
    ]
    if retry_after is not None:
        head.append(f"retry-after: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body


class ConnectionGuard:
    """Which connections are open, in the order they started waiting for a request (event loop only).

    ``on_close(reason)`` is told of each connection closed (metrics); at most one log line is
    written per ``summary_interval_s``.
    """

    def __init__(
        self,
        max_connections: int,
        read_timeout_s: float,
        on_close: Callable[[str], None] | None = None,
        summary_interval_s: float = 10.0,
    ) -> None:
        self.max_connections = max_connections
        self.read_timeout_s = read_timeout_s
        self.on_close = on_close
        self.summary_interval_s = summary_interval_s
        self._open: dict[Any, None] = {}  # insertion order = waiting since, oldest first
        self._pending = dict.fromkeys(REASONS, 0)
        self._flush_scheduled = False
        self.totals = dict.fromkeys(REASONS, 0)

    @property
    def open_count(self) -> int:
        return len(self._open)

    def admit(self, conn: Any) -> bool:
        """Hold ``conn``, closing a stalled one to make room; ``False``: refuse it (all are busy)."""
        if len(self._open) >= self.max_connections:
            victim = next((c for c in self._open if c.waiting_for_request()), None)
            if victim is None:
                self.closed("refused")
                return False
            self._open.pop(victim)
            victim.close_stalled()
            self.closed("evicted")
        self._open[conn] = None
        return True

    def waiting(self, conn: Any) -> None:
        """``conn`` starts waiting for a request (moves to the back of the eviction order)."""
        if conn in self._open:
            self._open.pop(conn)
            self._open[conn] = None

    def forget(self, conn: Any) -> None:
        self._open.pop(conn, None)

    def closed(self, reason: str) -> None:
        """Count a connection the guard closed, and log a summary at most once per interval."""
        self.totals[reason] += 1
        self._pending[reason] += 1
        if self.on_close is not None:
            self.on_close(reason)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            try:
                asyncio.get_running_loop().call_later(self.summary_interval_s, self.flush)
            except RuntimeError:  # no loop (unit tests): log now
                self.flush()

    def flush(self) -> None:
        """Log what was closed since the last summary (one line)."""
        self._flush_scheduled = False
        p, self._pending = self._pending, dict.fromkeys(REASONS, 0)
        if any(p.values()):
            log.warning(
                "slow clients: closed %d connection(s) with no complete request within %g s, "
                "%d stalled one(s) to make room, and refused %d at the limit of %d open connections",
                p["read_timeout"],
                self.read_timeout_s,
                p["evicted"],
                p["refused"],
                self.max_connections,
            )


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, admitted by a :class:`ConnectionGuard` and given a header deadline."""

    guard: ConnectionGuard  # set by guarded_protocol()

    _stall_timer: asyncio.TimerHandle | None = None
    _armed_cycle: Any = None
    _received_since_armed = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self.guard.admit(self):
            transport.write(
                _raw_response(
                    "503 Service Unavailable",
                    "too_many_connections",
                    f"the server holds its limit of {self.guard.max_connections} connections, "
                    "each with a request in progress",
                    retry_after=1,
                )
            )
            transport.close()
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        self._received_since_armed = True
        super().data_received(data)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # a kept-alive connection must send its next request in time too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.guard.forget(self)
        super().connection_lost(exc)

    def waiting_for_request(self) -> bool:
        """No request in progress: connected or kept alive, its next headers not complete yet."""
        return self.cycle is None or self.cycle.response_complete

    def close_stalled(self) -> None:
        """Disconnect; with a 408 when the client had started sending a request."""
        self._disarm()
        if self.transport.is_closing():
            return
        if self._received_since_armed:
            self.transport.write(
                _raw_response(
                    "408 Request Timeout",
                    "read_timeout",
                    f"the request headers did not arrive within {self.guard.read_timeout_s:g} s",
                )
            )
        self.transport.close()

    def _arm(self) -> None:
        self._disarm()
        self._armed_cycle = self.cycle
        self._received_since_armed = False
        self._stall_timer = self.loop.call_later(self.guard.read_timeout_s, self._on_deadline)
        self.guard.waiting(self)

    def _disarm(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def _on_deadline(self) -> None:
        self._stall_timer = None
        if self.transport.is_closing() or self.cycle is not self._armed_cycle:
            return  # closed already, or its headers arrived (the body has its own deadline)
        if not self.waiting_for_request():
            return  # a pipelined request began when it was armed
        self.guard.forget(self)
        self.close_stalled()
        self.guard.closed("read_timeout")


def guarded_protocol(guard: ConnectionGuard) -> type[GuardedH11Protocol]:
    """The protocol class to give ``uvicorn.Config(http=...)`` for one server."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"guard": guard})
