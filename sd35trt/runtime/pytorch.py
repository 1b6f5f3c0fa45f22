"""The runtime over PyTorch modules: the SD3.5 loop of :mod:`sd35trt.runtime.pipeline` on
:class:`~sd35trt.backends.pytorch.TorchEngine` s, for comparing the loop with diffusers' own pipeline
before engines exist."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sd35trt.backends.pytorch import TorchEngine, shared_factory
from sd35trt.components import MODELS, Component, ModelDims, profile, spec
from sd35trt.config import Config
from sd35trt.runtime.pipeline import ModelInfo, Sd35Runtime, engine_digest
from sd35trt.runtime.request import RequestLimits
from sd35trt.runtime.scheduler import FlowMatchEuler
from sd35trt.runtime.steps import EngineSet
from sd35trt.runtime.tokenize import PromptTokenizer


def torch_runtime(
    model_dir: str | Path,
    config: Config,
    *,
    pipe: object | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    low_vram: bool = False,
) -> Sd35Runtime:
    """An :class:`Sd35Runtime` running the diffusers components in PyTorch.

    Request limits follow from ``config.build`` exactly as an engine build's profiles would, and
    the defaults from ``config.runtime``, so this runtime accepts what engines built from the same
    config accept.

    Args:
        model_dir: the diffusers directory (tokenizers, scheduler config, component configs).
        config: the run's config (build ranges, runtime defaults, skip-layer guidance).
        pipe: an already loaded ``StableDiffusion3Pipeline`` to share modules with (nothing is
            loaded then; its modules keep their dtype and whatever LoRAs it holds); otherwise each
            component is loaded from ``model_dir`` when its engine activates, ``model.loras``
            fused.
        device: default CUDA if present, else CPU.
        dtype: dtype to load components in (default: BF16 on CUDA, FP32 on CPU).
        low_vram: load each component only for its stage.

    Returns:
        The runtime.

    Raises:
        ModelError: pickle weights, a truncated shard or a directory that is not SD3.
        ConfigError: the build ranges don't fit the model.
    """
    from sd35trt.config import LoadDtype
    from sd35trt.models.loading import check_weights, default_device, load_model, torch_dtype
    from sd35trt.models.lora import resolve_loras
    from sd35trt.models.modules import wrap

    model_dir = Path(model_dir)
    device = device or default_device()
    loras = ()
    if pipe is None:
        check_weights(model_dir)
        dtype = dtype or torch_dtype(LoadDtype.AUTO, device)
        loras = resolve_loras(config.model.loras, config.model.allow_download)
    dims = ModelDims.from_model_dir(model_dir)
    slg = config.runtime.skip_layer_guidance
    slg_layers = tuple(slg.layers) if slg is not None else ()
    specs, profiles, engines = {}, {}, {}
    for c in Component:
        if c.is_controlnet:  # no ControlNet in the PyTorch runtime yet
            continue
        # every transformer graph but the first-block cache's first block gates the SLG layers
        n_skip = len(slg_layers) if c.is_transformer and c is not Component.TRANSFORMER_FIRST_BLOCK else 0
        specs[c] = spec(c, dims, n_skip)
        profiles[c] = profile(c, dims, config.build, config.runtime.max_sequence_length, skip_layers=n_skip)
        if pipe is not None:
            factory = shared_factory(c, getattr(pipe, MODELS[c].subfolder), slg_layers)
        else:

            def factory(c: Component = c) -> nn.Module:
                return wrap(c, load_model(model_dir, c, dtype, model=config.model, loras=loras), slg_layers)

        engines[c] = TorchEngine(specs[c], factory, device=device, dtype=None if pipe is not None else dtype)
    limits = RequestLimits.from_profiles(specs, profiles, dims, slg)
    digest = engine_digest({"pytorch": [config.digest("model")]})
    info = ModelInfo(dims=dims, limits=limits, defaults=config.runtime, digest=digest)
    tokenizer = PromptTokenizer.load(model_dir, limits.t5_length)
    scheduler = FlowMatchEuler.from_config(model_dir / "scheduler" / "scheduler_config.json")
    return Sd35Runtime(EngineSet(engines, low_vram=low_vram), tokenizer, scheduler, info, device=device)
