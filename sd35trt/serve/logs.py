"""Server logs: every line of a request carries its id; text or JSON lines; floods are capped.

The request-id middleware sets :data:`REQUEST_ID` per HTTP request, the batcher to the ids of the
requests it runs (``"a,b"`` for a merged batch); :class:`RequestIdFilter` copies it onto each record.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from sd35trt.serve.settings import LogFormat, LogLevel

#: The id of the request being handled (``None`` outside requests: start-up, shutdown).
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("sd35trt_request_id", default=None)

#: uvicorn's level below DEBUG (``uvicorn.logging.TRACE_LOG_LEVEL``).
TRACE = 5
_LEVELS = {
    LogLevel.CRITICAL: logging.CRITICAL,
    LogLevel.ERROR: logging.ERROR,
    LogLevel.WARNING: logging.WARNING,
    LogLevel.INFO: logging.INFO,
    LogLevel.DEBUG: logging.DEBUG,
    LogLevel.TRACE: TRACE,
}
#: The loggers the server writes to: uvicorn's, sd35trt's, and asyncio's (a failed ``accept()``).
SERVER_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi", "sd35trt", "asyncio")


def level_number(level: LogLevel) -> int:
    """The :mod:`logging` level of ``level``."""
    return _LEVELS[level]


def printable(text: str) -> str:
    """``text`` with lone surrogates written as ``\\udXXX`` escapes, so it encodes as UTF-8 (a log
    stream's encoder would otherwise raise inside logging)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class RequestIdFilter(logging.Filter):
    """Add ``record.request_id``: the current request's id, or ``None`` outside requests."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = REQUEST_ID.get()
        return True


@dataclass
class _Window:
    start: float
    passed: int = 1
    suppressed: int = 0


class FloodFilter(logging.Filter):
    """Pass at most ``burst`` warnings of one kind (a logger and a message template) per
    ``window_s``; the first such line of the next window says how many were suppressed. Records
    below WARNING pass. Thread-safe.
    """

    #: Kinds remembered at once; beyond, the oldest are forgotten (messages built with f-strings
    #: would otherwise grow the table without bound).
    MAX_KINDS = 512

    def __init__(self, burst: int = 5, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.burst = burst
        self.window_s = window_s
        self.clock = clock
        self._windows: dict[tuple[str, str], _Window] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, str(record.msg))
        now = self.clock()
        with self._lock:
            window = self._windows.get(key)
            if window is None or now - window.start >= self.window_s:
                if len(self._windows) >= self.MAX_KINDS and window is None:
                    del self._windows[next(iter(self._windows))]
                self._windows[key] = _Window(start=now)
                if window is not None and window.suppressed:
                    # the note has no "%", so it is safe in a %-template and in a plain message
                    record.msg = f"{record.msg} [{window.suppressed} more like this were suppressed]"
                return True
            if window.passed < self.burst:
                window.passed += 1
                return True
            window.suppressed += 1
            return False


class TextFormatter(logging.Formatter):
    """``2026-11-30 12:00:00,123 INFO sd35trt.serve [req-id] message``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "request_id", None) is None:
            record.request_id = "-"
        return printable(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``,
    ``request_id``; an access line adds ``client``, ``method``, ``path``, ``http_version`` and
    ``status``; an exception adds ``exception`` (the traceback text)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        args = record.args
        if record.name == "uvicorn.access" and isinstance(args, tuple) and len(args) == 5:
            entry |= dict(zip(("client", "method", "path", "http_version", "status"), args, strict=True))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)  # ASCII: escapes anything, lone surrogates included


def configure_logging(
    level: LogLevel, fmt: LogFormat, stream: TextIO | None = None, *, flood_burst: int = 5
) -> logging.Handler:
    """Send uvicorn's and sd35trt's logs to ``stream`` (default stderr) in ``fmt``, at ``level``.

    Replaces those loggers' handlers (uvicorn is then started with ``log_config=None`` so it keeps
    them). Returns the handler.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt is LogFormat.JSON else TextFormatter())
    handler.addFilter(RequestIdFilter())
    handler.addFilter(FloodFilter(burst=flood_burst))
    number = level_number(level)
    logging.addLevelName(TRACE, "TRACE")
    for name in SERVER_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(number)
        # uvicorn.error and uvicorn.asgi reach the handler through "uvicorn"
        owns = name in ("uvicorn", "uvicorn.access", "sd35trt", "asyncio")
        logger.handlers = [handler] if owns else []
        logger.propagate = not owns
    return handler
