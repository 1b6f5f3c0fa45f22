"""ControlNet conditioning: the control image, its preprocessing and its per-step residuals.

As diffusers' ``StableDiffusion3ControlNetPipeline`` (one ControlNet):

1. The control image is made RGB and resized to the generation size with Lanczos resampling
   (diffusers' ``VaeImageProcessor.preprocess``); ``canny`` and ``blur`` are made here from the
   user's picture (:func:`preprocess`), a ``depth`` map is taken as given.
2. The VAE encoder engine encodes it to latents, ``(sample - shift) * scale``. diffusers draws
   that posterior sample from torch's global generator for the ``[2N or N]`` rows of the
   CFG-doubled batch; the runtime draws the same rows from a CPU generator seeded with the
   batch's first seed, so ``torch.manual_seed(seed)`` before diffusers' call gives the same latents.
3. Each step the ControlNet engine sees the transformer's latents, the control latents, the prompt
   embeddings (SD3 ControlNets; SD3.5-large's take none) and the pooled projections (zeroed inside
   the graph where ``force_zeros_for_pooled_projection`` says so); its residuals, times
   ``conditioning_scale`` inside the ``[start, end]`` window (diffusers' ``controlnet_keep``), are
   the transformer's ``controlnet_block_samples``. Outside the window, and without a control
   image, they are zeros (as NVIDIA's demo feeds them), so the ControlNet engine is not run.

Nothing here imports torch at module level: requests are validated without it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sd35trt.config import ControlType
from sd35trt.errors import RequestError

if TYPE_CHECKING:
    import torch

    from sd35trt.backends.engine import Engine

#: Hysteresis thresholds of the canny edge detector on 8-bit intensities (the 100 / 200 of
#: diffusers' ControlNet documentation, which calls ``cv2.Canny(image, 100, 200)``).
CANNY_THRESHOLDS = (100.0, 200.0)
#: Gaussian smoothing of the canny detector in pixels (scikit-image smooths before the gradient;
#: OpenCV's ``Canny`` does not, so the smallest useful sigma is taken).
CANNY_SIGMA = 0.5
#: Standard deviation in pixels of the ``blur`` control image, per 1024 pixels of the image's
#: shorter side (a heavy blur that keeps only the composition, as Stability AI's blur examples).
BLUR_SIGMA_PER_1024 = 16.0
#: Image modes a control image may have (converted to RGB); 16-bit and float modes are refused
#: rather than silently clipped.
CONTROL_IMAGE_MODES = ("1", "L", "LA", "P", "RGB", "RGBA")
#: Largest relative difference between the control image's aspect ratio and the generation's:
#: a control image of another shape would be distorted by the resize.
ASPECT_TOLERANCE = 0.01


@dataclass(frozen=True)
class ControlParams:
    """The ControlNet conditioning a generation runs with (validated).

    Attributes:
        image: the preprocessed control image, RGB at the generation size.
        control_type: what it is (canny, blur, depth): the type the engines were built with.
        conditioning_scale: diffusers' ``controlnet_conditioning_scale``, in 0..2.
        guidance_start: fraction of the steps after which the ControlNet starts to act, in [0, 1).
        guidance_end: fraction of the steps after which it stops, in (start, 1].
        image_sha256: sha256 of the given image's RGB pixels at the generation size (recorded in
            the PNG parameters instead of the image).
    """

    image: Any = field(compare=False, repr=False)
    control_type: ControlType
    conditioning_scale: float
    guidance_start: float
    guidance_end: float
    image_sha256: str

    def keep(self, step: int, steps: int) -> float:
        """diffusers' ``controlnet_keep``: 1.0 for steps inside ``[start, end]``, else 0.0."""
        return 1.0 - float(step / steps < self.guidance_start or (step + 1) / steps > self.guidance_end)

    def to_json(self) -> dict[str, Any]:
        return {
            "control_type": self.control_type.value,
            "controlnet_conditioning_scale": self.conditioning_scale,
            "control_guidance_start": self.guidance_start,
            "control_guidance_end": self.guidance_end,
            "control_image_sha256": self.image_sha256,
        }


def resolve_control(request: Any, built: ControlType | None, height: int, width: int) -> ControlParams | None:
    """Validate a request's ControlNet fields against the engines (``None``: no control image).

    Args:
        request: a :class:`~sd35trt.runtime.request.GenerationRequest`.
        built: the control type of the engines' ControlNet, ``None`` without one.
        height: the generation's height in pixels.
        width: the generation's width in pixels.

    Raises:
        RequestError: naming ``control_image`` (no ControlNet engine, not an image, an unsupported
            mode, another aspect ratio), ``control_type`` (not the engines'),
            ``controlnet_conditioning_scale`` (outside 0..2) or ``control_guidance_start`` /
            ``control_guidance_end`` (outside 0..1, or start not below end).
    """
    from PIL import Image

    image = request.control_image
    if image is None:
        _refuse_fields_without_image(request)
        return None
    if built is None:
        raise RequestError(
            "control_image",
            "these engines have no controlnet engine; set model.controlnet in the config and re-run "
            "`sd35trt export` and `sd35trt build`",
        )
    _check_image(image, height, width)
    control_type = _control_type(request.control_type, built)
    scale, start, end = _conditioning(request)
    rgb = image.convert("RGB")
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), resample=Image.Resampling.LANCZOS)
    return ControlParams(
        image=preprocess(rgb, control_type),
        control_type=control_type,
        conditioning_scale=scale,
        guidance_start=start,
        guidance_end=end,
        image_sha256=hashlib.sha256(rgb.tobytes()).hexdigest(),
    )


