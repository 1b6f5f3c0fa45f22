"""Error answers in the two shapes the server speaks (sd35trt's own, FastAPI's 422 shape for
fields; OpenAI's ``{"error": {...}}`` under ``/v1/``), built from one :class:`ApiError`."""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sd35trt.errors import NonFiniteError, RequestError, Sd35TrtError, is_out_of_memory
from sd35trt.serve.batcher import RequestTimeoutError, ShuttingDownError
from sd35trt.serve.logs import printable

if TYPE_CHECKING:
    from starlette.responses import JSONResponse

log = logging.getLogger("sd35trt.serve")

#: Our request fields named differently by the OpenAI Images API.
OPENAI_NAMES = {"width": "size", "height": "size", "num_images": "n", "init_image": "image"}
#: The Triton error code of each HTTP status a generation can fail with (Triton's ``TritonError``).
TRITON_CODES = {422: "INVALID_ARG", 499: "CANCELLED", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


class ApiFlavor(enum.StrEnum):
    NATIVE = "native"
    OPENAI = "openai"


def flavor_of(path: str) -> ApiFlavor:
    """Which error shape a request path gets (``/v1/...`` is the OpenAI-compatible API)."""
    return ApiFlavor.OPENAI if path.startswith("/v1/") else ApiFlavor.NATIVE


@dataclass(frozen=True)
class FieldError:
    """One invalid field: where (``["body", "width"]``), its name, the message and pydantic's type."""

    loc: tuple[str | int, ...]
    field: str
    msg: str
    type: str = "value_error"

    def to_json(self) -> dict:
        return {"loc": list(self.loc), "msg": self.msg, "type": self.type}


@dataclass(eq=False)
class ApiError(Exception):
    """An HTTP error answer: ``status``, a stable ``code`` (``queue_full``, ...), one-line
    ``message``, for 422 every invalid field, ``Retry-After`` seconds, and ``extra`` members of the
    native error body (e.g. ``stage`` of a NaN failure)."""

    status: int
    code: str
    message: str
    fields: tuple[FieldError, ...] = ()
    retry_after: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    close_connection: bool = False

    def __post_init__(self) -> None:
        super().__init__(self.message)

    @classmethod
    def invalid(cls, fields: Sequence[FieldError]) -> ApiError:
        return cls(422, "invalid_request", "; ".join(f.msg for f in fields), fields=tuple(fields))

    @classmethod
    def from_request_error(cls, err: RequestError) -> ApiError:
        return cls.invalid([FieldError(("body", err.field), err.field, printable(str(err)))])

    @classmethod
    def of(cls, err: BaseException, retry_after_s: int = 5) -> ApiError:
        """The answer for an exception a generation raised: the one map from errors to statuses.

        422 a field (named); 504 timed out; 503 shutting down or out of memory (Retry-After);
        500 a stage's NaN/inf (``stage`` named), another sd35trt error, or a bug (logged with its
        traceback). ``sd35trt serve`` answers with it, Triton's model with :attr:`triton_code`.
        """
        if isinstance(err, RequestTimeoutError):
            return cls(504, "timeout", str(err))
        if isinstance(err, RequestError):
            return cls.from_request_error(err)
        if isinstance(err, NonFiniteError):
            log.warning("request failed: stage %s produced non-finite values: %s", err.stage, err)
            return cls(500, "non_finite", str(err), extra={"stage": err.stage})
        if isinstance(err, ShuttingDownError):
            return cls(503, "shutting_down", str(err), retry_after=5)
        if is_out_of_memory(err):
            log.warning("request failed: out of memory: %s", err)
            return cls(503, "out_of_memory", f"out of memory: {err}", retry_after=retry_after_s)
        if isinstance(err, Sd35TrtError):
            log.warning("request failed: %s", err)
            return cls(500, "generation_failed", str(err))
        log.error("request failed with an unexpected error", exc_info=err)
        return cls(500, "internal", f"internal error: {type(err).__name__}: {err}")

    @property
    def triton_code(self) -> str:
        """Triton's error code for this answer (``INVALID_ARG`` for a 422, ...; ``INTERNAL`` else)."""
        return TRITON_CODES.get(self.status, "INTERNAL")

    def renamed(self, names: Mapping[str, str]) -> ApiError:
        """The same error with its fields named as another API names them (``width`` -> ``size``)."""
        if not self.fields:
            return self
        fields = [
            FieldError(("body", names[f.field]), names[f.field], f.msg, f.type) if f.field in names else f
            for f in self.fields
        ]
        return ApiError.invalid(fields)


def validation_errors(errors: Iterable[Mapping[str, Any]]) -> list[FieldError]:
    """FastAPI/pydantic validation errors as :class:`FieldError`, without the offending input: a
    JSON ``NaN`` or ``1e309`` cannot be written back as JSON, nor a lone surrogate as UTF-8, and
    either made FastAPI's own handler fail with a 500 (faults.md cases 17 and 18)."""
    out = []
    for err in errors:
        loc = tuple(p if isinstance(p, int) else printable(str(p)) for p in err.get("loc", ()))
        name = ".".join(map(str, loc[1:] if len(loc) > 1 and loc[0] == "body" else loc)) or "body"
        value = err.get("input")
        if isinstance(value, float) and not math.isfinite(value):
            literal = "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
            msg = (
                f"{name} {literal} is not a finite number; JSON NaN, Infinity and "
                "numbers beyond ±1.8e308 are not accepted"
            )
            out.append(FieldError(loc, name, msg, "finite_number"))
            continue
        if err.get("type") == "json_invalid":
            detail = printable(str((err.get("ctx") or {}).get("error", "")))
            msg = f"body is not valid JSON at character {loc[-1]}: {detail}"
            out.append(FieldError(("body",), "body", msg, "json_invalid"))
            continue
        msg = printable(str(err.get("msg", "invalid")))
        out.append(FieldError(loc, name, f"{name}: {msg}", printable(str(err.get("type", "value_error")))))
    return out


def _openai_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    return "invalid_request_error" if status < 500 else "server_error"


def render(err: ApiError, flavor: ApiFlavor) -> JSONResponse:
    """The response for ``err`` in the shape of ``flavor``."""
    from starlette.responses import JSONResponse  # here: Triton's model uses ApiError.of, not HTTP

    if flavor is ApiFlavor.OPENAI:
        first = err.fields[0] if err.fields else None
        body: dict[str, Any] = {
            "error": {
                "message": first.msg if first else err.message,
                "type": _openai_type(err.status),
                "param": first.field if first else None,
                "code": err.code,
            }
        }
    elif err.fields:
        body = {"status": "error", "detail": [f.to_json() for f in err.fields]}
    else:
        body = {"status": "error", "error": err.code, "detail": err.message, **err.extra}
    headers = {}
    if err.retry_after is not None:
        headers["Retry-After"] = str(err.retry_after)
    if err.close_connection:
        headers["Connection"] = "close"
    return JSONResponse(body, status_code=err.status, headers=headers or None)
