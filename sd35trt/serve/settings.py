"""Server settings (no FastAPI import: the CLI builds these before anything heavy loads)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ServeSettings(BaseModel):
    """Options of ``sd35trt serve``.

    ``max_batch`` is in images per engine batch; ``None`` means the engines' profile maximum (a
    larger value is refused when the engines load). ``max_batch=1`` turns merging off.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(default="127.0.0.1", description="address to bind (loopback by default)")
    port: int = Field(default=8000, ge=0, le=65535)
    max_batch: int | None = Field(default=None, ge=1, description="images per engine batch")
    batch_window_ms: float = Field(default=10.0, ge=0, le=10_000, description="merge window")
    queue_size: int = Field(default=32, ge=1, le=100_000, description="requests waiting, beyond: 429")
    timeout_s: float = Field(default=300.0, gt=0, description="per-request limit, queue wait included")
    max_body_bytes: int = Field(default=64 * 1024, ge=1024, description="larger bodies get 413")
    low_vram: bool = False
    warmup: bool = Field(default=True, description="run one small generation before /ready says yes")
    log_level: str = "info"