#: The request fields that only apply with a control image.
CONTROL_FIELDS = (
    "control_type",
    "controlnet_conditioning_scale",
    "control_guidance_start",
    "control_guidance_end",
)


def _refuse_fields_without_image(request: Any) -> None:
    for name in CONTROL_FIELDS:
        if getattr(request, name) is not None:
            raise RequestError(
                name, f"{name} applies to ControlNet generation only: give a control_image too"
            )


def _check_image(image: Any, height: int, width: int) -> None:
    """A PIL image of an 8-bit mode and the generation's aspect ratio."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise RequestError("control_image", f"control_image must be a PIL image, got {type(image).__name__}")
    if image.mode not in CONTROL_IMAGE_MODES:
        raise RequestError(
            "control_image",
            f"control_image has mode {image.mode}; give an 8-bit image ({', '.join(CONTROL_IMAGE_MODES)})",
        )
    ratio = (image.width / image.height) / (width / height)
    if abs(ratio - 1.0) > ASPECT_TOLERANCE:
        raise RequestError(
            "control_image",
            f"control_image is {image.width}x{image.height}, the generation {width}x{height}: give a "
            "control image of the same aspect ratio (it is resized, not cropped)",
        )


def _control_type(wanted: str | None, built: ControlType) -> ControlType:
    """The request's control type (default: the engines'), which must be the engines'."""
    try:
        control_type = built if wanted is None else ControlType(wanted)
    except ValueError:
        allowed = ", ".join(t.value for t in ControlType)
        raise RequestError("control_type", f"control_type {wanted!r} is not one of {allowed}") from None
    if control_type is not built:
        raise RequestError(
            "control_type",
            f"control_type {control_type.value} is not what these engines' ControlNet was built for "
            f"({built.value})",
        )
    return control_type


def _conditioning(request: Any) -> tuple[float, float, float]:
    """``(scale, start, end)`` within their declared bounds (0..2, 0..1), start below end."""
    from sd35trt.parameters import check_value

    def given(name: str, default: float) -> float:
        value = getattr(request, name)
        return check_value(name, default if value is None else value)

    scale = given("controlnet_conditioning_scale", 1.0)
    start = given("control_guidance_start", 0.0)
    end = given("control_guidance_end", 1.0)
    if start >= end:
        raise RequestError(
            "control_guidance_start",
            f"control_guidance_start {start:g} must be below control_guidance_end {end:g}",
        )
    return float(scale), start, end


def preprocess(image: Any, control_type: ControlType) -> Any:
    """The control image a ControlNet of ``control_type`` takes, from an RGB PIL image.

    - ``canny``: edges of the luminance (scikit-image's Canny detector, thresholds
      :data:`CANNY_THRESHOLDS` on 8-bit intensities, sigma :data:`CANNY_SIGMA`), white on black,
      in all three channels, as diffusers' ControlNet examples stack ``cv2.Canny``'s output.
    - ``blur``: a Gaussian blur of sigma :data:`BLUR_SIGMA_PER_1024` per 1024 pixels.
    - ``depth``: the image unchanged (the user gives the depth map).

    Returns:
        An RGB PIL image of the same size.
    """
    import numpy as np
    from PIL import Image, ImageFilter

    if control_type is ControlType.CANNY:
        from skimage.feature import canny

        gray = np.asarray(image.convert("L"), dtype=np.float64)  # [H, W] in 0..255
        low, high = CANNY_THRESHOLDS
        edges = canny(gray, sigma=CANNY_SIGMA, low_threshold=low, high_threshold=high)
        return Image.fromarray(np.where(edges, 255, 0).astype(np.uint8)).convert("RGB")
    if control_type is ControlType.BLUR:
        radius = BLUR_SIGMA_PER_1024 * min(image.size) / 1024
        return image.filter(ImageFilter.GaussianBlur(radius=radius))
    return image


