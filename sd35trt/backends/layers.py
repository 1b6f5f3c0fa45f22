"""What a built engine really runs: its layer information, read back into a :class:`LayerReport`.

Two sources: after a TensorRT build, ``IEngineInspector.get_engine_information(JSON)``
(:func:`parse_layer_information`); after a TensorRT-RTX build, whose plan cannot be deserialized
without a GPU, the builder's own log (:func:`parse_builder_log`). :func:`summarize` derives the
report the engine manifest records: layers by precision and output type, the FP8 GEMM layers with
the quantized ONNX MatMuls inside each, the quantized nodes that fell back to a higher precision,
fused attention layers by tactic, and memory where the source gives it. Nothing here imports
TensorRT; :func:`quantized_linear_nodes` reads the ONNX graph with ``onnx``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from functools import cached_property
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
_ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]]*)\]")
#: The per-kernel hash TensorRT-RTX appends to a tactic's name (``_gemm_mha_v2_0x99460...``).
_TACTIC_HASH = re.compile(r"_?0x[0-9a-f]+$")


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
    #: Types of the layer's constants (its weights), where the source lists them apart (RTX log).
    weights: tuple[Precision, ...] = ()

    @cached_property
    def onnx_nodes(self) -> tuple[str, ...]:
        """The ONNX nodes fused into this layer, from its ``[ONNX Layer: name]`` metadata."""
        return tuple(_ONNX_LAYER.findall(self.metadata))

    @property
    def precision(self) -> Precision:
        """FP8 when any input is FP8 (a quantized GEMM writes a wider type), else its first output's."""
        if Precision.FP8 in self.inputs:
            return Precision.FP8
        known = [p for p in (*self.outputs, *self.inputs) if p is not Precision.UNKNOWN]
        return known[0] if known else Precision.UNKNOWN

    @property
    def is_gemm(self) -> bool:
        return bool(_GEMM.search(self.layer_type) or _GEMM.search(self.tactic))

    @property
    def is_fp8_gemm(self) -> bool:
        """A GEMM reading FP8 activations (and FP8 weights, where its constants are listed)."""
        fp8_weights = not self.weights or Precision.FP8 in self.weights
        return self.is_gemm and Precision.FP8 in self.inputs and fp8_weights

    def mentions(self, onnx_node: str) -> bool:
        """Whether this layer was made from ``onnx_node``: one of the ONNX nodes its metadata names
        (``.../MatMul`` is not ``.../MatMul_1``), else a substring of its name or metadata."""
        nodes = self.onnx_nodes
        if nodes:
            return onnx_node in nodes
        return onnx_node in self.name or onnx_node in self.metadata


def is_fused_attention(layer: EngineLayer) -> bool:
    """Whether ``layer`` is one fused attention kernel (softmax(QK^T)V in one layer).

    A heuristic on TensorRT's kernel-family names (``mha``, ``fmha``, flash), to be confirmed on a
    GPU. The layer's own name counts only where no tactic is known: a projection GEMM of a module
    named ``SelfAttention`` is no fused attention.
    """
    return bool(_ATTENTION.search(layer.layer_type) or _ATTENTION.search(layer.tactic)) or (
        not layer.tactic
        and "softmax" not in layer.layer_type.lower()
        and bool(_ATTENTION.search(layer.name))
        and layer.is_gemm
    )


class LayerInfoError(ValueError):
    """The layer information is not the documented JSON."""


