"""Server settings (no FastAPI import: the CLI builds these before anything heavy loads)."""

from __future__ import annotations

import enum
import resource

from pydantic import BaseModel, ConfigDict, Field

from sd35trt.errors import ConfigError


class LogLevel(enum.StrEnum):
    """Log levels, uvicorn's names (``trace`` is uvicorn's level 5, below ``debug``)."""

    CRITICAL = "critical"
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"
    DEBUG = "debug"
    TRACE = "trace"


class LogFormat(enum.StrEnum):
    """``text``: one readable line per record; ``json``: one JSON object per line."""

    TEXT = "text"
    JSON = "json"


#: Connections taken from the kernel's queue per event-loop pass, and that queue's length
#: (``listen()`` backlog; uvicorn's default is 2048). asyncio accepts up to this many sockets before
#: the server sees any of them, so this many descriptors can be in use beyond the connection bound,
#: and as many again closing: a small value keeps a burst from exhausting the descriptors.
LISTEN_BACKLOG = 64
#: File descriptors kept free for everything that is not a held client connection: the server's
#: own (engines, libraries, logs, the listening socket) and two accept batches.
FD_RESERVE = 128 + 2 * LISTEN_BACKLOG
#: Default body limit (``--max-body-bytes``): room for a base64 ``init_image`` (a 1536x1536 photo
#: as PNG is up to ~7 MB, 4/3 of that in base64); prompts are capped apart from it, in characters.
DEFAULT_MAX_BODY_BYTES = 16 * 2**20
#: Most connections held open by default, whatever the fd limit allows.
DEFAULT_MAX_CONNECTIONS = 1024


def fd_limit() -> int:
    """This process's soft limit on open file descriptors (``ulimit -n``)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def connection_bound(requested: int | None, limit: int | None = None) -> int:
    """The most client connections to hold open: ``requested`` (``--max-connections``), or
    ``min(1024, limit - FD_RESERVE)``; ``limit`` defaults to this process's fd limit.

    Raises:
        ConfigError: ``requested`` leaves fewer than ``FD_RESERVE`` descriptors for the rest.
    """
    limit = fd_limit() if limit is None else limit
    allowed = limit - FD_RESERVE
    if allowed < 1:
        raise ConfigError(
            f"the file-descriptor limit ({limit}) leaves no room for connections; "
            f"raise it (`ulimit -n`) above {FD_RESERVE}"
        )
    if requested is None:
        return min(DEFAULT_MAX_CONNECTIONS, allowed)
    if requested > allowed:
        raise ConfigError(
            f"--max-connections {requested} is above what the file-descriptor limit ({limit}) allows: "
            f"at most {allowed} ({FD_RESERVE} are kept for the server); lower it or raise `ulimit -n`"
        )
    return requested


def check_address(host: str, port: int) -> None:
    """ConfigError, early and in one line, when ``host:port`` cannot be listened on (the host does
    not resolve, or the address is in use or not this machine's); checked by binding once."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise ConfigError(f"--host {host!r} is not an address of this machine: {err.strerror}") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as err:
            raise ConfigError(
                f"cannot listen on {host}:{port}: {err.strerror.lower()} (choose another --port or --host)"
            ) from None


class ServeSettings(BaseModel):
    """Options of ``sd35trt serve`` (slow clients, ``read_timeout_s`` and ``max_connections``:
    :mod:`sd35trt.serve.connections`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(default="127.0.0.1", description="address to bind (127.0.0.1 keeps the server local)")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port")
    max_batch: int | None = Field(
        default=None,
        ge=1,
        description="images per engine batch (default: the engines' maximum; 1 = no merging)",
    )
    #: more than an engine batch holds run as several engine batches, each image keeping its seed.
    max_images: int | None = Field(
        default=None, ge=1, description="images per request (default 16); beyond an engine batch: several"
    )
    batch_window_ms: float = Field(
        default=10.0, ge=0, le=10_000, description="how long a batch waits for compatible requests to join it"
    )
    queue_size: int = Field(
        default=32, ge=1, le=100_000, description="requests that may wait; beyond, 429 + Retry-After"
    )
    timeout_s: float = Field(
        default=300.0,
        gt=0,
        allow_inf_nan=False,
        description="per-request limit in seconds, queueing included",
    )
    read_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="seconds a client has to send a request's headers, and again its body (then 408)",
    )
    max_connections: int | None = Field(
        default=None, ge=1, description="open connections held (default: min(1024, fd limit - 256))"
    )
    max_body_bytes: int = Field(
        default=DEFAULT_MAX_BODY_BYTES,
        ge=1024,
        description="largest request body in bytes, beyond: 413 (16 MiB: room for a base64 init_image)",
    )
    low_vram: bool = Field(default=False, description="load each engine only for its stage")
    warmup: bool = Field(default=True, description="run one small generation before /ready says yes")
    log_level: LogLevel = Field(
        default=LogLevel.INFO, description="critical, error, warning, info, debug or trace"
    )
    log_format: LogFormat = Field(
        default=LogFormat.TEXT, description="text, or json (one JSON object per line, with the request id)"
    )
