"""Weight files on disk: pickle refused, safetensors headers read and checked before any load.

Pickle files (``.bin``, ``.pt``, ...) can execute code when loaded, so sd35trt never reads them.
A safetensors file is an 8-byte header length, a JSON header (tensor name -> dtype, shape, byte
offsets) and the tensor bytes; reading the header costs a few KB, so every file is checked against
its size before a loader sees it, and a truncated download is named instead of failing deep in a
library. Model directories (:mod:`sd35trt.models.loading`) and LoRA files
(:mod:`sd35trt.models.lora`) use this.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from sd35trt.errors import ModelError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
#: A safetensors header is JSON of a few KB to a few MB; beyond this it is not one (safetensors' own
#: reader refuses headers over 100 MB).
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header.

    Attributes:
        dtype: safetensors' name (``F32``, ``BF16``, ``I8``, ``BOOL``, ...).
        shape: the tensor's shape.
        data_offsets: ``(begin, end)`` byte offsets into the data after the header.
    """

    dtype: str
    shape: tuple[int, ...]
    data_offsets: tuple[int, int]


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry(path: Path, key: object, value: object) -> TensorEntry:
    def bad(what: str) -> ModelError:
        return ModelError(f"safetensors file {path} has a malformed header: key {key!r} {what}")

    if not isinstance(key, str):
        raise bad("is not a string")
    if not isinstance(value, dict):
        raise bad(f"maps to a JSON {type(value).__name__}, not an object with dtype, shape and data_offsets")
    dtype, shape, offsets = value.get("dtype"), value.get("shape"), value.get("data_offsets")
    if not isinstance(dtype, str):
        raise bad(f"has dtype {dtype!r}, not a string")
    if not isinstance(shape, list) or not all(_count(d) for d in shape):
        raise bad(f"has shape {shape!r}, not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_count(o) for o in offsets):
        raise bad(f"has data_offsets {offsets!r}, not two non-negative integers")
    if offsets[0] > offsets[1]:
        raise bad(f"has data_offsets {offsets!r}, which end before they begin")
    return TensorEntry(dtype, tuple(shape), (offsets[0], offsets[1]))


def read_header(path: Path) -> tuple[int, dict[str, TensorEntry]]:
    """``(header length in bytes, tensor name -> entry)`` of a safetensors file (``__metadata__``
    left out); no tensor bytes are read.

    Raises:
        ModelError: naming the file (and the key, for a malformed entry): the file is shorter than
            its header, the header is not JSON or not a JSON object, or an entry lacks a string
            dtype, a shape of non-negative integers or two ordered data offsets.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ModelError(f"safetensors file {path} is damaged or truncated ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", prefix)
        if n > size - 8 or n > MAX_HEADER_BYTES:
            raise ModelError(
                f"safetensors file {path} is damaged or truncated (header length {n}, file {size} bytes)"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ModelError(
            f"safetensors file {path} is damaged or truncated (header is not JSON: {err})"
        ) from None
    if not isinstance(header, dict):
        raise ModelError(
            f"safetensors file {path} has a malformed header: a JSON {type(header).__name__}, not an object"
        )
    return n, {k: _entry(path, k, v) for k, v in header.items() if k != "__metadata__"}


def check_safetensors(path: Path) -> None:
    """Check a safetensors file's header and that its size covers every tensor it declares.

    Raises:
        ModelError: naming the file: a damaged or malformed header (the key is named), or a size
            that does not match it.
    """
    size = path.stat().st_size
    n, entries = read_header(path)
    end = max((e.data_offsets[1] for e in entries.values()), default=0)
    if size != 8 + n + end:
        raise ModelError(
            f"safetensors shard {path} is truncated or padded: {size} bytes, its header needs {8 + n + end}"
        )