def parse_layer_information(text: str) -> tuple[list[EngineLayer], bool]:
    """Parse ``get_engine_information(LayerInformationFormat.JSON)``.

    The documented format (TensorRT developer guide, "Engine Inspector"; the 10.x -> 11.x migration
    note): a ``"Layers"`` list of objects with ``"Name"``, ``"LayerType"``, ``"Inputs"`` and
    ``"Outputs"`` (each tensor's type in ``"Format/Datatype"``, e.g. ``"Row major linear FP8
    format"``; 11.x adds ``"DataType"``), ``"TacticName"`` and ``"Metadata"`` (the ONNX node names).
    Built without ``ProfilingVerbosity.DETAILED``, the list holds bare names.

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


def summarize(
    layers: Sequence[EngineLayer],
    detailed: bool,
    quantized_nodes: Iterable[str],
    *,
    source: str = "engine inspector",
    weights_bytes: int | None = None,
    activation_bytes: int | None = None,
) -> LayerReport:
    """The :class:`LayerReport` of an engine's layers against its ONNX's quantized nodes.

    A quantized node is accounted for when an FP8 GEMM layer names it (see
    :meth:`EngineLayer.mentions`). Where no FP8 GEMM layer names any ONNX node (layer names and
    metadata stripped), counting decides: as many FP8 GEMMs as quantized nodes.
    """
    quantized = list(quantized_nodes)
    fp8_gemms = [layer for layer in layers if layer.is_fp8_gemm]
    inside = {g.name: [n for n in quantized if g.mentions(n)] for g in fp8_gemms} if detailed else {}
    accounted = {n for nodes in inside.values() for n in nodes}
    fell_back = [n for n in quantized if n not in accounted] if detailed else quantized
    if detailed and not accounted and len(fp8_gemms) >= len(quantized):
        fell_back = []  # nothing traceable by name: the count is all there is
    attention = [layer for layer in layers if is_fused_attention(layer)]
    return LayerReport(
        detailed=detailed,
        layers=len(layers),
        by_precision=dict(Counter(layer.precision.value for layer in layers)) if detailed else {},
        quantized_linear=len(quantized),
        fp8_gemms=len(fp8_gemms),
        fell_back=fell_back[:MAX_NAMED],
        fell_back_count=len(fell_back),
        fused_attention=[layer.name for layer in attention],
        source=source,
        fp8_gemm_layers=inside,
        fused_attention_tactics=dict(
            Counter(_TACTIC_HASH.sub("", layer.tactic) or "(none)" for layer in attention)
        ),
        output_precisions=dict(Counter(p.value for layer in layers for p in set(layer.outputs))),
        weights_bytes=weights_bytes,
        activation_bytes=activation_bytes,
    )


# -- TensorRT-RTX: the builder log's ``Layers:`` section -------------------------------------------

#: A layer line of the builder log; tensor lists hold no ``]`` other than their dimension lists'.
_LOG_LAYER = re.compile(
    r"^Name: (?P<name>.*?), LayerType: (?P<type>[^,]*), Inputs: \[(?P<inputs>.*?)\], "
    r"Constants: \[(?P<constants>.*?)\], Outputs: \[(?P<outputs>.*?)\], TacticName: (?P<tactic>.*?), "
    r"StreamId: [^,]*(?:, EventId: [^,]*)?, Metadata: ?(?P<metadata>.*)$"
)
_LOG_DATATYPE = re.compile(r"Datatype: ([A-Za-z0-9_]+)")
_LOG_TOTAL = re.compile(r"Total (Activation|Weights) Memory: (\d+) bytes")
#: The message that opens the layer listing (its own line in a captured log).
LAYERS_MESSAGE = "Layers:"


@dataclass(frozen=True)
class BuilderLog:
    """What a TensorRT-RTX builder log says it built (memory totals ``None`` when not logged)."""

    layers: list[EngineLayer]
    activation_bytes: int | None
    weights_bytes: int | None

    def report(self, quantized_nodes: Iterable[str]) -> LayerReport:
        """The layer report of this build against its ONNX's quantized nodes."""
        return summarize(
            self.layers,
            True,
            quantized_nodes,
            source="builder log",
            weights_bytes=self.weights_bytes,
            activation_bytes=self.activation_bytes,
        )


def _log_types(tensors: str) -> tuple[Precision, ...]:
    return tuple(tensor_precision({"DataType": t}) for t in _LOG_DATATYPE.findall(tensors))


