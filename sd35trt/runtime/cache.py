"""First-block cache over the two transformer engines: skip the rest of the transformer on quiet steps.

diffusers' ``FirstBlockCache`` (``diffusers/hooks/first_block_cache.py``), decided the same way
on engines. Each call runs the first engine (the embeddings and block 0,
:class:`sd35trt.models.modules.TransformerFirstBlock`); its block-0 residual ``r`` (output minus
input, ``[B, T, D]`` over the whole call's batch) is compared with ``r_prev``, the residual of the
last call in the same context whose rest ran::

    mean|r - r_prev| / mean|r_prev|  >  threshold   ->  run the rest engine (and keep r, its residual)
                                     otherwise      ->  reuse the rest's residual of that call

A reused step costs the first engine only: its ``noise_pred`` output is the output layers applied
to block 0's output plus the kept residual, which is what diffusers computes for a skipped step; a
computed step costs one device-to-host read (the decision) and the first engine on top of the rest.
The first call of a context always runs the rest. Contexts are kept apart as diffusers'
``cache_context(name)`` keeps them: the CFG batch (``[negative, positive]`` in one call) is one
context, the skip-layer-guidance pass another.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sd35trt.components import TRANSFORMER_PARTS, Component

if TYPE_CHECKING:  # request validation imports this module without torch
    import torch

    from sd35trt.backends.engine import Engine
    from sd35trt.components import ComponentSpec, ModelDims

#: The context names of the two transformer passes (diffusers' ``cache_context`` names).
CFG_CONTEXT = "cond"
SKIP_LAYERS_CONTEXT = "skip_layers"


def relative_change(residual: torch.Tensor, previous: torch.Tensor) -> float:
    """diffusers' ``_should_compute_remaining_blocks`` quantity: ``mean|r - r_prev| / mean|r_prev|``.

    Computed in float32 (in the engines' dtype when that is float32, so FP32 engines give diffusers'
    exact value); 16-bit engine outputs are widened first.
    """
    r, p = residual.float(), previous.float()
    return ((r - p).abs().mean() / p.abs().mean()).item()


@dataclass
class _State:
    """One context's cache: block 0's residual and the rest's residual of its last computed call."""

    first_block_residual: torch.Tensor | None = None
    hidden_states_residual: torch.Tensor | None = None


@dataclass
class CacheStats:
    """What a generation's cache did, per context: its calls, and which of them skipped the rest.

    The calls of the CFG context are the denoising steps; those of the skip-layer context count
    from the first step of the skip-layer window.
    """

    calls: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, list[int]] = field(default_factory=dict)

    @property
    def skipped_steps(self) -> int:
        """Denoising steps whose transformer work (the CFG pass's rest) was skipped."""
        return len(self.skipped.get(CFG_CONTEXT, []))


class FirstBlockCache:
    """The two transformer engines behind one ``infer`` per context, deciding per call.

    Args:
        first: the active ``transformer_first_block`` engine.
        rest: the active ``transformer_rest`` engine.
        threshold: diffusers' ``FirstBlockCacheConfig.threshold``; ``None`` always runs both
            engines (no decision, no host read), 0 skips only an exactly repeated residual.
        dims: the model sizes (patch size and token width, for the first call's empty residual).
    """

    def __init__(self, first: Engine, rest: Engine, threshold: float | None, dims: ModelDims) -> None:
        self.first, self.rest, self.threshold, self.dims = first, rest, threshold, dims
        self.states: dict[str, _State] = {}
        self.stats = CacheStats()

    def context(self, name: str) -> CachedPass:
        """The pass called ``name``: an engine-like object with the rest engine's inputs."""
        return CachedPass(self, name)

    def infer(self, name: str, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One transformer call in context ``name``: ``{"noise_pred": [B, C, h, w]}``.

        ``feeds`` are the whole transformer's (``hidden_states``, ``encoder_hidden_states``,
        ``pooled_projections``, ``timestep``, and ``skip_layers`` when the rest gates blocks).
        """
        import torch

        state = self.states.setdefault(name, _State())
        latents = feeds["hidden_states"]  # [B, C, h, w]
        kept = state.hidden_states_residual
        if kept is None:  # nothing kept yet: the first engine's cached output is unused
            b, _, h, w = latents.shape
            p = self.dims.patch_size
            tokens = (h // p) * (w // p)
            kept = torch.zeros((b, tokens, self.dims.inner_dim), device=latents.device)  # [B, T, D]
        head = self.first.infer(
            {
                "hidden_states": latents,
                "encoder_hidden_states": feeds["encoder_hidden_states"],
                "pooled_projections": feeds["pooled_projections"],
                "timestep": feeds["timestep"],
                "hidden_states_residual": kept,
            }
        )
        residual = head["first_block_residual"]  # [B, T, D]
        index = self.stats.calls.get(name, 0)
        self.stats.calls[name] = index + 1
        if (
            self.threshold is not None
            and state.first_block_residual is not None
            and relative_change(residual, state.first_block_residual) <= self.threshold
        ):
            self.stats.skipped.setdefault(name, []).append(index)
            return {"noise_pred": head["noise_pred"]}
        rest_feeds = {
            "hidden_states": latents,
            "block_hidden_states": head["block_hidden_states"],
            "block_encoder_hidden_states": head["block_encoder_hidden_states"],
            "temb": head["temb"],
        }
        if "skip_layers" in self.rest.spec.input_names:
            rest_feeds["skip_layers"] = feeds["skip_layers"]
        out = self.rest.infer(rest_feeds)
        state.first_block_residual = residual
        state.hidden_states_residual = out["hidden_states_residual"]
        return {"noise_pred": out["noise_pred"]}


@dataclass
class CachedPass:
    """One context of a :class:`FirstBlockCache`, called like the whole transformer's engine."""

    cache: FirstBlockCache
    name: str

    @property
    def spec(self) -> ComponentSpec:
        """The rest engine's spec: its ``skip_layers`` input is the pass's."""
        return self.cache.rest.spec

    def infer(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.cache.infer(self.name, feeds)


@dataclass
class Passes:
    """What the denoising loop calls: the CFG pass, the skip-layer pass (``None``: the CFG pass's
    engine), and the first-block cache behind them (``None``: the whole transformer engine)."""

    cfg: Any
    slg: Any = None
    cache: FirstBlockCache | None = None

    @property
    def skipped_calls(self) -> int:
        """Transformer calls, all passes, that skipped the rest."""
        return 0 if self.cache is None else sum(len(v) for v in self.cache.stats.skipped.values())

    @property
    def skipped_steps(self) -> int:
        """Denoising steps whose CFG pass skipped the rest (:attr:`CacheStats.skipped_steps`)."""
        return 0 if self.cache is None else self.cache.stats.skipped_steps


@contextlib.contextmanager
def transformer_passes(engines: Any, threshold: float | None, dims: ModelDims) -> Iterator[Passes]:
    """The transformer passes of one generation over ``engines`` (a ``steps.EngineSet``), active inside.

    The whole transformer engine when there is one and no threshold; else the two first-block-cache
    engines behind a :class:`FirstBlockCache` (``threshold`` ``None``: both always run).
    """
    if threshold is None and Component.TRANSFORMER in engines.engines:
        with engines.use(Component.TRANSFORMER) as transformer:
            yield Passes(transformer)
        return
    first_part, rest_part = TRANSFORMER_PARTS
    with engines.use(first_part) as first, engines.use(rest_part) as rest:
        cache = FirstBlockCache(first, rest, threshold, dims)
        yield Passes(cache.context(CFG_CONTEXT), cache.context(SKIP_LAYERS_CONTEXT), cache)
