"""The model's KServe-v2 tensors: one list that the config writer and the backend both read.

The inputs are :data:`sd35trt.parameters.GENERATION_PARAMS` under their HTTP names, each alias
(``steps``) one more optional input. With ``max_batch_size`` above 0, every tensor has a leading
batch dimension: a request of ``B`` rows is ``B`` prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from sd35trt.parameters import GENERATION_PARAMS, INT32_MAX, InputParam, Kind


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
    """One input or output, per batch row: ``dims`` without the batch dimension (``-1``: variable);
    an ``optional`` input omitted takes the engines' default; ``doc`` says what it holds, with units."""

    name: str
    dtype: TritonType
    dims: tuple[int, ...] = (1,)
    optional: bool = True
    doc: str = ""


def _dtype(p: InputParam) -> TritonType:
    if p.kind is Kind.INT:
        return TritonType.INT64 if p.high is not None and p.high > INT32_MAX else TritonType.INT32
    # FP64 so that a scale such as 3.7 reaches the runtime (and the PNG record) exactly as sent
    return {Kind.FLOAT: TritonType.FP64, Kind.BOOL: TritonType.BOOL}.get(p.kind, TritonType.STRING)


def _doc(p: InputParam) -> str:
    return p.help + (" (the file's bytes, base64, as HTTP)" if p.kind is Kind.IMAGE else "")


INPUTS: tuple[TensorSpec, ...] = (
    *(
        # a ControlNet field: one value, or one per control image (diffusers' lists)
        TensorSpec(
            p.wire, _dtype(p), dims=(-1,) if p.per_controlnet else (1,), optional=not p.required, doc=_doc(p)
        )
        for p in GENERATION_PARAMS
    ),
    *(
        TensorSpec(alias, _dtype(p), doc=f"{p.wire}, under another name")
        for p in GENERATION_PARAMS
        for alias in p.aliases
    ),
)

OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("images", TritonType.STRING, dims=(-1,), doc="PNG files, num_images per row"),
    TensorSpec("parameters", TritonType.STRING, doc="JSON: the parameters used, the seed included"),
    TensorSpec("warnings", TritonType.STRING, doc="JSON list, e.g. a prompt truncated to the token limit"),
    TensorSpec("batch", TritonType.STRING, doc="JSON: the engine batch the row ran in (requests, images)"),
)

INPUT_NAMES = tuple(t.name for t in INPUTS)
