"""The PyTorch reference backend: each component's spec-shaped module as an :class:`Engine`.

It runs :func:`sd35trt.models.modules.wrap` of the diffusers components, with exactly the I/O of
the exported graphs, so the runtime loop runs on it unchanged: to compare the loop with diffusers'
own pipeline (they must agree to float32 rounding), and as the baseline of bench and eval.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from sd35trt.backends.engine import Engine
from sd35trt.components import Component, ComponentSpec, TensorType

if TYPE_CHECKING:
    from torch import nn

ModuleFactory = Callable[[], "nn.Module"]


class TorchEngine(Engine):
    """One component as a PyTorch module: ``activate`` calls the factory and moves the module to
    ``device``; ``deactivate`` drops it."""

    def __init__(
        self,
        spec: ComponentSpec,
        factory: ModuleFactory,
        *,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> None:
        """``dtype``: of the module and its float inputs; ``None`` keeps the module's own (a module
        shared with a diffusers pipeline is then left untouched)."""
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


def shared_factory(component: Component, model: object, slg_layers: Sequence[int]) -> ModuleFactory:
    """A factory that wraps ``model`` once: wrapping again would stack gating hooks on its blocks."""
    from sd35trt.models.modules import wrap

    cache: list[nn.Module] = []

    def factory() -> nn.Module:
        if not cache:
            cache.append(wrap(component, model, slg_layers))
        return cache[0]

    return factory
