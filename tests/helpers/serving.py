"""Helpers for the serve tests: a real uvicorn server on 127.0.0.1 in a thread, bounded waits.

Servers run in a thread of the test process (so a test can hold the batcher's worker, wrap an
engine, read the server's log and trigger shutdown). Every server binds 127.0.0.1 on a port the
OS picked; every wait is bounded.
"""

from __future__ import annotations

import base64
import io
import logging
import socket
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager

import httpx
from PIL import Image

SMALL = {"width": 64, "height": 64, "num_inference_steps": 2}


def wait_until(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def decode_png(b64: str) -> Image.Image:
    """An image of a response's ``images`` list (a base64 PNG file)."""
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    assert image.format == "PNG"
    return image


class LiveServer:
    """uvicorn serving an app in a thread, on 127.0.0.1 and a port the OS picked.

    Its log (uvicorn's and sd35trt's) is kept in ``log`` (a string buffer).
    """

    def __init__(self, runtime, **settings) -> None:
        from sd35trt.serve import ServeSettings, create_app
        from sd35trt.serve.app import make_server
        from sd35trt.serve.logs import SERVER_LOGGERS

        # make_server configures the process's loggers; stop() puts them back for other tests
        self._loggers = [
            (lg, lg.handlers[:], lg.propagate, lg.level) for lg in map(logging.getLogger, SERVER_LOGGERS)
        ]

        self.settings = ServeSettings(**({"log_level": "warning"} | settings))
        self.app = create_app(runtime, self.settings)
        self.state = self.app.state.sd35
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.address = self.sock.getsockname()
        self.url = f"http://127.0.0.1:{self.address[1]}"
        self.log = io.StringIO()
        self.server = make_server(self.app, self.settings, log_stream=self.log)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def batcher(self):
        return self.state.batcher

    def start(self) -> LiveServer:
        self.thread.start()

        def ready() -> bool:
            try:
                return httpx.get(self.url + "/ready", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(lambda: ready() or self.state.load_error is not None, 120, "the server to become ready")
        assert self.state.load_error is None, self.state.load_error
        return self

    def stop(self) -> None:
        if self.batcher is not None and self.thread.is_alive():
            self.batcher.resume()
        self.server.should_exit = True
        self.thread.join(60)
        for logger, handlers, propagate, level in self._loggers:
            logger.handlers, logger.propagate = handlers, propagate
            logger.setLevel(level)
        assert not self.thread.is_alive(), "the server thread did not stop within 60 s"


@contextmanager
def live_server(runtime, **settings):
    server = LiveServer(runtime, **settings).start()
    try:
        yield server
    finally:
        server.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
