"""Locating and loading the diffusers pipeline a config names, and each component's model, safely.

Only safetensors weights are loaded: pickle files (``.bin``, ``.pt``, ...) can execute code and
are refused, and every shard's header is checked against its size before anything reads it.
"""

from __future__ import annotations

import json
import struct
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from sd35trt.components import MODELS, Component
from sd35trt.config import Config, LoadDtype, ModelSettings, ModelSource
from sd35trt.errors import ModelError

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusion3Pipeline
    from torch import nn

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


class LoadPurpose(str, Enum):
    """What a component model is loaded for; it picks the load options of the component table."""

    RUN = "run"  # pipelines and the PyTorch backend: the library's default attention
    TRACE = "trace"  # ONNX export: ``ComponentModel.trace_attention``


def load_model(
    model_dir: str | Path,
    component: Component,
    dtype: torch.dtype,
    *,
    device: str = "cpu",
    purpose: LoadPurpose = LoadPurpose.RUN,
    model: ModelSettings | None = None,
) -> nn.Module:
    """One component's diffusers / transformers model, the way every stage loads it.

    The class, subfolder and options come from :data:`sd35trt.components.MODELS`; weights load
    from safetensors straight in ``dtype`` (no float32 copy of a BF16 model), or are drawn from
    ``model.seed`` when ``model.source`` is ``random``. Random weights are drawn on the CPU, so a
    seed gives the same weights whichever device a stage runs on.

    Args:
        model_dir: the diffusers pipeline directory.
        component: which component.
        dtype: the weights' dtype.
        device: where the model goes.
        purpose: ``TRACE`` for ONNX export (eager attention in the text encoders).
        model: the config's model section (only its ``random`` source changes anything).

    Returns:
        The raw model (see :func:`sd35trt.modules.wrap` for its spec-shaped form), in eval mode
        with gradients off.

    Raises:
        ModelError: pickle weights, a truncated shard, or a subfolder that does not load.
    """
    import importlib

    facts = MODELS[component]
    if model is not None and model.source is ModelSource.RANDOM:
        from sd35trt.tiny import build_components

        raw = build_components(model.architecture, model.seed, "cpu", dtype, only={facts.subfolder})
        raw = raw[facts.subfolder]
    else:
        sub = Path(model_dir) / facts.subfolder
        check_weights(sub)
        cls = getattr(importlib.import_module(facts.library.value), facts.class_name)
        options = {"dtype": dtype, "use_safetensors": True}
        if purpose is LoadPurpose.TRACE and facts.trace_attention is not None:
            options["attn_implementation"] = facts.trace_attention
        try:
            raw = cls.from_pretrained(sub, **options)
        except (OSError, ValueError) as err:
            raise ModelError(f"cannot load {component.value} from {sub}: {err}") from None
    raw = raw.to(device).eval()
    raw.requires_grad_(False)
    return raw


def load_pipeline(
    config: Config, run_dir: str | Path, device: str | None = None, dtype: torch.dtype | None = None
) -> StableDiffusion3Pipeline:
    """Load the configured pipeline on ``device`` (default: CUDA if present) in ``dtype``.

    Raises:
        ModelError: pickle weights, a truncated shard, or a directory that is not SD3.
    """
    device = device or default_device()
    dtype = dtype or torch_dtype(config.calibrate.dtype, device)
    return load_pipeline_dir(model_dir(config, run_dir), device, dtype, model=config.model)


def load_pipeline_dir(
    model_dir: str | Path, device: str, dtype: torch.dtype, model: ModelSettings | None = None
) -> StableDiffusion3Pipeline:
    """The diffusers pipeline in ``model_dir`` on ``device``, progress bars off.

    The five models load through :func:`load_model`; diffusers reads only the tokenizers and
    the scheduler config from the directory.

    Raises:
        ModelError: pickle weights, a truncated shard, or a directory that is not SD3.
    """
    from diffusers import StableDiffusion3Pipeline

    root = Path(model_dir)
    check_weights(root)
    models = {MODELS[c].subfolder: load_model(root, c, dtype, device=device, model=model) for c in Component}
    try:
        pipe = StableDiffusion3Pipeline.from_pretrained(root, **models)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load the diffusers pipeline in {root}: {err}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe
