"""The runtime over PyTorch modules: the SD3.5 loop of :mod:`sd35trt.runtime.pipeline` on
:class:`~sd35trt.backends.pytorch.TorchEngine` s, for comparing the loop with diffusers' own pipeline."""

from __future__ import annotations

from pathlib import Path

from sd35trt.backends.pytorch import TorchEngine, shared_factory
from sd35trt.components import MODELS, Component, ModelDims, profile, spec
from sd35trt.config import Config
from sd35trt.runtime.pipeline import ModelInfo, Sd35Runtime, engine_digest
from sd35trt.runtime.request import RequestLimits
from sd35trt.runtime.scheduler import FlowMatchEuler
from sd35trt.runtime.steps import EngineSet
from sd35trt.runtime.tokenize import PromptTokenizer


def torch_runtime(
    model_dir: str | Path, config: Config, pipe: object, *, device: str | None = None
) -> Sd35Runtime:
    """An :class:`Sd35Runtime` running the modules of a loaded diffusers pipeline in PyTorch.

    Request limits follow from ``config.build`` exactly as an engine build's profiles would, and
    the defaults from ``config.runtime``, so this runtime accepts what engines built from the same
    config accept.

    Args:
        model_dir: the diffusers directory (tokenizers, scheduler config, component configs).
        config: the run's config (build ranges, runtime defaults, skip-layer guidance).
        pipe: the loaded ``StableDiffusion3Pipeline`` whose modules the engines share (they keep
            their dtype and whatever LoRAs it holds).
        device: default CUDA if present, else CPU.

    Raises:
        ModelError: a directory that is not SD3.
        ConfigError: the build ranges don't fit the model.
    """
    from sd35trt.models.loading import default_device

    model_dir = Path(model_dir)
    device = device or default_device()
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
        factory = shared_factory(c, getattr(pipe, MODELS[c].subfolder), slg_layers)
        engines[c] = TorchEngine(specs[c], factory, device=device)
    limits = RequestLimits.from_profiles(specs, profiles, dims, slg)
    digest = engine_digest({"pytorch": [config.digest("model")]})
    info = ModelInfo(dims=dims, limits=limits, defaults=config.runtime, digest=digest)
    tokenizer = PromptTokenizer.load(model_dir, limits.t5_length)
    scheduler = FlowMatchEuler.from_config(model_dir / "scheduler" / "scheduler_config.json")
    return Sd35Runtime(EngineSet(engines), tokenizer, scheduler, info, device=device)
