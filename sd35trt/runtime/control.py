"""ControlNet conditioning: the control images, their preprocessing and their per-step residuals.

As diffusers' ``StableDiffusion3ControlNetPipeline`` with one ControlNet or several
(``SD3MultiControlNetModel``): a request gives one control image per ControlNet it uses, each
with its own type, scale and guidance window.

1. Each control image is made RGB and resized to the generation size with Lanczos resampling
   (diffusers' ``VaeImageProcessor.preprocess``); ``canny`` and ``blur`` are made here from the
   user's picture (:func:`preprocess`), a ``depth`` map is taken as given.
2. The VAE encoder engine encodes it to latents, ``(sample - shift) * scale``. diffusers draws
   each posterior sample from torch's global generator for the ``[2N or N]`` rows of the
   CFG-doubled batch, image after image; the runtime draws the same rows from one CPU generator
   seeded with the batch's first seed, in the request's order, so ``torch.manual_seed(seed)``
   before diffusers' call gives the same latents.
3. Each step each ControlNet engine sees the transformer's latents, its control latents, the
   prompt embeddings (SD3 ControlNets; SD3.5-large's take none) and the pooled projections
   (zeroed inside the graph where ``force_zeros_for_pooled_projection`` says so); its residuals,
   times its ``conditioning_scale`` inside its ``[start, end]`` window (diffusers'
   ``controlnet_keep``), are summed into the transformer's ``controlnet_block_samples``. A
   ControlNet outside its window, or built but given no image, is not run; with none running the
   residuals are zeros (as NVIDIA's demo feeds them).

Nothing here imports torch at module level: requests are validated without it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sd35trt.components import CONTROLNET_INPUT
from sd35trt.config import ControlType
from sd35trt.errors import RequestError
from sd35trt.parameters import check_value, listed

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
    """The validated ControlNet conditioning of one control image.

    ``image``: preprocessed, RGB at the generation size; ``conditioning_scale`` in 0..2;
    ``guidance_start`` / ``guidance_end``: fractions of the steps, start < end in [0, 1];
    ``image_sha256``: of the given image's RGB pixels at the generation size (recorded in the PNG).
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


def resolve_control(
    request: Any, built: Sequence[ControlType], height: int, width: int
) -> tuple[ControlParams, ...]:
    """Validate a request's ControlNet fields against the engines (empty: no control image).

    Each field takes one value or a list (diffusers' convention for several ControlNets):
    ``control_image`` one image per ControlNet used, ``control_type`` the type of each (default:
    every built ControlNet, in the engines' order), the scale and the guidance window one value
    for all or one per image. A built ControlNet without an image is not run. ``built``: the
    engines' ControlNets' types; ``height``, ``width`` in pixels. One result per control image.

    Raises:
        RequestError: naming the field (and the list index in the message): ``control_image`` (no
            ControlNet engine, not an image, an unsupported mode, another aspect ratio, an empty
            list), ``control_type`` (not built, given twice, not one per image),
            ``controlnet_conditioning_scale`` (outside 0..2) or ``control_guidance_start`` /
            ``control_guidance_end`` (outside 0..1, start not below end), or a list whose length
            is not the number of control images.
    """
    from PIL import Image

    if request.control_image is None:
        for name in (
            "control_type",
            "controlnet_conditioning_scale",
            "control_guidance_start",
            "control_guidance_end",
        ):
            if getattr(request, name) is not None:
                raise RequestError(
                    name, f"{name} applies to ControlNet generation only: give a control_image too"
                )
        return ()
    if not built:
        raise RequestError(
            "control_image",
            "these engines have no controlnet engine; set model.controlnet in the config and re-run "
            "`sd35trt export` and `sd35trt build`",
        )
    images = listed(request.control_image)
    if not images:
        raise RequestError(
            "control_image", "control_image is an empty list: give one image per ControlNet used"
        )
    listed_images = isinstance(request.control_image, (list, tuple))
    types = _control_types(request.control_type, built, len(images))
    scales = _per_image(request, "controlnet_conditioning_scale", 1.0, len(images))
    starts = _per_image(request, "control_guidance_start", 0.0, len(images))
    ends = _per_image(request, "control_guidance_end", 1.0, len(images))
    out = []
    for i, (image, control_type, scale, start, end) in enumerate(
        zip(images, types, scales, starts, ends, strict=True)
    ):
        at = f"[{i}]" if listed_images else ""
        _check_image(image, height, width, at)
        if start >= end:
            raise RequestError(
                "control_guidance_start",
                f"control_guidance_start{at} {start:g} must be below control_guidance_end{at} {end:g}",
            )
        rgb = image.convert("RGB")
        if rgb.size != (width, height):
            rgb = rgb.resize((width, height), resample=Image.Resampling.LANCZOS)
        out.append(
            ControlParams(
                image=preprocess(rgb, control_type),
                control_type=control_type,
                conditioning_scale=scale,
                guidance_start=start,
                guidance_end=end,
                image_sha256=hashlib.sha256(rgb.tobytes()).hexdigest(),
            )
        )
    return tuple(out)


