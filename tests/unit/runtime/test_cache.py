"""The first-block cache's decision, on stand-in engines whose block-0 residual the test sets.

The rule is diffusers' ``FBCHeadBlockHook._should_compute_remaining_blocks``: run the rest when
``mean|r - r_prev| / mean|r_prev| > threshold``, ``r_prev`` being the residual of the last call
in the same context whose rest ran.
"""

from __future__ import annotations

import pytest
import torch

from sd35trt.components import Component, spec
from sd35trt.config import Architecture
from sd35trt.models.tiny import model_dims
from sd35trt.runtime.cache import CFG_CONTEXT, SKIP_LAYERS_CONTEXT, FirstBlockCache, relative_change

DIMS = model_dims(Architecture.TINY)
B, C, H, W = 2, DIMS.latent_channels, 4, 6
TOKENS = (H // DIMS.patch_size) * (W // DIMS.patch_size)


class _First:
    """Block 0 stand-in: its residual is the next queued scale; ``noise_pred`` is -1 (the cached answer)."""

    def __init__(self, scales: list[float]) -> None:
        self.spec = spec(Component.TRANSFORMER_FIRST_BLOCK, DIMS)
        self.scales = list(scales)
        self.kept: list[torch.Tensor] = []

    def infer(self, feeds):
        self.kept.append(feeds["hidden_states_residual"].clone())
        r = torch.full((B, TOKENS, DIMS.inner_dim), self.scales.pop(0))
        return {
            "first_block_residual": r,
            "block_hidden_states": r,
            "block_encoder_hidden_states": torch.zeros(B, 3, DIMS.inner_dim),
            "temb": torch.zeros(B, DIMS.inner_dim),
            "noise_pred": torch.full((B, C, H, W), -1.0),  # the cached answer
        }


class _Rest:
    def __init__(self) -> None:
        self.spec = spec(Component.TRANSFORMER_REST, DIMS, skip_layers=1)
        self.calls = 0

    def infer(self, feeds):
        self.calls += 1
        assert feeds["skip_layers"].shape == (1,)
        residual = torch.full((B, TOKENS, DIMS.inner_dim), float(self.calls))
        return {"noise_pred": torch.full((B, C, H, W), float(self.calls)), "hidden_states_residual": residual}


def _feeds():
    return {
        "hidden_states": torch.zeros(B, C, H, W),
        "encoder_hidden_states": torch.zeros(B, 3, DIMS.joint_attention_dim),
        "pooled_projections": torch.zeros(B, DIMS.pooled_projection_dim),
        "timestep": torch.zeros(B),
        "skip_layers": torch.zeros(1),
    }


def test_relative_change_is_diffusers_formula():
    r, p = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([1.0, 2.0, 2.0])
    assert relative_change(r, p) == pytest.approx((0 + 4 + 1) / 3 / (5 / 3))


def test_skips_below_threshold_against_the_last_computed_call():
    # residual scales: 1 (first call: computes), 1.06 (6% vs 1: skip), 1.12 (12% vs 1: computes,
    # though only 5.7% vs the skipped 1.06), 1.12 (0%: skip), 1.3 (16% vs 1.12: computes)
    first, rest = _First([1.0, 1.06, 1.12, 1.12, 1.3]), _Rest()
    cache = FirstBlockCache(first, rest, threshold=0.1, dims=DIMS)
    cfg = cache.context(CFG_CONTEXT)
    outs = [cfg.infer(_feeds())["noise_pred"][0, 0, 0, 0].item() for _ in range(5)]
    assert outs == [1.0, -1.0, 2.0, -1.0, 3.0]
    assert rest.calls == 3
    assert cache.stats.skipped == {CFG_CONTEXT: [1, 3]} and cache.stats.skipped_steps == 2
    # a skipped call's answer is built on the rest's residual of the last computed call
    assert [k[0, 0, 0].item() for k in first.kept] == [0.0, 1.0, 1.0, 2.0, 2.0]


def test_contexts_keep_their_own_state():
    first, rest = _First([1.0, 3.0, 1.0, 3.0]), _Rest()
    cache = FirstBlockCache(first, rest, threshold=0.1, dims=DIMS)
    cfg, slg = cache.context(CFG_CONTEXT), cache.context(SKIP_LAYERS_CONTEXT)
    for p in (cfg, slg, cfg, slg):  # alternating 1 / 3 would never skip in one shared context
        p.infer(_feeds())
    assert cache.stats.skipped == {CFG_CONTEXT: [1], SKIP_LAYERS_CONTEXT: [1]}
    assert rest.calls == 2


@pytest.mark.parametrize(("threshold", "rest_calls"), [(None, 3), (0.0, 2)])
def test_no_threshold_always_runs_the_rest_and_zero_skips_only_repeats(threshold, rest_calls):
    first, rest = _First([1.0, 1.0 + 1e-6, 1.0 + 1e-6]), _Rest()
    cache = FirstBlockCache(first, rest, threshold=threshold, dims=DIMS)
    for _ in range(3):
        cache.context(CFG_CONTEXT).infer(_feeds())
    assert rest.calls == rest_calls
