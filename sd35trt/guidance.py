"""The guidance rules every stage follows: when classifier-free and skip-layer guidance run.

Calibration, the engine profiles, the runtime, bench, eval and the diffusers reference all ask
these functions, so the rules cannot drift apart. Source: diffusers
``StableDiffusion3Pipeline`` (``do_classifier_free_guidance`` is ``guidance_scale > 1``; the
skip-layer pass runs inside ``if self.do_classifier_free_guidance``). Nothing here imports torch.
"""

from __future__ import annotations

from sd35trt.config import SkipLayerGuidance

#: Classifier-free guidance runs when the scale is above this (diffusers' rule).
CFG_THRESHOLD = 1.0


def cfg_enabled(guidance_scale: float) -> bool:
    """Whether classifier-free guidance runs: a ``[negative, positive]`` batch, ``guidance_scale > 1``."""
    return guidance_scale > CFG_THRESHOLD


def applied_skip_layer_guidance(
    skip_layer_guidance: SkipLayerGuidance | None, guidance_scale: float
) -> SkipLayerGuidance | None:
    """The skip-layer guidance that actually runs: ``skip_layer_guidance`` under CFG, else ``None``.

    Skip-layer guidance adds ``scale * (v_pos - v_skip)`` to the guided velocity; without CFG
    diffusers never runs the skip pass, and neither does sd35trt.
    """
    return skip_layer_guidance if cfg_enabled(guidance_scale) else None
