"""``sd35trt serve``: an HTTP server with dynamic batching over the engines.

FastAPI and uvicorn (the ``server`` extra) are imported only by :func:`create_app` and
:func:`serve`, so importing this package (and the CLI) needs neither.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd35trt.errors import Sd35TrtError
from sd35trt.serve.settings import ServeSettings

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = ["ServeSettings", "create_app", "serve"]


def _app_module():
    try:
        from sd35trt.serve import app
    except ImportError as err:
        if err.name not in ("fastapi", "uvicorn", "starlette", "prometheus_client") and "fastapi" not in str(
            err
        ):
            raise
        raise Sd35TrtError(
            f"the server needs FastAPI, uvicorn and prometheus-client ({err.name} is not installed): "
            "install the `server` extra with `pip install -e .[server]`"
        ) from None
    return app


def create_app(source: Any, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app for an engines directory, a loaded runtime or a generator
    (:func:`sd35trt.serve.app.create_app`).

    Raises:
        Sd35TrtError: FastAPI / uvicorn are not installed.
    """
    return _app_module().create_app(source, settings)


def serve(engines_dir: str | Path, settings: ServeSettings | None = None) -> None:
    """Verify and load the engines in ``engines_dir``, then serve HTTP until SIGINT / SIGTERM (then
    running and queued requests finish, new ones get 503).

    Raises:
        Sd35TrtError: FastAPI / uvicorn missing, or the engines fail verification or loading.
    """
    _app_module().run_server(engines_dir, settings or ServeSettings())
