"""Request and response bodies of the HTTP API (pydantic models, shown in ``/docs``).

Request bodies are strict (``64.0``, ``"64"`` or ``true`` are not a width), refuse unknown fields
and non-finite numbers; ranges are checked against the engine manifest by the runtime, whose
:class:`~sd35trt.errors.RequestError` names the field and the allowed range.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from sd35trt.errors import RequestError

_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


#: Request fields about how a request is scheduled, not what it generates (Triton's own batcher
#: decides that there, so its model has no such input).
SCHEDULING_FIELDS = ("batch",)


class GenerateBody(BaseModel):
    """``POST /generate``. Omitted fields take the defaults recorded with the engines."""

    model_config = _STRICT

    prompt: str = Field(description="text prompt (must not be empty; truncated to the token limit)")
    negative_prompt: str | None = Field(default=None, description="default: the engines' negative prompt")
    width: int | None = Field(default=None, description="pixels, a multiple of 16 inside the engine profile")
    height: int | None = Field(default=None, description="pixels, a multiple of 16 inside the engine profile")
    num_inference_steps: int | None = Field(default=None, description="denoising steps")
    guidance_scale: float | None = Field(default=None, description="classifier-free guidance, >= 0")
    num_images: int = Field(
        default=1, description="images for this prompt; beyond the engine batch: several engine batches"
    )
    seed: int | None = Field(default=None, description="0..2^63-1; drawn below 2^53 when omitted")
    skip_layer_guidance: bool | None = Field(
        default=None, description="skip-layer guidance when the engines have it (default: as built)"
    )
    batch: Literal["merge", "alone"] = Field(
        default="merge",
        description="'alone': never merged with other requests, for byte-exact reproduction "
        "(merged images can differ by ~1/255; the PNG records its engine batch)",
    )
    init_image: str | None = Field(
        default=None,
        description="image-to-image: the initial image file (PNG, JPEG, WebP), base64; resized to "
        "width x height as diffusers does. Needs engines with a VAE encoder",
    )
    strength: float | None = Field(
        default=None, description="image-to-image: share of the schedule that runs, in (0, 1] (default 0.6)"
    )
    control_image: str | None = Field(
        default=None,
        description="ControlNet: the picture to follow (image file, base64), of the output's aspect ratio; "
        "made into canny edges or a blur as control_type says (a depth map is taken as is)",
    )
    control_type: str | None = Field(default=None, description="canny, blur or depth (default: as built)")
    controlnet_conditioning_scale: float | None = Field(default=None, description="0..2 (default 1.0)")
    control_guidance_start: float | None = Field(
        default=None, description="share of the steps before it acts"
    )
    control_guidance_end: float | None = Field(
        default=None, description="share of the steps after which it stops"
    )


class ImageInfo(BaseModel):
    """What one image of ``images`` is."""

    index: int = Field(description="position of the image in its request")
    seed: int = Field(description="this image's seed (seed + index): one image with it is this image")
    width: int = Field(description="pixels")
    height: int = Field(description="pixels")


class GenerateResponse(BaseModel):
    """The answer of ``POST /generate``: ``images[i]`` is a base64 PNG, described by ``info[i]``."""

    status: Literal["success"] = "success"
    images: list[str] = Field(
        description="base64 PNG files; each PNG's `parameters` text chunk records how it was made"
    )
    parameters: dict[str, Any] = Field(description="the parameters actually used, the seed included")
    info: list[ImageInfo] = Field(description="per image: index, seed, width, height")
    timings: dict[str, Any] = Field(description="milliseconds: queue, engine batch, encode, total, stages")
    batch: dict[str, Any] = Field(description="the engine batch this request ran in (the first, if several)")
    warnings: list[str] = Field(
        default_factory=list, description="e.g. a prompt truncated to the token limit"
    )


_SIZE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")


class OpenAIImagesBody(BaseModel):
    """``POST /v1/images/generations``, the OpenAI Images API request.

    ``size`` is ``"WIDTHxHEIGHT"`` in pixels inside the engines' profile (or ``"auto"``: the
    engines' default); ``n`` beyond the engine batch runs as several engine
    batches. Images come back as ``b64_json`` only.
    SD3.5's own settings are accepted as extra fields (``extra_body`` in OpenAI's clients).
    """

    model_config = _STRICT

    prompt: str = Field(description="text prompt")
    model: str | None = Field(default=None, description="accepted and ignored: the server serves one model")
    n: int | None = Field(default=None, description="images for this prompt (default 1)")
    size: str | None = Field(default=None, description='"WIDTHxHEIGHT" in pixels, or "auto"')
    response_format: str | None = Field(default=None, description='"b64_json" (the only format served)')
    output_format: str | None = Field(default=None, description='"png" (the only format served)')
    user: str | None = Field(default=None, description="accepted and ignored")
    negative_prompt: str | None = Field(default=None, description="SD3.5: the negative prompt")
    seed: int | None = Field(default=None, description="SD3.5: 0..2^63-1; drawn below 2^53 when omitted")
    num_inference_steps: int | None = Field(default=None, description="SD3.5: denoising steps")
    guidance_scale: float | None = Field(default=None, description="SD3.5: classifier-free guidance")
    skip_layer_guidance: bool | None = Field(default=None, description="SD3.5: skip-layer guidance")

    def generation_fields(self) -> dict[str, Any]:
        """The request in ``/generate``'s terms.

        Raises:
            RequestError: ``size`` is not ``WIDTHxHEIGHT`` or ``auto``; a format other than
                ``b64_json`` / ``png`` was asked for.
        """
        if self.response_format not in (None, "b64_json"):
            raise RequestError(
                "response_format",
                f"response_format {self.response_format!r} is not served: images come back inline, "
                "use 'b64_json'",
            )
        if self.output_format not in (None, "png"):
            raise RequestError(
                "output_format", f"output_format {self.output_format!r} is not served: use 'png'"
            )
        width = height = None
        if self.size not in (None, "auto"):
            match = _SIZE.fullmatch(self.size)
            if match is None:
                raise RequestError(
                    "size", f"size {self.size!r} is not 'WIDTHxHEIGHT' in pixels (e.g. '1024x1024') or 'auto'"
                )
            width, height = int(match[1]), int(match[2])
        return {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "width": width,
            "height": height,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "num_images": 1 if self.n is None else self.n,
            "seed": self.seed,
            "skip_layer_guidance": self.skip_layer_guidance,
        }


class OpenAIImage(BaseModel):
    b64_json: str = Field(description="the PNG file, base64")
    revised_prompt: str | None = Field(default=None, description="always null: prompts are used as given")


class OpenAIImagesResponse(BaseModel):
    """The OpenAI Images API answer, plus ``warnings`` (e.g. a prompt truncated to the token limit)."""

    created: int = Field(description="Unix time, seconds")
    data: list[OpenAIImage]
    output_format: Literal["png"] = "png"
    size: str = Field(description='"WIDTHxHEIGHT" of the images')
    warnings: list[str] = Field(default_factory=list)
