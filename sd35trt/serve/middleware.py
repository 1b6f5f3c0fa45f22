"""ASGI middleware, outermost first: :class:`RequestIdMiddleware` (so every answer, a 413 or a 500
included, carries ``X-Request-ID``), :class:`MetricsMiddleware`, :class:`BodyLimitMiddleware`."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Collection
from typing import Any

from sd35trt.serve.logs import REQUEST_ID
from sd35trt.serve.metrics import ServeMetrics
from sd35trt.serve.responses import ApiError, flavor_of, render

log = logging.getLogger("sd35trt.serve")

HEADER = b"x-request-id"
#: A client's id is kept if it is 1..128 visible ASCII characters (no spaces or control characters,
#: so it cannot forge log lines); otherwise the server makes one.
_VALID_ID = re.compile(rb"[\x21-\x7e]{1,128}")


def _header(scope: dict, name: bytes) -> bytes | None:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return value
    return None


def request_id_of(scope: dict) -> str:
    """The client's ``X-Request-ID`` when it is acceptable, else a new random one (32 hex digits)."""
    given = _header(scope, HEADER)
    if given is not None and _VALID_ID.fullmatch(given):
        return given.decode("ascii")
    return uuid.uuid4().hex


class RequestIdMiddleware:
    """Give each HTTP request an id: in the log context, and in the ``X-Request-ID`` response header.

    The context variable is not reset (each request runs in its own task, and uvicorn's lines after
    the app returns still name it). An exception escaping the app is logged and answered 500 here.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id_of(scope)
        REQUEST_ID.set(rid)
        started = False

        async def send_with_id(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != HEADER]
                message = {**message, "headers": [*headers, (HEADER, rid.encode("ascii"))]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as err:
            if started:
                raise
            log.error(
                "unexpected error while handling %s %s", scope.get("method"), scope.get("path"), exc_info=err
            )
            response = render(
                ApiError(500, "internal", f"internal error: {type(err).__name__}"), flavor_of(scope["path"])
            )
            await response(scope, receive, send_with_id)


#: The ``method`` label's values (RFC 9110's methods); anything else is ``other``.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})


class MetricsMiddleware:
    """Count every answer by endpoint and status, and time it; a path not in ``endpoints`` or a
    method not in :data:`HTTP_METHODS` counts as ``other``, so scanners cannot grow the label set."""

    def __init__(self, app: Any, metrics: ServeMetrics, endpoints: Collection[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.endpoints = endpoints

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status: int | None = None

        async def capture(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        except Exception:
            status = status or 500  # the request-id middleware answers 500
            raise
        finally:
            path = scope["path"]
            endpoint = path if path in self.endpoints else "other"
            # no answer and no error: the client went away first (nginx's 499)
            method = scope["method"] if scope["method"] in HTTP_METHODS else "other"
            self.metrics.observe_response(endpoint, method, status or 499, time.perf_counter() - t0)


class BodyLimitMiddleware:
    """Read the whole request body before the app: 413 over ``max_bytes`` (a declared
    ``Content-Length`` over it without reading), 408 when it has not arrived within
    ``read_timeout_s`` of the headers (faults.md case 19). Errors take the endpoint API's shape."""

    def __init__(self, app: Any, max_bytes: int, read_timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout_s = read_timeout_s

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                too_big = False
            if too_big:
                await self._refuse(scope, receive, send, int(declared))
                return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.read_timeout_s
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                err = ApiError(
                    408,
                    "read_timeout",
                    f"the request body did not arrive within {self.read_timeout_s:g} s "
                    f"({size} bytes received)",
                    close_connection=True,
                )
                await render(err, flavor_of(scope["path"]))(scope, receive, send)
                return
            if message["type"] != "http.request":  # disconnected
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send, size)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: dict, receive: Any, send: Any, size: int) -> None:
        err = ApiError(
            413,
            "body_too_large",
            f"request body of {size}+ bytes exceeds the limit of {self.max_bytes} bytes",
            close_connection=True,
        )
        await render(err, flavor_of(scope["path"]))(scope, receive, send)
