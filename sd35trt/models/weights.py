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
from pathlib import Path

from sd35trt.errors import ModelError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def _header(path: Path) -> tuple[int, dict]:
    """``(header length, header)`` of a safetensors file.

    Raises:
        ValueError, struct.error: the header is missing, longer than the file, or not JSON.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise ValueError(f"header length {n} exceeds the file")
        return n, json.loads(f.read(n))


def check_safetensors(path: Path) -> None:
    """Check a safetensors file's header and that its size covers every tensor it declares.

    Raises:
        ModelError: naming the file: a damaged header, or a size that does not match it.
    """
    size = path.stat().st_size
    try:
        n, header = _header(path)
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError) as err:
        raise ModelError(f"safetensors shard {path} is damaged or truncated ({err})") from None
    if size != 8 + n + end:
        raise ModelError(
            f"safetensors shard {path} is truncated or padded: {size} bytes, its header needs {8 + n + end}"
        )


def tensor_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors header (no tensor is read; check the file first)."""
    return {k: list(v["shape"]) for k, v in _header(path)[1].items() if k != "__metadata__"}
