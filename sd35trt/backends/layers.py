"""What a built engine really runs: TensorRT's layer information, read back into a typed record.

After a TensorRT build (``ProfilingVerbosity.DETAILED``), ``IEngineInspector.get_engine_information
(LayerInformationFormat.JSON)`` describes every engine layer. The documented format (TensorRT
developer guide, "Engine Inspector"; the 10.x -> 11.x migration note) is a JSON object whose
``"Layers"`` list holds one object per layer with ``"Name"``, ``"LayerType"``, ``"Inputs"`` and
``"Outputs"`` (each tensor with ``"Name"``, ``"Dimensions"`` and its format and type in
``"Format/Datatype"``, e.g. ``"Row major linear FP8 format"``; 11.x adds separate ``"DataType"``
fields), ``"TacticName"`` and ``"Metadata"`` (the ONNX node names the layer came from). With
``LAYER_NAMES_ONLY`` the list holds bare names, which say nothing about precision.

From it :func:`summarize` derives the per-engine :class:`LayerReport` the engine manifest
records: layers by precision, FP8 GEMMs against the quantized Linear layers of the ONNX, the ONNX
nodes that fell back to a higher precision, and the layers that look like fused attention (see
:func:`is_fused_attention`: a name-based reading that a GPU run must confirm, README "On a GPU").
Nothing here imports TensorRT; :func:`quantized_linear_nodes` reads the ONNX graph with ``onnx``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from sd35trt.artifacts.engine_manifest import LayerReport

#: Layer information kept per layer name in error messages (the rest is counted).
MAX_NAMED = 12


class Precision(str, Enum):
    """Element type of a layer's tensors, as TensorRT names them."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    FP8 = "fp8"
    FP4 = "fp4"
    INT8 = "int8"
    INT32 = "int32"
    INT64 = "int64"
    BOOL = "bool"
    UNKNOWN = "unknown"


# Tokens of "Format/Datatype" strings and 11.x "DataType" values, most specific first.
_TYPE_TOKENS: tuple[tuple[str, Precision], ...] = (
    (r"\bfp8\b|\bfloat8|\be4m3", Precision.FP8),
    (r"\bfp4\b|\be2m1", Precision.FP4),
    (r"\bbf16\b|\bbfloat16?\b", Precision.BF16),
    (r"\bfp16\b|\bhalf\b|\bfloat16\b", Precision.FP16),
    (r"\bfp32\b|\bfloat32\b|\bfloat\b", Precision.FP32),
    (r"\bint8\b", Precision.INT8),
    (r"\bint32\b", Precision.INT32),
    (r"\bint64\b", Precision.INT64),
    (r"\bbool\b", Precision.BOOL),
)
_GEMM = re.compile(r"gemm|matrixmultipl|matmul|convolution|\bconv", re.IGNORECASE)
_ATTENTION = re.compile(r"fmha|\bmha|_mha|mha_|flash|attention|sdpa", re.IGNORECASE)


def tensor_precision(tensor: Mapping) -> Precision:
    """The element type of one tensor entry of the layer information."""
    for key in ("DataType", "Format/Datatype", "Format"):
        text = tensor.get(key)
        if isinstance(text, str):
            low = text.lower()
            for pattern, precision in _TYPE_TOKENS:
                if re.search(pattern, low):
                    return precision
    return Precision.UNKNOWN


@dataclass(frozen=True)
class EngineLayer:
    """One layer of a built engine (shapes left out: the report needs types and names)."""

    name: str
    layer_type: str
    inputs: tuple[Precision, ...]
    outputs: tuple[Precision, ...]
    tactic: str = ""
    metadata: str = ""

    @property
    def precision(self) -> Precision:
        """The layer's compute type: FP8 when any input is FP8 (a quantized GEMM reads FP8 and
        writes a wider type), else its first output's type."""
        if Precision.FP8 in self.inputs:
            return Precision.FP8
        known = [p for p in (*self.outputs, *self.inputs) if p is not Precision.UNKNOWN]
        return known[0] if known else Precision.UNKNOWN

    @property
    def is_gemm(self) -> bool:
        return bool(_GEMM.search(self.layer_type) or _GEMM.search(self.tactic))

    @property
    def is_fp8_gemm(self) -> bool:
        return self.is_gemm and Precision.FP8 in self.inputs

    def mentions(self, onnx_node: str) -> bool:
        """Whether this layer was made from ``onnx_node`` (named in its name or metadata)."""
        return onnx_node in self.name or onnx_node in self.metadata