def control_latents(
    engine: Engine,
    control: ControlParams,
    images: int,
    cfg: bool,
    seed: int,
    noise_shape: tuple[int, ...],
    device: torch.device,
) -> torch.Tensor:
    """The control image's latents for every transformer row.

    Args:
        engine: the active VAE encoder engine (``image`` in [0, 1], ``noise`` -> ``latent``).
        control: the validated conditioning.
        images: images in the batch (``N``).
        cfg: classifier-free guidance: ``2N`` rows, encoded ``N`` at a time (the encoder's batch
            is the image batch).
        seed: seeds the posterior noise of all rows (see the module docstring).
        noise_shape: ``(C, h, w)`` of one latent.
        device: where the feeds go.

    Returns:
        ``[2N or N, C, h, w]`` float32.
    """
    import numpy as np
    import torch

    rows = 2 * images if cfg else images
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn((rows, *noise_shape), generator=generator, dtype=torch.float32)  # [rows, C, h, w]
    # diffusers' pil_to_numpy, as img2img's image_tensor (not imported: img2img imports the request)
    array = np.asarray(control.image, dtype=np.float32) / 255.0  # [H, W, 3]
    pixels = torch.from_numpy(array.transpose(2, 0, 1)[None].copy()).to(device)  # [1, 3, H, W]
    parts = []
    for start in range(0, rows, images):
        feeds = {
            "image": pixels.expand(images, -1, -1, -1).contiguous(),
            "noise": noise[start : start + images].to(device),
        }
        parts.append(engine.infer(feeds)["latent"].float())
    return torch.cat(parts)


#: The transformer input that takes the ControlNet's residuals.
RESIDUALS_INPUT = "controlnet_block_samples"


@dataclass
class ControlResiduals:
    """The transformer's ``controlnet_block_samples`` at each step (see the module docstring).

    Attributes:
        shape: ``[2N or N, n, image_tokens, inner]`` of the transformer's residual input.
        device: where the zeros live.
        controlnet: the active ControlNet engine (``None``: zeros at every step).
        control: the request's conditioning.
        latents: the control image's latents ``[2N or N, C, h, w]``.
        hidden: the prompt embeddings ``[2N or N, 77 + L, D]``.
        pooled: the pooled embeddings ``[2N or N, P]`` (zeroed inside the graph where the
            ControlNet's ``force_zeros_for_pooled_projection`` says so).
    """

    shape: tuple[int, ...]
    device: Any
    controlnet: Engine | None = None
    control: ControlParams | None = None
    latents: Any = None
    hidden: Any = None
    pooled: Any = None
    _zeros: Any = field(default=None, repr=False)

    def __call__(self, step: int, steps: int, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """The residuals for step ``step`` of ``steps``, latents ``x`` and timesteps ``timestep``.

        Returns:
            ``[2N or N, n, image_tokens, inner]`` float32: the ControlNet's output times
            ``conditioning_scale`` inside the guidance window, zeros outside it.
        """
        import torch

        c = self.control
        scale = 0.0 if c is None or self.controlnet is None else c.conditioning_scale * c.keep(step, steps)
        if scale == 0.0:
            if self._zeros is None:
                self._zeros = torch.zeros(self.shape, dtype=torch.float32, device=self.device)
            return self._zeros
        feeds = {
            "hidden_states": x,
            "controlnet_cond": self.latents,
            "encoder_hidden_states": self.hidden,  # unread by SD3.5-large's (Engine.infer feeds its inputs)
            "pooled_projections": self.pooled,
            "timestep": timestep,
        }
        samples = self.controlnet.infer(feeds)[RESIDUALS_INPUT].float()  # [2N or N, n, tokens, inner]
        return samples * scale


def transformer_residuals(
    engines: Any,
    transformer: Engine,
    controlnet: Engine | None,
    params: Any,
    cond: Any,
    latents: torch.Tensor,
    patch_size: int,
) -> ControlResiduals | None:
    """What feeds the transformer engine's ControlNet input: ``None`` for an engine without one,
    zeros without a control image, else the ControlNet's residuals (the control image encoded here).

    Args:
        engines: the runtime's ``EngineSet`` (its VAE encoder encodes the control image).
        transformer: the active transformer engine.
        controlnet: the active ControlNet engine, ``None`` without a control image.
        params: the batch's :class:`~sd35trt.runtime.request.GenerationParams` (its ``control``).
        cond: the text :class:`~sd35trt.runtime.steps.Conditioning`, ``[2N or N]`` rows.
        latents: the starting latents ``[N, C, h, w]``.
        patch_size: the transformer's patch size (image tokens = h * w / patch_size**2).
    """
    from sd35trt.components import Component

    names = transformer.spec.input_names
    if RESIDUALS_INPUT not in names:
        return None
    _, n, _, inner = transformer.spec.inputs[names.index(RESIDUALS_INPUT)].shape
    n_images, channels, h, w = latents.shape
    shape = (cond.hidden.shape[0], n, h * w // patch_size**2, inner)  # [2N or N, n, tokens, inner]
    if controlnet is None:
        return ControlResiduals(shape, latents.device)
    with engines.use(Component.VAE_ENCODER) as vae_encoder:
        control = control_latents(
            vae_encoder, params.control, n_images, cond.cfg, params.seed, (channels, h, w), latents.device
        )
    return ControlResiduals(
        shape, latents.device, controlnet, params.control, control, cond.hidden, cond.pooled
    )
