"""The model's KServe-v2 tensors: one list that the config writer and the backend both read.

Input names are the HTTP names of ``sd35trt serve`` (diffusers' parameter names), so a request
means the same thing to both servers and errors name the same fields. With ``max_batch_size``
above 0, every tensor has a leading batch dimension: a request of ``B`` rows is ``B`` prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class TritonType(str, Enum):
    """Triton data types used by the model (model_config.proto ``DataType``)."""

    STRING = "TYPE_STRING"  # KServe "BYTES"
    INT32 = "TYPE_INT32"
    INT64 = "TYPE_INT64"
    FP64 = "TYPE_FP64"
    BOOL = "TYPE_BOOL"

    @property
    def kserve(self) -> str:
        """The KServe-v2 datatype name clients send (``BYTES``, ``INT32``, ...)."""
        return "BYTES" if self is TritonType.STRING else self.value.removeprefix("TYPE_")


@dataclass(frozen=True)
class TensorSpec:
    """One input or output, per batch row.

    Attributes:
        name: the tensor name (an HTTP field name of ``sd35trt serve`` for inputs).
        dtype: its Triton data type.
        dims: its shape without the batch dimension (``-1``: variable).
        optional: inputs only; omitted means the engines' default.
        doc: what it holds, with units.
    """

    name: str
    dtype: TritonType
    dims: tuple[int, ...] = (1,)
    optional: bool = True
    doc: str = ""


INPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("prompt", TritonType.STRING, optional=False, doc="text prompt, UTF-8, not empty"),
    TensorSpec("negative_prompt", TritonType.STRING, doc="UTF-8; default: the engines' negative prompt"),
    TensorSpec("width", TritonType.INT32, doc="pixels, a multiple of 16 inside the engine profile"),
    TensorSpec("height", TritonType.INT32, doc="pixels, a multiple of 16 inside the engine profile"),
    TensorSpec("num_inference_steps", TritonType.INT32, doc="denoising steps"),
    # FP64 so that a scale such as 3.7 reaches the runtime (and the PNG record) exactly as sent
    TensorSpec("guidance_scale", TritonType.FP64, doc="classifier-free guidance scale, >= 0"),
    TensorSpec("seed", TritonType.INT64, doc="0..2^63-1; drawn at random when omitted"),
    TensorSpec("num_images", TritonType.INT32, doc="images for this prompt (default 1)"),
    TensorSpec("skip_layer_guidance", TritonType.BOOL, doc="default: as the engines were built"),
    TensorSpec("init_image", TritonType.STRING, doc="image-to-image: the image file, base64 (as HTTP)"),
    TensorSpec("strength", TritonType.FP64, doc="image-to-image: share of the schedule that runs, (0, 1]"),
    TensorSpec("control_image", TritonType.STRING, doc="ControlNet: the picture to follow, base64 (as HTTP)"),
    TensorSpec("control_type", TritonType.STRING, doc="ControlNet: canny, blur or depth (default: as built)"),
    TensorSpec("controlnet_conditioning_scale", TritonType.FP64, doc="ControlNet: residual scale, 0..2"),
    TensorSpec(
        "control_guidance_start", TritonType.FP64, doc="ControlNet: share of the steps before it acts"
    ),
    TensorSpec(
        "control_guidance_end", TritonType.FP64, doc="ControlNet: share of the steps after which it stops"
    ),
)

OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("images", TritonType.STRING, dims=(-1,), doc="PNG files, num_images per row"),
    TensorSpec("parameters", TritonType.STRING, doc="JSON: the parameters used, the seed included"),
    TensorSpec("warnings", TritonType.STRING, doc="JSON list, e.g. a prompt truncated to the token limit"),
    TensorSpec("batch", TritonType.STRING, doc="JSON: the engine batch the row ran in (requests, images)"),
)

INPUT_NAMES = tuple(t.name for t in INPUTS)