def is_fused_attention(layer: EngineLayer) -> bool:
    """Whether ``layer`` is one fused attention kernel (softmax(QK^T)V in one layer).

    TensorRT names its fused multi-head attention layers and tactics after the kernel family
    (``mha``, ``fmha``, flash attention); an unfused attention shows up as two batched GEMMs and
    a softmax instead. This reads names, so it is a heuristic to be confirmed on a GPU.
    """
    return bool(_ATTENTION.search(layer.layer_type) or _ATTENTION.search(layer.tactic)) or (
        "softmax" not in layer.layer_type.lower() and bool(_ATTENTION.search(layer.name)) and layer.is_gemm
    )


class LayerInfoError(ValueError):
    """The layer information is not the documented JSON."""


def parse_layer_information(text: str) -> tuple[list[EngineLayer], bool]:
    """Parse ``get_engine_information(LayerInformationFormat.JSON)``.

    Returns:
        ``(layers, detailed)``: ``detailed`` is False when the engine was built without
        ``ProfilingVerbosity.DETAILED`` (bare layer names, no types).

    Raises:
        LayerInfoError: not JSON, or no ``Layers`` list of names or objects.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise LayerInfoError(f"layer information is not JSON ({err})") from None
    raw = data.get("Layers") if isinstance(data, dict) else None
    if not isinstance(raw, list):
        raise LayerInfoError("layer information has no 'Layers' list")
    layers: list[EngineLayer] = []
    detailed = True
    for i, entry in enumerate(raw):
        if isinstance(entry, str):
            detailed = False
            layers.append(EngineLayer(entry, "", (), ()))
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("Name"), str):
            raise LayerInfoError(f"layer {i} of the layer information has no 'Name'")
        tensors = {k: entry.get(k) or [] for k in ("Inputs", "Outputs")}
        if not all(isinstance(v, list) and all(isinstance(t, dict) for t in v) for v in tensors.values()):
            raise LayerInfoError(f"layer {entry['Name']!r}: 'Inputs'/'Outputs' are not lists of tensors")
        metadata = entry.get("Metadata", "")
        layers.append(
            EngineLayer(
                name=entry["Name"],
                layer_type=str(entry.get("LayerType", "")),
                inputs=tuple(tensor_precision(t) for t in tensors["Inputs"]),
                outputs=tuple(tensor_precision(t) for t in tensors["Outputs"]),
                tactic=str(entry.get("TacticName", "")),
                metadata=metadata if isinstance(metadata, str) else json.dumps(metadata),
            )
        )
    return layers, detailed


def summarize(layers: Sequence[EngineLayer], detailed: bool, quantized_nodes: Iterable[str]) -> LayerReport:
    """The :class:`LayerReport` of an engine's layers against its ONNX's quantized nodes."""
    quantized = list(quantized_nodes)
    fp8_gemms = [layer for layer in layers if layer.is_fp8_gemm]
    fell_back = [n for n in quantized if not any(g.mentions(n) for g in fp8_gemms)] if detailed else quantized
    # Counting is what decides; names only say which ones when TensorRT kept them traceable.
    if detailed and len(fp8_gemms) >= len(quantized):
        fell_back = []
    return LayerReport(
        detailed=detailed,
        layers=len(layers),
        by_precision=dict(Counter(layer.precision.value for layer in layers)) if detailed else {},
        quantized_linear=len(quantized),
        fp8_gemms=len(fp8_gemms),
        fell_back=fell_back[:MAX_NAMED],
        fell_back_count=len(fell_back) if detailed else len(quantized),
        fused_attention=[layer.name for layer in layers if is_fused_attention(layer)],
    )


def quantized_linear_nodes(onnx_path: str | Path) -> list[str]:
    """Names of the MatMul / Gemm nodes of an ONNX file that read an FP8 ``DequantizeLinear``.

    Only the graph is read (external weights are not loaded). A weight path ``DQ -> Transpose ->
    MatMul`` counts as well as ``DQ -> MatMul``.
    """
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    graph = model.graph
    fp8 = {onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E5M2}
    fp8_initializers = {t.name for t in graph.initializer if t.data_type in fp8}
    producer = {out: node for node in graph.node for out in node.output}

    def dequantized(name: str, hops: int = 2) -> bool:
        node = producer.get(name)
        if node is None or hops < 0:
            return False
        if node.op_type == "DequantizeLinear":
            # FP8 from the zero point's type, or an FP8 weight initializer dequantized directly.
            zp = node.input[2] if len(node.input) > 2 else ""
            return zp in fp8_initializers or node.input[0] in fp8_initializers
        return node.op_type in ("Transpose", "Reshape", "Cast") and dequantized(node.input[0], hops - 1)

    return [
        node.name or node.output[0]
        for node in graph.node
        if node.op_type in ("MatMul", "Gemm") and any(dequantized(i) for i in node.input)
    ]