def _check_image(image: Any, height: int, width: int, at: str = "") -> None:
    """A PIL image of an 8-bit mode and the generation's aspect ratio (``at``: ``[i]`` in a list)."""
    from PIL import Image

    name = f"control_image{at}"
    if not isinstance(image, Image.Image):
        raise RequestError("control_image", f"{name} must be a PIL image, got {type(image).__name__}")
    if image.mode not in CONTROL_IMAGE_MODES:
        raise RequestError(
            "control_image",
            f"{name} has mode {image.mode}; give an 8-bit image ({', '.join(CONTROL_IMAGE_MODES)})",
        )
    ratio = (image.width / image.height) / (width / height)
    if abs(ratio - 1.0) > ASPECT_TOLERANCE:
        raise RequestError(
            "control_image",
            f"{name} is {image.width}x{image.height}, the generation {width}x{height}: give a "
            "control image of the same aspect ratio (it is resized, not cropped)",
        )


def _control_types(wanted: Any, built: Sequence[ControlType], images: int) -> list[ControlType]:
    """The control type of each image: ``wanted`` (one per image), by default the engines' ControlNets
    in their order; each built, none twice."""
    names = ", ".join(t.value for t in built)
    if wanted is None:
        if images != len(built):
            raise RequestError(
                "control_type",
                f"{images} control image(s) for engines with {len(built)} ControlNet(s) ({names}): "
                "give control_type, one per control image",
            )
        return list(built)
    values = listed(wanted)
    if len(values) != images:
        raise RequestError(
            "control_type",
            f"control_type has {len(values)} value(s), control_image {images}: give one per image",
        )
    out: list[ControlType] = []
    for i, value in enumerate(values):
        at = f"[{i}]" if isinstance(wanted, (list, tuple)) else ""
        text = check_value("control_type", value, i if at else None)
        try:
            control_type = ControlType(text)
        except ValueError:
            allowed = ", ".join(t.value for t in ControlType)
            raise RequestError("control_type", f"control_type{at} {text!r} is not one of {allowed}") from None
        if control_type not in built:
            raise RequestError(
                "control_type",
                f"control_type{at} {control_type.value} is not what these engines' ControlNets were built "
                f"for ({names})",
            )
        if control_type in out:
            raise RequestError(
                "control_type",
                f"control_type{at} {control_type.value} is also control_type[{out.index(control_type)}]: "
                "one control image per ControlNet",
            )
        out.append(control_type)
    return out


def _per_image(request: Any, name: str, default: float, images: int) -> list[float]:
    """A scale or window bound per image: one value for all, or a list of one per image, each
    within its declared bounds (:data:`sd35trt.parameters.PARAMS`)."""
    given = getattr(request, name)
    values = listed(default if given is None else given)
    if len(values) not in (1, images):
        raise RequestError(
            name,
            f"{name} has {len(values)} values, control_image {images}: give one for all or one per image",
        )
    index = isinstance(given, (list, tuple))
    checked = [float(check_value(name, v, i if index else None)) for i, v in enumerate(values)]
    return checked * images if len(checked) == 1 else checked


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
    generator: torch.Generator,
    noise_shape: tuple[int, ...],
    device: torch.device,
) -> torch.Tensor:
    """One control image's latents for every transformer row: ``[2N or N, C, h, w]`` float32.

    ``engine``: the VAE encoder, run ``N = images`` rows at a time; ``generator`` draws the
    posterior noise of all rows (the next control image's follows, as diffusers encodes its list
    one image at a time); ``noise_shape``: ``(C, h, w)``.
    """
    import numpy as np
    import torch

    rows = 2 * images if cfg else images
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


