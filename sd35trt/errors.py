"""User-facing errors: every problem a user can fix is an :class:`Sd35TrtError` subclass whose
message names the thing, what was found and what was expected. The CLI prints those as one line
and exits 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class Sd35TrtError(Exception):
    """Base class of every error a user can act on."""


class ConfigError(Sd35TrtError):
    """A config file or option is invalid (unknown key, wrong type, value out of range)."""


class ModelError(Sd35TrtError):
    """A model directory is missing, incomplete, unsafe (pickle weights) or corrupt."""


class ManifestError(Sd35TrtError):
    """A run directory's manifest is missing, unreadable, or lacks a stage's record."""


class StaleArtifactError(ManifestError):
    """An artefact was produced from inputs or settings that have changed since."""


class VerificationError(ManifestError):
    """A file does not match its manifest record (missing, wrong size or sha256)."""


class IncompatibleEngineError(VerificationError):
    """An engine was built for another backend, TensorRT version or GPU."""


class ReportError(Sd35TrtError):
    """A report file (``bench.json``, ``eval.json``) is missing, not JSON, or not of its schema."""


class UnsafeArtifactError(VerificationError):
    """A path of an artefact or run directory leaves its root (``..``, absolute, a symlink), or an
    archive holds links, nests too deep or expands beyond the sizes it declares."""


class EngineLoadError(VerificationError):
    """An engine file matches its record but its backend cannot load it (the file is named)."""


class WriteError(Sd35TrtError):
    """An output could not be written: no space left, a quota, a read-only file system or no
    permission (the path being written is named; nothing half-written is published)."""


#: ``errno`` values of a write that fails because of where it writes, not because of a bug.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes free on the file system holding ``path`` (its nearest existing parent), if known."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def write_error(err: OSError, path: str | os.PathLike) -> WriteError | None:
    """The one-line user error for ``err``, raised while writing ``path`` (naming the OS's
    ``err.filename``, else ``path``, and for a full disk the bytes left); ``None`` when ``err`` is
    not about where it writes (see :data:`WRITE_ERRNOS`), so the caller re-raises it."""
    if err.errno not in WRITE_ERRNOS:
        return None
    target = err.filename or path
    reason = (err.strerror or os.strerror(err.errno)).lower()
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        free = free_bytes(target)
        left = f"; {free} bytes free there" if free is not None else ""
        return WriteError(f"cannot write {target}: {reason}{left}; free some space (nothing was published)")
    return WriteError(f"cannot write {target}: {reason} (nothing was published)")


class RunDirBusyError(Sd35TrtError):
    """Another process is writing the same run directory (its pid and command are named)."""


class RunDirError(Sd35TrtError):
    """A ``--run-dir`` that is not a run (an engines directory, a user's folder), or cannot be written."""


class CalibrationError(Sd35TrtError):
    """Calibration produced unusable ranges (an amax of 0, inf or NaN)."""


class ExportError(Sd35TrtError):
    """An ONNX export or its numerical validation failed."""


class BuildError(Sd35TrtError):
    """An engine could not be built."""


class BackendUnavailableError(Sd35TrtError):
    """The requested backend (TensorRT, CUDA) is not installed or has no device."""


class RequestError(Sd35TrtError):
    """A generation request is invalid (size, steps, guidance, seed, prompt); ``field`` names the
    request field at fault, for the HTTP layer."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class NonFiniteError(Sd35TrtError):
    """A stage produced NaN or inf; the stage is named so the request can fail cleanly."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage


class DeviceOutOfMemoryError(Sd35TrtError):
    """The device ran out of memory during a request."""


#: Substrings by which backends (ONNX Runtime, TensorRT, CUDA) report an exhausted allocator.
_OOM_MARKERS = ("out of memory", "failed to allocate memory", "cudaerrormemoryallocation", "out_of_memory")


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is a device (or host) allocation failure, whatever raised it.

    ``torch.OutOfMemoryError`` counts only when torch is loaded (only then can it have been
    raised); backends without an error type of their own are recognised by their message.
    """
    if isinstance(err, DeviceOutOfMemoryError | MemoryError):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err).lower()
    return any(m in text for m in _OOM_MARKERS)


def _location(loc: tuple) -> str:
    out = ""
    for part in loc:
        if part == "[key]":  # a mapping's key failed: the key itself is the last part named
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _problem(error: dict) -> str:
    """Pydantic's message for one field, and the value found when it is a scalar (long ones cut)."""
    if error["type"] == "extra_forbidden":
        return "unknown key (check its spelling)"
    if error["type"] == "value_error":  # the project's own validators: their message names the value
        return error["msg"].removeprefix("Value error, ")
    value = error.get("input")
    if error["type"] == "missing" or isinstance(value, dict | list):
        return error["msg"]
    text = repr(value)
    return f"{error['msg']} (found {text if len(text) <= 80 else text[:77] + '...'})"


def validation_message(err: ValidationError, source: str, limit: int | None = 1) -> str:
    """One line for a pydantic validation error of a file's contents: ``source`` (the file), the
    first ``limit`` bad fields (all with ``None``) as dotted paths (``records.export.details.x``),
    pydantic's message, the scalar value found (long ones cut) and how many more fields are bad."""
    errors = err.errors()
    shown = errors if limit is None else errors[:limit]
    fields = "; ".join(f"field {_location(e['loc'])}: {_problem(e)}" for e in shown)
    more = f"; {len(errors) - len(shown)} more field(s) are invalid" if len(errors) > len(shown) else ""
    return f"{source}: {fields}{more}"


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message, or its class name when it has none (for one-line errors
    that quote a library's multi-line message)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
