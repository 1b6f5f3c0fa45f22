"""Locating and loading the diffusers pipeline a config names, safely.

Only safetensors weights are loaded: pickle files (``.bin``, ``.pt``, ...) can execute code and
are refused, and every shard's header is checked against its size before anything reads it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from sd35trt.config import Config, LoadDtype, ModelSource
from sd35trt.errors import ModelError

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusion3Pipeline

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MODEL_SUBDIR = "model"


def check_weights(model_dir: str | Path) -> list[Path]:
    """Refuse pickle weights and truncated safetensors shards below ``model_dir``.

    Returns:
        The safetensors files found.

    Raises:
        ModelError: naming the pickle file or the damaged shard.
    """
    root = Path(model_dir)
    for p in sorted(root.rglob("*")):
        if p.suffix in PICKLE_SUFFIXES and p.is_file():
            raise ModelError(
                f"{p} is a pickle weight file; sd35trt loads safetensors only "
                "(convert it, or remove it if a .safetensors copy exists)"
            )
    shards = sorted(root.rglob("*.safetensors"))
    for shard in shards:
        check_safetensors(shard)
    return shards


def check_safetensors(path: Path) -> None:
    """Check a safetensors file's header and that its size covers every tensor it declares."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError) as err:
        raise ModelError(f"safetensors shard {path} is damaged or truncated ({err})") from None
    if size != 8 + n + end:
        raise ModelError(
            f"safetensors shard {path} is truncated or padded: {size} bytes, its header needs {8 + n + end}"
        )


def torch_dtype(setting: LoadDtype, device: str) -> torch.dtype:
    import torch

    if setting is LoadDtype.AUTO:
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return {LoadDtype.FP32: torch.float32, LoadDtype.BF16: torch.bfloat16}[setting]


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def model_dir(config: Config, run_dir: str | Path) -> Path:
    """The diffusers directory for ``config``, materializing the built-in ones under the run dir.

    - ``tiny``: the built-in pipeline, written to ``<run_dir>/model`` on first use.
    - ``local``: ``model.path`` as given.
    - ``random``: configs, tokenizers and scheduler only (weights are drawn at load time).

    Raises:
        ModelError: a local directory is missing or not a diffusers pipeline.
    """
    m = config.model
    if m.source is ModelSource.LOCAL:
        path = Path(m.path)
        if not (path / "model_index.json").is_file():
            raise ModelError(
                f"model.path {path} is not a diffusers pipeline directory (no model_index.json); "
                "point it at a local copy of an SD3.5 repository"
            )
        return path
    path = Path(run_dir) / MODEL_SUBDIR
    stamp = path / "sd35trt_model.json"
    wanted = {"source": m.source.value, "architecture": m.architecture.value, "seed": m.seed}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return path
    if m.source is ModelSource.TINY:
        from sd35trt.tiny import write_tiny

        write_tiny(path, m.seed)
    else:
        from sd35trt.tiny import write_architecture

        write_architecture(path, m.architecture)
    (path / "sd35trt_model.json").write_text(json.dumps(wanted))
    return path


def load_pipeline(
    config: Config, run_dir: str | Path, device: str | None = None, dtype: torch.dtype | None = None
) -> StableDiffusion3Pipeline:
    """Load the configured pipeline on ``device`` (default: CUDA if present) in ``dtype``.

    Raises:
        ModelError: pickle weights, a truncated shard, or a directory that is not SD3.
    """
    from diffusers import StableDiffusion3Pipeline

    device = device or default_device()
    dtype = dtype or torch_dtype(config.calibrate.dtype, device)
    root = model_dir(config, run_dir)
    if config.model.source is ModelSource.RANDOM:
        from sd35trt.tiny import build_components

        return StableDiffusion3Pipeline(
            **build_components(config.model.architecture, config.model.seed, device=device, dtype=dtype)
        )
    return load_pipeline_dir(root, device, dtype)


def load_pipeline_dir(model_dir: str | Path, device: str, dtype: torch.dtype) -> StableDiffusion3Pipeline:
    """The diffusers pipeline in ``model_dir`` (safetensors only) on ``device``, progress bars off.

    Raises:
        ModelError: pickle weights, a truncated shard, or a directory that is not SD3.
    """
    from diffusers import StableDiffusion3Pipeline

    root = Path(model_dir)
    check_weights(root)
    try:
        pipe = StableDiffusion3Pipeline.from_pretrained(root, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load the diffusers pipeline in {root}: {err}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