@dataclass
class ControlNetPass:
    """One ControlNet a generation runs: its engine, its conditioning, its control latents."""

    engine: Engine
    control: ControlParams
    latents: Any  # [2N or N, C, h, w]


@dataclass
class ControlResiduals:
    """The transformer's ``controlnet_block_samples`` at each step (see the module docstring).

    ``shape``: ``[2N or N, n, image_tokens, inner]``; ``nets``: the ControlNets the request uses
    (none: zeros at every step); ``hidden`` ``[2N or N, 77 + L, D]``, ``pooled`` ``[2N or N, P]``.
    """

    shape: tuple[int, ...]
    device: Any
    nets: Sequence[ControlNetPass] = ()
    hidden: Any = None
    pooled: Any = None
    _zeros: Any = field(default=None, repr=False)

    def __call__(self, step: int, steps: int, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """``[2N or N, n, image_tokens, inner]`` float32 for step ``step`` of ``steps``: the sum of each
        ControlNet inside its window times its scale (diffusers' ``SD3MultiControlNetModel``), or zeros.
        """
        import torch

        total = None
        for net in self.nets:
            scale = net.control.conditioning_scale * net.control.keep(step, steps)
            if scale == 0.0:  # not run: its residuals would add nothing
                continue
            feeds = {
                "hidden_states": x,
                "controlnet_cond": net.latents,
                # unread by SD3.5-large's (Engine.infer feeds only its inputs)
                "encoder_hidden_states": self.hidden,
                "pooled_projections": self.pooled,
                "timestep": timestep,
            }
            samples = net.engine.infer(feeds)[CONTROLNET_INPUT].float() * scale  # [2N or N, n, tokens, inner]
            total = samples if total is None else total + samples
        if total is not None:
            return total
        if self._zeros is None:
            self._zeros = torch.zeros(self.shape, dtype=torch.float32, device=self.device)
        return self._zeros


def transformer_residuals(
    engines: Any,
    transformer: Engine,
    controlnets: Sequence[Engine],
    params: Any,
    cond: Any,
    latents: torch.Tensor,
    patch_size: int,
) -> ControlResiduals | None:
    """What feeds the transformer engine's ControlNet input: ``None`` for an engine without one,
    zeros without a control image, else the used ControlNets' summed residuals (the control
    images encoded by ``engines``' VAE encoder). ``controlnets``: the active engine of each of
    ``params.control``, in its order; ``latents``: ``[N, C, h, w]``; ``cond``: ``[2N or N]`` rows.
    """
    import torch

    from sd35trt.components import Component

    names = transformer.spec.input_names
    if CONTROLNET_INPUT not in names:
        return None
    _, n, _, inner = transformer.spec.inputs[names.index(CONTROLNET_INPUT)].shape
    n_images, channels, h, w = latents.shape
    shape = (cond.hidden.shape[0], n, h * w // patch_size**2, inner)  # [2N or N, n, tokens, inner]
    if not controlnets:
        return ControlResiduals(shape, latents.device)
    # one generator for every control image, in the request's order (diffusers' global generator)
    generator = torch.Generator("cpu").manual_seed(params.seed)
    with engines.use(Component.VAE_ENCODER) as vae_encoder:
        nets = [
            ControlNetPass(
                engine,
                control,
                control_latents(
                    vae_encoder, control, n_images, cond.cfg, generator, (channels, h, w), latents.device
                ),
            )
            for engine, control in zip(controlnets, params.control, strict=True)
        ]
    return ControlResiduals(shape, latents.device, nets, cond.hidden, cond.pooled)
