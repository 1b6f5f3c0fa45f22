"""The PyTorch reference backend: each component's spec-shaped module as an :class:`Engine`.

It runs :func:`sd35trt.models.modules.wrap` of the diffusers components (loaded by
:func:`sd35trt.models.loading.load_model`, as every stage loads them), so it has exactly the I/O of
the exported graphs, and the runtime loop can run on it unchanged: to develop the loop before
engines exist, to compare the loop with diffusers' own pipeline (they must agree to float32
rounding), and as the baseline of bench and eval. This is the only runtime module that imports
diffusers, and only when a component is loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sd35trt.backends.engine import Engine
from sd35trt.components import MODELS, Component, ComponentSpec, ModelDims, TensorType, profile, spec
from sd35trt.config import Config
from sd35trt.runtime.pipeline import ModelInfo, Sd35Runtime, engine_digest
from sd35trt.runtime.request import RequestLimits
from sd35trt.runtime.scheduler import FlowMatchEuler
from sd35trt.runtime.steps import EngineSet
from sd35trt.runtime.tokenize import PromptTokenizer

if TYPE_CHECKING:
    from torch import nn

ModuleFactory = Callable[[], "nn.Module"]


class TorchEngine(Engine):
    """One component as a PyTorch module behind the engine interface.

    ``activate`` calls the factory (loading weights if it does so) and moves the module to the
    device; ``deactivate`` drops it.
    """

    def __init__(
        self,
        spec: ComponentSpec,
        factory: ModuleFactory,
        *,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> None:
        """
        Args:
            spec: the component's I/O contract.
            factory: returns the spec-shaped module (e.g. ``modules.wrap(component, model)``).
            device: where the module runs.
            dtype: float dtype of the module and its float inputs; ``None`` keeps the module's own
                (a module shared with a diffusers pipeline is then left untouched).
        """
        super().__init__(spec)
        self.factory = factory
        self.device = torch.device(device)
        self.dtype = dtype
        self._module: nn.Module | None = None
        self._float_dtype = dtype or torch.float32

    def _activate_impl(self) -> None:
        module = self.factory().eval()
        if self.dtype is not None:
            module = module.to(self.device, self.dtype)
        else:
            module = module.to(self.device)
            self._float_dtype = next(module.parameters()).dtype
        self._module = module

    def _infer_impl(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        assert self._module is not None  # the base class calls this only when active
        dtypes = {
            TensorType.FLOAT: self._float_dtype,
            TensorType.FLOAT32: torch.float32,
            TensorType.INT64: torch.int64,
        }
        args = [feeds[t.name].to(self.device, dtypes[t.dtype]) for t in self.spec.inputs]
        with torch.inference_mode():
            out = self._module(*args)
        outputs = out if isinstance(out, tuple) else (out,)
        return dict(zip(self.spec.output_names, outputs, strict=True))

    def _deactivate_impl(self) -> None:
        self._module = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _shared(component: Component, model: object, slg_layers: Sequence[int]) -> ModuleFactory:
    """A factory that wraps ``model`` once: wrapping again would stack gating hooks on its blocks."""
    from sd35trt.models.modules import wrap

    cache: list[nn.Module] = []

    def factory() -> nn.Module:
        if not cache:
            cache.append(wrap(component, model, slg_layers))
        return cache[0]

    return factory


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
        n_skip = len(slg_layers) if c is Component.TRANSFORMER else 0
        specs[c] = spec(c, dims, n_skip)
        profiles[c] = profile(c, dims, config.build, config.runtime.max_sequence_length, skip_layers=n_skip)
        if pipe is not None:
            factory = _shared(c, getattr(pipe, MODELS[c].subfolder), slg_layers)
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