def parse_builder_log(text: str) -> BuilderLog:
    """Parse a TensorRT-RTX builder log (``ProfilingVerbosity.DETAILED``, verbose messages kept).

    With ``ProfilingVerbosity.DETAILED`` the builder logs, at verbose severity, one ``Layers:``
    message with a line per engine layer (``Name: ..., LayerType: gemm, Inputs: [ { ...,
    Datatype: FP8, ... }], Constants: [...], Outputs: [...], TacticName: ..., StreamId: 0,
    Metadata: [ONNX Layer: ...]``), and at info severity ``Total Activation Memory: N bytes`` and
    ``Total Weights Memory: N bytes``: what TensorRT-RTX 1.7 prints (``tests/unit/data/rtx``).

    Args:
        text: the log; lines may carry a severity prefix (``[V] Layers:``).

    Returns:
        The layers of the last ``Layers:`` section and the total memory lines.

    Raises:
        LayerInfoError: no ``Layers:`` section, or a line in it that is not a layer line.
    """
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.rstrip().endswith(LAYERS_MESSAGE)]
    if not starts:
        raise LayerInfoError(
            "the builder log has no 'Layers:' section (build with ProfilingVerbosity.DETAILED and keep "
            "the builder's verbose messages)"
        )
    layers: list[EngineLayer] = []
    for line in lines[starts[-1] + 1 :]:
        if not line.startswith("Name: "):
            break  # the section ends with the first line that is not a layer
        m = _LOG_LAYER.match(line)
        if m is None:
            raise LayerInfoError(f"builder log layer line not understood: {line[:120]!r}")
        layers.append(
            EngineLayer(
                name=m["name"],
                layer_type=m["type"],
                inputs=_log_types(m["inputs"]),
                outputs=_log_types(m["outputs"]),
                tactic=m["tactic"],
                metadata=m["metadata"],
                weights=_log_types(m["constants"]),
            )
        )
    totals = {kind: int(n) for kind, n in _LOG_TOTAL.findall(text)}
    return BuilderLog(layers, totals.get("Activation"), totals.get("Weights"))


def _quantized_types(graph) -> dict[str, Precision]:
    """Names of the graph's FP8 / FP4 tensors: initializers, typed values and quantizer outputs
    (a ``QuantizeLinear``'s output has its zero point's type, not always in ``value_info``)."""
    from onnx import TensorProto

    low = {
        TensorProto.FLOAT8E4M3FN: Precision.FP8,
        TensorProto.FLOAT8E5M2: Precision.FP8,
        getattr(TensorProto, "FLOAT4E2M1", -1): Precision.FP4,
    }
    types = {t.name: low[t.data_type] for t in graph.initializer if t.data_type in low}
    for value in (*graph.value_info, *graph.input, *graph.output):
        elem = value.type.tensor_type.elem_type
        if elem in low:
            types[value.name] = low[elem]
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and len(node.input) > 2 and node.input[2] in types:
            types[node.output[0]] = types[node.input[2]]
    return types


def quantized_formats(onnx_path: str | Path) -> set[Precision]:
    """The low-precision element types (FP8, FP4) an ONNX file's tensors use; its graph only."""
    import onnx

    return set(_quantized_types(onnx.load(str(onnx_path), load_external_data=False).graph).values())


def quantized_linear_nodes(onnx_path: str | Path) -> list[str]:
    """Names of the MatMul / Gemm nodes of an ONNX file (its graph only) that read, directly or
    through a Transpose / Reshape / Cast, a ``DequantizeLinear`` of an FP8 tensor (initializer,
    typed value, or ``QuantizeLinear`` output with an FP8 zero point)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    fp8 = {name for name, t in _quantized_types(graph).items() if t is Precision.FP8}
    producer = {out: node for node in graph.node for out in node.output}

    def dequantized(name: str, hops: int = 2) -> bool:
        node = producer.get(name)
        if node is None or hops < 0:
            return False
        if node.op_type == "DequantizeLinear":
            zp = node.input[2] if len(node.input) > 2 else ""
            return zp in fp8 or node.input[0] in fp8
        return node.op_type in ("Transpose", "Reshape", "Cast") and dequantized(node.input[0], hops - 1)

    return [
        node.name or node.output[0]
        for node in graph.node
        if node.op_type in ("MatMul", "Gemm") and any(dequantized(i) for i in node.input)
    ]
