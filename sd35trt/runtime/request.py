"""Generation requests and their validation against what the engines accept.

A :class:`GenerationRequest` holds what a caller asked for (``None`` = the engines' default);
:func:`resolve_request` checks it against the :class:`RequestLimits` read from the engine manifest
and returns the :class:`GenerationParams` actually used; every problem is a
:class:`~sd35trt.errors.RequestError` naming the field, the value found and what is allowed.
Image-to-image follows diffusers' ``StableDiffusion3Img2ImgPipeline`` (no skip-layer guidance).
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from sd35trt.artifacts.repair import REBUILD
from sd35trt.components import (
    Component,
    ComponentSpec,
    ModelDims,
    ShapeRange,
    engine_components,
    transformer_engine,
)
from sd35trt.config import ControlType, RuntimeSettings, SkipLayerGuidance
from sd35trt.errors import ManifestError, RequestError
from sd35trt.guidance import cache_threshold, cfg_enabled, guidance_plan
from sd35trt.parameters import DEFAULT_STRENGTH, GENERATION_PARAMS, MAX_SEED, check_value
from sd35trt.runtime.control import resolve_control
from sd35trt.runtime.images import MAX_IMAGE_PIXELS

if TYPE_CHECKING:
    from sd35trt.artifacts.engine_manifest import EngineManifest

#: Seeds drawn for a request stay below 2^53, so a client that keeps numbers as float64
#: (JavaScript's ``Number``, many JSON libraries) reads back and resubmits the same seed.
DRAWN_SEED_LIMIT = 2**53
#: Images one request may ask for unless the runtime is given another limit
#: (``Sd35Runtime.load(max_images=...)``, ``serve --max-images``, ``triton --max-images``). More
#: than the engine batch run as several engine batches, one after the other.
DEFAULT_MAX_IMAGES = 16


@dataclass(frozen=True)
class EngineBatch:
    """The engine batch a request ran in; recorded in its PNGs.

    The same seed gives the same pixels for the same engine batch; in a larger batch the engines
    may choose other kernels, and pixels may differ by about 1/255. ``first_image``: the position
    of this request's first image in the batch.
    """

    requests: int = 1
    images: int = 1
    first_image: int = 0

    def to_json(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class GenerationRequest:
    """What a caller asks for; ``None`` fields take the defaults recorded with the engines.

    The fields are the declared parameters (:data:`sd35trt.parameters.GENERATION_PARAMS`: meaning,
    bounds, aliases); ``image`` is a PIL image (any mode and size: :func:`read_image`). Image ``i``
    of a request uses seed ``seed + i`` (as diffusers given one generator per image); more images
    than the engine batch run as several engine batches (up to the runtime's ``max_images``).
    """

    prompt: str
    negative_prompt: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    seed: int | None = None
    num_images: int = 1
    skip_layer_guidance: bool | None = None
    image: Any = None
    strength: float | None = None
    cache_threshold: float | None = None
    # ControlNet conditioning, one value or a list of one per ControlNet used: sd35trt.runtime.control
    control_image: Any = None
    control_type: str | Sequence[str] | None = None
    controlnet_conditioning_scale: float | Sequence[float] | None = None
    control_guidance_start: float | Sequence[float] | None = None
    control_guidance_end: float | Sequence[float] | None = None


@dataclass(frozen=True)
class GenerationParams:
    """The parameters a generation runs with: a validated request, defaults filled in.

    What is recorded is what was used: without classifier-free guidance ``negative_prompt`` and
    ``skip_layer_guidance`` are ``None``, and ``warnings`` says which requested settings were
    dropped (they are not part of the recorded parameters).
    """

    prompt: str
    negative_prompt: str | None
    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int
    seed: int
    num_images: int
    #: the skip-layer guidance applied, or ``None`` (not built, turned off, no CFG, or image-to-image).
    skip_layer_guidance: SkipLayerGuidance | None = None
    #: image-to-image: the RGB image at ``width`` x ``height``, and the strength used.
    image: Any = field(default=None, compare=False, repr=False)
    strength: float | None = None
    #: sha256 of ``image``'s RGB pixels (recorded instead of the image).
    image_sha256: str | None = None
    #: requested settings that have no effect (e.g. a negative prompt without CFG).
    warnings: tuple[str, ...] = field(default=(), compare=False)
    #: a part of a larger request (:func:`sd35trt.runtime.parts.engine_parts`): its first image's
    #: index in the request, and the request's ``num_images`` (``None``: not a part).
    first_image: int = 0
    request_images: int | None = None
    cache_threshold: float | None = None  # None: no first-block cache; once generated, the steps it skipped:
    cache_skipped_steps: int | None = field(default=None, compare=False)
    #: ControlNet conditioning: a ``sd35trt.runtime.control.ControlParams`` per ControlNet used.
    control: tuple = ()

    @property
    def cfg(self) -> bool:
        """Whether classifier-free guidance runs (a ``[negative, positive]`` batch)."""
        return cfg_enabled(self.guidance_scale)

    @property
    def denoising_steps(self) -> int:
        """The steps that run: ``num_inference_steps``, or the part ``strength`` keeps (image-to-image)."""
        n = self.num_inference_steps
        return n if self.strength is None else img2img_steps(n, self.strength)[1]

    @property
    def batch_key(self) -> tuple:
        """Generations with equal keys can share one engine batch (images may differ, strengths not)."""
        return (
            self.height,
            self.width,
            self.num_inference_steps,
            self.guidance_scale,
            self.skip_layer_guidance,
            self.strength,
            self.cache_threshold,  # the cache decides per engine call, for the whole batch
            self.control,
        )

    def to_json(self) -> dict[str, Any]:
        """The parameters as recorded (PNG text chunk, HTTP ``parameters``); warnings excluded."""
        skipped = (
            "image",
            "strength",
            "image_sha256",
            "warnings",
            "first_image",
            "request_images",
            "control",
        )
        # Not dataclasses.asdict: it would deep-copy the image.
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skipped}
        if self.request_images is not None:  # a part reports the whole request
            data["seed"] = self.seed - self.first_image
            data["num_images"] = self.request_images
        slg = self.skip_layer_guidance
        data["skip_layer_guidance"] = slg.model_dump(mode="json") if slg is not None else None
        if self.image_sha256 is not None:
            data["strength"] = self.strength
            data["init_image_sha256"] = self.image_sha256  # the field the image came in, everywhere
        if self.control:
            data["controlnets"] = [c.to_json() for c in self.control]
        return data


def img2img_steps(steps: int, strength: float) -> tuple[int, int]:
    """``(first step, steps that run)`` of an image-to-image generation.

    diffusers' ``StableDiffusion3Img2ImgPipeline.get_timesteps``, in the same float arithmetic:
    ``t_start = int(max(steps - min(steps * strength, steps), 0))``.
    """
    start = int(max(steps - min(steps * strength, steps), 0))
    return start, steps - start


def _axis(spec: ComponentSpec, profile: Mapping[str, ShapeRange], axis: str) -> tuple[int, int]:
    """``(min, max)`` of the symbolic ``axis`` over the inputs of one engine's profile."""
    lo, hi = 1, math.inf
    found = False
    for t in spec.inputs:
        if axis in t.shape:
            if t.name not in profile:
                raise ManifestError(f"the {spec.component.value} engine has no profile for input {t.name}")
            r, i = profile[t.name], t.shape.index(axis)
            a, b = r.min[i], r.max[i]
            lo, hi, found = max(lo, a), min(hi, b), True
    if not found:
        raise ValueError(f"{spec.component.value} has no axis {axis!r}")
    return lo, int(hi)


@dataclass(frozen=True)
class RequestLimits:
    """What the engines accept, read from their optimization profiles.

    Every pair is ``(min, max)``; ``height`` / ``width`` in pixels (transformer and VAE profiles
    intersected), multiples of ``size_multiple`` (VAE factor x patch size); ``encoder_batch``: what
    all three text encoders accept; ``img2img_size``: ``(height, width)`` ranges the VAE encoder
    allows too (``None`` without one); ``max_images``: the runtime's setting, not the engines'.
    """

    height: tuple[int, int]
    width: tuple[int, int]
    size_multiple: int
    transformer_batch: tuple[int, int]
    decoder_batch: tuple[int, int]
    encoder_batch: tuple[int, int]
    t5_length: int
    skip_layer_guidance: SkipLayerGuidance | None
    img2img_size: tuple[tuple[int, int], tuple[int, int]] | None = None
    img2img_batch: tuple[int, int] | None = None
    max_images: int = DEFAULT_MAX_IMAGES
    cache: bool = False  # the engines include the first-block cache's two transformer engines
    #: the control types of the engines' ControlNets, in their order (empty without one).
    controlnets: tuple[ControlType, ...] = ()

    @classmethod
    def from_profiles(
        cls,
        specs: Mapping[Component, ComponentSpec],
        profiles: Mapping[Component, Mapping[str, ShapeRange]],
        dims: ModelDims,
        skip_layer_guidance: SkipLayerGuidance | None,
    ) -> RequestLimits:
        """Derive the limits from each engine's spec and optimization profile.

        ``skip_layer_guidance``: the runtime defaults' SLG when the transformer engine has a
        ``skip_layers`` input, else ``None``.

        Raises:
            ManifestError: an engine's profile lacks an input or is empty, or T5's length is not static.
        """
        tr, vae = transformer_engine(specs), Component.VAE_DECODER
        s = dims.vae_scale_factor
        sizes = {}
        for axis in ("latent_height", "latent_width"):
            a = _axis(specs[tr], profiles[tr], axis)
            b = _axis(specs[vae], profiles[vae], axis)
            sizes[axis] = (max(a[0], b[0]) * s, min(a[1], b[1]) * s)
        enc = [
            _axis(specs[c], profiles[c], "batch") for c in (Component.CLIP_L, Component.CLIP_G, Component.T5)
        ]
        t5_min, t5_max = _axis(specs[Component.T5], profiles[Component.T5], "t5_length")
        if t5_min != t5_max:
            raise ManifestError(
                f"the t5 engine's sequence length must be static, its profile allows {t5_min}..{t5_max}"
            )
        img2img_size = img2img_batch = None
        enc_vae = Component.VAE_ENCODER
        if enc_vae in specs:
            spans = []
            for axis, pixels in (("latent_height", "height"), ("latent_width", "width")):
                a = _axis(specs[enc_vae], profiles[enc_vae], axis)
                b = _axis(specs[enc_vae], profiles[enc_vae], pixels)
                lo, hi = sizes[axis]
                spans.append((max(lo, a[0] * s, b[0]), min(hi, a[1] * s, b[1])))
            img2img_size = (spans[0], spans[1])
            img2img_batch = _axis(specs[enc_vae], profiles[enc_vae], "batch")
        limits = cls(
            height=sizes["latent_height"],
            width=sizes["latent_width"],
            size_multiple=dims.size_multiple,
            transformer_batch=_axis(specs[tr], profiles[tr], "batch"),
            decoder_batch=_axis(specs[vae], profiles[vae], "batch"),
            encoder_batch=(max(lo for lo, _ in enc), min(hi for _, hi in enc)),
            t5_length=t5_min,
            skip_layer_guidance=skip_layer_guidance,
            img2img_size=img2img_size,
            img2img_batch=img2img_batch,
            cache=Component.TRANSFORMER_FIRST_BLOCK in specs and Component.TRANSFORMER_REST in specs,
        )
        for name in ("height", "width", "transformer_batch", "decoder_batch", "encoder_batch"):
            lo, hi = getattr(limits, name)
            if lo > hi:
                raise ManifestError(f"the engines' profiles leave no valid {name} (min {lo} > max {hi})")
        return limits

    @classmethod
    def from_manifest(cls, manifest: EngineManifest, skip_layer_guidance: bool = True) -> RequestLimits:
        """The limits of the engines an engine manifest records.

        ``skip_layer_guidance=False``: ignore the recorded SLG (which only lowers the minimum batch).

        Raises:
            ManifestError: as :meth:`from_profiles`, or the recorded skip-layer guidance does not
                match the layers the transformer engine gates.
        """
        components = engine_components(manifest.engines)
        # the engine that gates skip-layer guidance: the whole transformer, or the rest of it
        gated_by = (
            Component.TRANSFORMER if Component.TRANSFORMER in components else Component.TRANSFORMER_REST
        )
        gated = manifest.record(gated_by).skip_layers
        slg = manifest.runtime_defaults.skip_layer_guidance if gated and skip_layer_guidance else None
        if slg is not None and len(slg.layers) != gated:
            raise ManifestError(
                f"{manifest.directory}: the runtime defaults skip {len(slg.layers)} layers, the transformer "
                f"engine gates {gated}; {REBUILD}"
            )
        limits = cls.from_profiles(
            {c: manifest.spec(c) for c in components},
            {c: manifest.record(c).profile for c in components},
            manifest.dims,
            slg,
        )
        built = tuple(c.control_type for c in manifest.engines if c.is_controlnet)
        return replace(limits, controlnets=built)

    def images(self, cfg: bool, slg: bool = False) -> tuple[int, int]:
        """``(min, max)`` images per batch.

        The transformer sees twice as many rows under CFG, and the images alone in the SLG pass.
        """
        t_lo, t_hi = self.transformer_batch
        per = 2 if cfg else 1
        lo = max(self.decoder_batch[0], -(-t_lo // per), t_lo if slg else 1)
        return lo, min(self.decoder_batch[1], t_hi // per)

    def images_per_batch(self, params: GenerationParams) -> int:
        """Most images of ``params``' kind one engine batch holds (image-to-image: one encoder row each)."""
        hi = self.images(params.cfg, params.skip_layer_guidance is not None)[1]
        if params.image is not None and self.img2img_batch is not None:
            hi = min(hi, self.img2img_batch[1])
        return hi

    def to_json(self) -> dict[str, Any]:
        """The limits as plain JSON (e.g. for a server's readiness answer)."""
        slg = self.skip_layer_guidance
        return {
            "height": list(self.height),
            "width": list(self.width),
            "size_multiple": self.size_multiple,
            "num_images": {"cfg": list(self.images(True)), "no_cfg": list(self.images(False))},
            "num_images_per_request": [1, self.max_images],
            **{p.name: [p.low, p.high] for p in GENERATION_PARAMS if p.high is not None and not p.low_open},
            "t5_length": self.t5_length,
            "skip_layer_guidance": slg.model_dump(mode="json") if slg is not None else None,
            "image_to_image": None
            if self.img2img_size is None
            else {
                "height": list(self.img2img_size[0]),
                "width": list(self.img2img_size[1]),
                "strength": ["> 0", 1.0],
            },
        }


def _size(name: str, value: Any, span: tuple[int, int], multiple: int) -> int:
    value = check_value(name, value)
    lo, hi = span
    allowed = f"these engines accept {lo}..{hi} in multiples of {multiple}"
    if value % multiple:
        raise RequestError(name, f"{name} {value} is not a multiple of {multiple}; {allowed}")
    if not lo <= value <= hi:
        raise RequestError(name, f"{name} {value} is outside the engines' range; {allowed}")
    return value


def _given(request: GenerationRequest, defaults: RuntimeSettings, name: str) -> Any:
    """The request's value of ``name``, or the engines' recorded default when it is ``None``."""
    value = getattr(request, name)
    return getattr(defaults, name) if value is None else value


def resolve_request(
    request: GenerationRequest, limits: RequestLimits, defaults: RuntimeSettings
) -> GenerationParams:
    """Validate ``request`` against the engines and fill in the defaults.

    Types and fixed bounds are the declared ones (:data:`sd35trt.parameters.GENERATION_PARAMS`);
    sizes and images per batch are the engines' (``limits``). A seed below ``2**53`` is drawn when
    none was given; without CFG a requested negative prompt or SLG is dropped with a warning.

    Raises:
        RequestError: naming the first invalid field, its value and the allowed values.
    """
    prompt = check_value("prompt", request.prompt)
    negative = check_value("negative_prompt", _given(request, defaults, "negative_prompt"))
    steps = check_value("num_inference_steps", _given(request, defaults, "num_inference_steps"))
    guidance = check_value("guidance_scale", _given(request, defaults, "guidance_scale"))
    image_to_image = request.image is not None
    if image_to_image and limits.img2img_size is None:
        raise RequestError(
            "image",
            "these engines have no vae_encoder engine, so they cannot take an image (image-to-image); "
            "re-run `sd35trt export` and `sd35trt build` with this sd35trt to add it",
        )
    spans = limits.img2img_size if image_to_image else (limits.height, limits.width)
    m = limits.size_multiple
    height = _size("height", _given(request, defaults, "height"), spans[0], m)
    width = _size("width", _given(request, defaults, "width"), spans[1], m)
    image, strength, image_sha = _image_to_image(request, steps, height, width)
    control = resolve_control(request, limits.controlnets, height, width)
    if control and image_to_image:
        raise RequestError(
            "control_image", "a control_image works with text-to-image only, not with an image"
        )
    wanted_slg = request.skip_layer_guidance
    if (
        wanted_slg is not None
        and check_value("skip_layer_guidance", wanted_slg)
        and limits.skip_layer_guidance is None
    ):
        raise RequestError(
            "skip_layer_guidance",
            "skip_layer_guidance was requested, but these engines were built without it "
            "(set runtime.skip_layer_guidance in the config and rebuild)",
        )
    plan = guidance_plan(
        guidance,
        negative,
        limits.skip_layer_guidance,
        negative_requested=request.negative_prompt is not None,
        slg_requested=None if wanted_slg is None else bool(wanted_slg),
        image_to_image=image_to_image or bool(control),  # neither diffusers pipeline has SLG
    )
    num_images = _batch_fits(limits, check_value("num_images", request.num_images), plan, guidance)
    seed = _seed(request.seed, num_images)
    return GenerationParams(
        prompt=prompt,
        negative_prompt=plan.negative_prompt,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=height,
        width=width,
        seed=seed,
        num_images=num_images,
        skip_layer_guidance=plan.skip_layer_guidance,
        warnings=plan.warnings,
        image=image,
        strength=strength,
        image_sha256=image_sha,
        cache_threshold=cache_threshold(request.cache_threshold, limits.cache, defaults.cache),
        control=control,
    )


def _batch_fits(limits: RequestLimits, num_images: int, plan: Any, guidance: float) -> int:
    """``num_images`` if the engines' smallest batch and ``max_images`` allow it, else RequestError.

    More images than the engine batch run as several engine batches; CFG must fit the text
    encoders' batch.
    """
    cfg, slg = plan.cfg, plan.skip_layer_guidance
    lo = limits.images(cfg, slg is not None)[0]
    if not lo <= num_images <= limits.max_images:
        mode = "with classifier-free guidance" if cfg else "without classifier-free guidance"
        raise RequestError(
            "num_images",
            f"num_images {num_images} is outside {lo}..{limits.max_images} (at least the engines' "
            f"smallest batch {mode}; at most the runtime's max_images, more than the engine batch "
            "running as several engine batches)",
        )
    texts = 2 if cfg else 1
    if not limits.encoder_batch[0] <= texts <= limits.encoder_batch[1]:
        e_lo, e_hi = limits.encoder_batch
        raise RequestError(
            "guidance_scale",
            f"guidance_scale {guidance:g} needs text-encoder batches of {texts}, "
            f"these engines take {e_lo}..{e_hi}",
        )
    return num_images


def _seed(seed: Any, num_images: int) -> int:
    """The request's seed: image ``i`` uses ``seed + i``, so every image's seed must be valid.

    A drawn seed keeps every image's seed below ``2**53`` (float64 clients read it back exactly);
    a given one leaves room for ``num_images`` seeds up to ``2**63 - 1``.

    Raises:
        RequestError: ``seed`` not an integer in ``0..2**63 - num_images``.
    """
    if seed is None:
        return secrets.randbelow(DRAWN_SEED_LIMIT - num_images + 1)
    seed = check_value("seed", seed)
    if seed > MAX_SEED - num_images + 1:
        raise RequestError(
            "seed",
            f"seed {seed} is outside 0..{MAX_SEED - num_images + 1} (image i uses seed + i, and "
            "seeds end at 2^63-1)",
        )
    return seed


def _image_to_image(
    request: GenerationRequest, steps: int, height: int, width: int
) -> tuple[Any, float | None, str | None]:
    """The resized RGB image, the strength and the pixels' sha256 (all ``None`` for text-to-image)."""
    if request.image is None:
        if request.strength is not None:
            raise RequestError("strength", "strength applies to image-to-image only: give an image too")
        return None, None, None
    from PIL import Image

    if not isinstance(request.image, Image.Image):
        raise RequestError("image", f"image must be a PIL image, got {type(request.image).__name__}")
    strength = check_value("strength", DEFAULT_STRENGTH if request.strength is None else request.strength)
    count = img2img_steps(steps, strength)[1]
    if count < 1:
        raise RequestError(
            "strength",
            f"strength {strength:g} of {steps} steps leaves no step to run (int(steps * strength) "
            "rounds to 0); use a larger strength",
        )
    if request.image.width * request.image.height > MAX_IMAGE_PIXELS:
        raise RequestError(
            "image",
            f"image is {request.image.width}x{request.image.height}, more than {MAX_IMAGE_PIXELS} pixels",
        )
    # diffusers' VaeImageProcessor.resize (resample "lanczos"); RGB first, as diffusers' load_image does.
    image = request.image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    return image, strength, hashlib.sha256(image.tobytes()).hexdigest()
