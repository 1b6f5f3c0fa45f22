"""The guidance rules (sd35trt.guidance) and the stages that follow them."""

import pytest

from sd35trt.components import Component
from sd35trt.config import Architecture, SkipLayerGuidance
from sd35trt.guidance import applied_skip_layer_guidance, cfg_enabled
from sd35trt.models.tiny import model_dims

SLG = SkipLayerGuidance(layers=(1,))


@pytest.mark.parametrize(
    ("guidance_scale", "on"), [(0.0, False), (1.0, False), (1.0000001, True), (4.5, True)]
)
def test_cfg_runs_above_one_as_in_diffusers(guidance_scale, on):
    assert cfg_enabled(guidance_scale) is on
    assert applied_skip_layer_guidance(SLG, guidance_scale) == (SLG if on else None)


def test_no_skip_layer_guidance_stays_none():
    assert applied_skip_layer_guidance(None, 4.5) is None


@pytest.mark.parametrize(("guidance_scale", "opt_batch"), [(0.0, 1), (1.0, 1), (3.5, 2)])
def test_build_profile_doubles_the_optimal_batch_only_under_cfg(tiny_config, guidance_scale, opt_batch):
    from sd35trt.stages.build import engine_profile

    cfg = tiny_config.model_copy(
        update={"runtime": tiny_config.runtime.model_copy(update={"guidance_scale": guidance_scale})}
    )
    dims = model_dims(Architecture.TINY)
    shapes = engine_profile(cfg, dims, Component.TRANSFORMER)
    assert shapes["hidden_states"].opt[0] == opt_batch
    # the maximum covers CFG whatever the default, so a request may turn it on
    assert shapes["hidden_states"].max[0] == 2 * tiny_config.build.batch.max


def test_plan_drops_and_warns_about_settings_without_effect():
    """faults.md 25: without CFG the negative prompt and SLG do nothing; they are not used (None,
    so provenance records what ran) and each one the caller asked for is a warning."""
    from sd35trt.config import SkipLayerGuidance
    from sd35trt.guidance import guidance_plan

    slg = SkipLayerGuidance(layers=(1,))
    on = guidance_plan(4.5, "x", slg, negative_requested=True, slg_requested=True)
    assert (on.cfg, on.negative_prompt, on.skip_layer_guidance, on.warnings) == (True, "x", slg, ())
    assert guidance_plan(4.5, "x", slg, slg_requested=False).skip_layer_guidance is None
    off = guidance_plan(1.0, "x", slg, negative_requested=True, slg_requested=True)
    assert (off.cfg, off.negative_prompt, off.skip_layer_guidance) == (False, None, None)
    assert [w.split(" ")[0] for w in off.warnings] == ["negative_prompt", "skip_layer_guidance"]
    # Defaults the caller did not ask for (the engines' negative prompt, SLG as built): no warning.
    assert guidance_plan(0.0, "blurry", slg).warnings == ()
    assert guidance_plan(1.0, "  ", slg, negative_requested=True).warnings == ()
