"""The guidance rules every stage follows: when classifier-free and skip-layer guidance run.

Source: diffusers ``StableDiffusion3Pipeline`` (``do_classifier_free_guidance`` is
``guidance_scale > 1``; the skip-layer pass runs inside ``if self.do_classifier_free_guidance``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sd35trt.config import CacheSettings, SkipLayerGuidance
from sd35trt.errors import RequestError
from sd35trt.parameters import check_value

#: Classifier-free guidance runs when the scale is above this (diffusers' rule).
CFG_THRESHOLD = 1.0


def cfg_enabled(guidance_scale: float) -> bool:
    """Whether classifier-free guidance runs: a ``[negative, positive]`` batch, ``guidance_scale > 1``."""
    return guidance_scale > CFG_THRESHOLD


def applied_skip_layer_guidance(
    skip_layer_guidance: SkipLayerGuidance | None, guidance_scale: float, image_to_image: bool = False
) -> SkipLayerGuidance | None:
    """The skip-layer guidance that actually runs: ``skip_layer_guidance`` under CFG and not for
    image-to-image (diffusers' ``StableDiffusion3Img2ImgPipeline`` has none), else ``None``."""
    return skip_layer_guidance if cfg_enabled(guidance_scale) and not image_to_image else None


@dataclass(frozen=True)
class GuidancePlan:
    """The guidance a request actually gets (see :func:`guidance_plan`): CFG on (a ``[negative,
    positive]`` batch), the negative prompt and skip-layer guidance used (``None``: not used), and
    one warning per setting the caller asked for that has no effect."""

    cfg: bool
    negative_prompt: str | None
    skip_layer_guidance: SkipLayerGuidance | None
    warnings: tuple[str, ...] = ()


def guidance_plan(
    guidance_scale: float,
    negative_prompt: str,
    skip_layer_guidance: SkipLayerGuidance | None,
    *,
    negative_requested: bool = False,
    slg_requested: bool | None = None,
    image_to_image: bool = False,
) -> GuidancePlan:
    """What a request gets under these rules, and a warning for each explicit setting without effect
    (without CFG, e.g. sd3.5-large-turbo, the negative prompt and skip-layer guidance are not used).

    Args:
        guidance_scale: the validated scale.
        negative_prompt: the negative prompt (requested, or the engines' default).
        skip_layer_guidance: the skip-layer guidance the engines were built for, or ``None``.
        negative_requested: the caller gave a negative prompt (a default draws no warning).
        slg_requested: the caller's explicit choice (``None``: as built; ``False``: off).
        image_to_image: the request starts from an image (no skip-layer guidance).
    """
    slg = applied_skip_layer_guidance(
        None if slg_requested is False else skip_layer_guidance, guidance_scale, image_to_image
    )
    if cfg_enabled(guidance_scale):
        warnings = ()
        if slg_requested and image_to_image and skip_layer_guidance is not None:
            warnings = (
                "skip_layer_guidance has no effect for image-to-image (diffusers' "
                "StableDiffusion3Img2ImgPipeline has none); it was not used",
            )
        return GuidancePlan(True, negative_prompt, slg, warnings)
    why = (
        f"guidance_scale {guidance_scale:g} is at most {CFG_THRESHOLD:g}, so classifier-free guidance is off"
    )
    warnings = []
    if negative_requested and negative_prompt.strip():
        warnings.append(f"negative_prompt has no effect: {why}; it was not used")
    if slg_requested:
        warnings.append(
            f"skip_layer_guidance has no effect: {why} (skip-layer guidance runs only with it); "
            "it was not used"
        )
    return GuidancePlan(False, None, None, tuple(warnings))


def cache_threshold(value: Any, engines_cache: bool, default: CacheSettings | None) -> float | None:
    """A request's first-block cache threshold (:mod:`sd35trt.runtime.cache`): ``value``, else the
    engines' recorded ``default`` when they include the cache's engines, else ``None`` (no cache).

    Raises:
        RequestError: not a number in the bounds of :data:`sd35trt.parameters.PARAMS`
            ``["cache_threshold"]``, or a threshold for engines built without the cache.
    """
    if value is None:
        return default.threshold if default is not None and engines_cache else None
    threshold = check_value("cache_threshold", value)
    if not engines_cache:
        raise RequestError(
            "cache_threshold",
            "cache_threshold was given, but these engines were built without the first-block cache "
            "(set runtime.cache in the config, then export and build again)",
        )
    return threshold
