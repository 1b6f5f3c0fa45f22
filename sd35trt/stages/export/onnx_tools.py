"""ONNX graph rewrites of the export stage: standard FP8 Q/DQ, FP8 weight layout, clean-up.

Everything here works on the graph without loading external weights into memory, so a 16 GB
transformer is processed one tensor at a time (see :mod:`sd35trt.stages.export` on memory); files
(external data, saving, checking) are :mod:`sd35trt.stages.export.onnx_files`. ModelOpt's own
``FP8QuantExporter.post_process`` is not used: it also FP8-quantizes the weights of every
un-quantized Conv (``pos_embed.proj``, which calibration excludes) and adds Q/DQ after softmax, so
its graph would no longer be the calibrated fake-quant model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import GraphProto, ModelProto, NodeProto, TensorProto, helper, numpy_helper

from sd35trt.errors import ExportError
from sd35trt.models.quantize import FP8_MAX
from sd35trt.stages.export.onnx_files import FP8, point_at, tensor_array, transpose_stored, uses_external_data

TRT_DOMAIN = "trt"
TRT_FP8_Q = "TRT_FP8QuantizeLinear"
TRT_FP8_DQ = "TRT_FP8DequantizeLinear"
#: The standard ONNX domain's two spellings.
DEFAULT_DOMAINS = ("", "ai.onnx")


def _constant_values(model: ModelProto) -> dict[str, TensorProto]:
    """Tensors by name: initializers and the outputs of Constant nodes."""
    out = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
            for attr in node.attribute:
                if attr.name == "value":
                    out[node.output[0]] = attr.t
    return out


def _zero_point(model: ModelProto, dims: tuple[int, ...]) -> str:
    name = "fp8_zero_point" + "".join(f"_{d}" for d in dims)
    if not any(t.name == name for t in model.graph.initializer):
        zp = helper.make_tensor(name, FP8, list(dims), b"\x00" * int(np.prod(dims, dtype=np.int64)), raw=True)
        model.graph.initializer.append(zp)
    return name


def rewrite_fp8_qdq(model: ModelProto) -> int:
    """Turn ModelOpt's TensorRT FP8 Q/DQ custom ops into standard ONNX ops; returns how many Q/DQ pairs.

    ``QuantizeLinear`` gets a ``float8e4m3fn`` zero point of its scale's shape (that is what
    makes its output FP8) and ``saturate=1``; the Q outputs' value_info becomes FP8 (the
    exporter typed them uint8). The ``trt`` opset import is dropped once unused.

    Raises:
        ExportError: a scale is not a constant, or opset < 19 (no FP8 Q/DQ before 19).
    """
    opset = next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), 0)
    constants = _constant_values(model)
    q_outputs: set[str] = set()
    count = 0
    for node in model.graph.node:
        if node.domain != TRT_DOMAIN or node.op_type not in (TRT_FP8_Q, TRT_FP8_DQ):
            continue
        if opset < 19:
            raise ExportError(f"FP8 Q/DQ needs ONNX opset 19 or newer, the graph has opset {opset}")
        scale = constants.get(node.input[1])
        if scale is None:
            raise ExportError(
                f"FP8 node {node.name} has a computed scale {node.input[1]!r}; expected a constant"
            )
        node.domain = ""
        if node.op_type == TRT_FP8_Q:
            node.op_type = "QuantizeLinear"
            del node.input[2:]
            node.input.append(_zero_point(model, tuple(scale.dims)))
            node.attribute.append(helper.make_attribute("saturate", 1))
            q_outputs.add(node.output[0])
            count += 1
        else:
            node.op_type = "DequantizeLinear"
    for vi in model.graph.value_info:
        if vi.name in q_outputs:
            vi.type.tensor_type.elem_type = FP8
    if not any(n.domain == TRT_DOMAIN for n in model.graph.node):
        keep = [o for o in model.opset_import if o.domain != TRT_DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(keep)
    return count


def custom_ops(model: ModelProto) -> set[str]:
    """``domain::op`` of every node outside the standard ONNX domain (ORT and TensorRT need plugins)."""
    return {f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in DEFAULT_DOMAINS}


def _consumers(graph: GraphProto) -> dict[str, list[NodeProto]]:
    out: dict[str, list[NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _attribute(node: NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _is_transpose_2d(node: NodeProto) -> bool:
    return (
        node.op_type == "Transpose"
        and node.domain in DEFAULT_DOMAINS
        and list(_attribute(node, "perm", [])) == [1, 0]
    )


def _is_gemm_trans_b(node: NodeProto, tensor: str) -> bool:
    return (
        node.op_type == "Gemm"
        and node.domain in DEFAULT_DOMAINS
        and len(node.input) > 1
        and node.input[1] == tensor
        and node.input[0] != tensor
        and _attribute(node, "transB", 0) == 1
    )


def pretranspose_qdq_weights(model: ModelProto, model_path: Path) -> int:
    """Store FP8-quantized Linear weights as ``[in, out]`` (DQ feeds the GEMM directly); returns how many.

    The TorchScript exporter writes ``nn.Linear`` as ``W [out, in] -> Q -> DQ -> Transpose ->
    MatMul`` (3-D inputs) or ``-> Gemm(transB=1)`` (2-D inputs); TensorRT fuses an FP8 GEMM from
    ``DQ -> MatMul`` (ModelOpt's FP8 exporter pre-transposes too). With one scale per tensor,
    quantization commutes with the transpose: the numbers are exactly the same. The bytes are
    rewritten where they are stored (no second copy, one weight in memory at a time). Weights that
    are shared, per-channel scaled, not 2-D, or whose DequantizeLinear output has other users are
    left alone. Value infos of the changed tensors are dropped: run :func:`clean_up` afterwards.

    Args:
        model: a graph after :func:`rewrite_fp8_qdq` (scales are constants); changed in place.
        model_path: where ``model``'s external data is relative to (the traced file); its data
            files are modified.
    """
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    constants = _constant_values(model)
    consumers = _consumers(graph)
    graph_outputs = {o.name for o in graph.output}
    dropped_nodes: list[NodeProto] = []
    changed: set[str] = set()
    count = 0
    for q in graph.node:
        if q.op_type != "QuantizeLinear" or q.domain not in DEFAULT_DOMAINS:
            continue
        weight = initializers.get(q.input[0])
        scale = constants.get(q.input[1])
        if weight is None or scale is None or len(weight.dims) != 2 or int(np.prod(scale.dims)) != 1:
            continue
        if len(consumers.get(weight.name, [])) != 1 or weight.name in graph_outputs:
            continue
        dqs = consumers.get(q.output[0], [])
        if not dqs or any(d.op_type != "DequantizeLinear" for d in dqs):
            continue
        users = [(dq, u) for dq in dqs for u in consumers.get(dq.output[0], [])]
        if not users or any(dq.output[0] in graph_outputs for dq in dqs):
            continue
        if all(_is_transpose_2d(u) and u.output[0] not in graph_outputs for _, u in users):
            for dq, transpose in users:
                for user in consumers.get(transpose.output[0], []):
                    user.input[:] = [dq.output[0] if n == transpose.output[0] else n for n in user.input]
                dropped_nodes.append(transpose)
                changed.add(transpose.output[0])
        elif all(_is_gemm_trans_b(u, dq.output[0]) for dq, u in users):
            for _, gemm in users:
                for attr in gemm.attribute:
                    if attr.name == "transB":
                        attr.i = 0
        else:
            continue
        transpose_stored(weight, model_path)
        changed |= {q.output[0], *(dq.output[0] for dq in dqs)}
        count += 1
    for node in dropped_nodes:
        graph.node.remove(node)
    keep = [vi for vi in graph.value_info if vi.name not in changed]
    del graph.value_info[:]
    graph.value_info.extend(keep)
    return count


def fold_fp8_weights(model: ModelProto, model_path: Path) -> int:
    """Store quantized weights as FP8: ``W -> Q -> DQ`` becomes ``W_fp8 -> DQ``; returns how many.

    The FP8 values are what ``QuantizeLinear`` computes (``saturate(round(W / scale))``, round
    to nearest even, in float32), so the graph's numbers do not change. One weight is in memory
    at a time: each FP8 weight goes straight to ``<model_path>.fp8.data`` and the graph refers
    to it as external data (:func:`save_model` later streams it into the final file).

    ``model`` comes after :func:`rewrite_fp8_qdq` and :func:`clean_up` (scales are constants);
    ``model_path`` is where its external data is relative to (the exported file).
    """
    import ml_dtypes

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    constants = _constant_values(model)
    consumers = _consumers(graph)
    folded: list[NodeProto] = []
    sink = model_path.with_name(model_path.name + ".fp8.data")
    with open(sink, "wb") as out:
        for node in graph.node:
            if node.op_type != "QuantizeLinear" or node.domain not in DEFAULT_DOMAINS:
                continue
            weight = initializers.get(node.input[0])
            users = consumers.get(node.output[0], [])
            if weight is None or not users or any(u.op_type != "DequantizeLinear" for u in users):
                continue
            scale = numpy_helper.to_array(constants[node.input[1]]).astype(np.float32)
            values = tensor_array(weight, model_path).astype(np.float32)  # one weight, float32
            fp8 = np.clip(values / scale, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
            tensor = TensorProto(name=f"{weight.name}_fp8", data_type=FP8, dims=fp8.shape)
            point_at(tensor, sink.name, out.tell(), fp8.nbytes)
            out.write(fp8.tobytes())
            graph.initializer.append(tensor)
            for user in users:
                user.input[0] = tensor.name
            folded.append(node)
    for node in folded:
        graph.node.remove(node)
    _remove_unused_initializers(model)
    return len(folded)


def strip_qdq(model: ModelProto) -> ModelProto:
    """A copy of ``model`` with every ``QuantizeLinear -> DequantizeLinear`` pair removed.

    Quantized weights must still be in high precision (not :func:`fold_fp8_weights`): the
    result is then the unquantized graph, numerically the model with its quantizers disabled.

    Raises:
        ExportError: a DQ reads FP8 data that is not a Q output (folded FP8 weights).
    """
    out = ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    producers = {o: n for n in graph.node for o in n.output}
    rename: dict[str, str] = {}
    dead: list[NodeProto] = []
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.domain not in DEFAULT_DOMAINS:
            continue
        q = producers.get(node.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            raise ExportError(
                f"DequantizeLinear {node.name} reads {node.input[0]!r}, not a QuantizeLinear output "
                "(FP8 weights can't be turned back into the unquantized model)"
            )
        rename[node.output[0]] = q.input[0]
        dead += [node, q]
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    for o in graph.output:
        if o.name in rename:
            raise ExportError(f"graph output {o.name} comes straight from a DequantizeLinear")
    for node in {id(n): n for n in dead}.values():
        graph.node.remove(node)
    drop = set(rename)
    keep = [vi for vi in graph.value_info if vi.name not in drop]
    del graph.value_info[:]
    graph.value_info.extend(keep)
    _remove_unused_initializers(out)
    return out


def _remove_unused_initializers(model: ModelProto) -> None:
    used = {name for node in model.graph.node for name in node.input}
    used |= {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def einsum_to_transpose(model: ModelProto) -> int:
    """Replace single-input Einsums that only permute axes (diffusers' unpatchify) by Transpose.

    ONNX defines Einsum for no 16-bit float type, and TensorRT maps Transpose to a shuffle
    directly. Returns the number of nodes replaced.
    """
    count = 0
    for node in model.graph.node:
        if node.op_type != "Einsum" or node.domain not in DEFAULT_DOMAINS or len(node.input) != 1:
            continue
        equation = next((a.s.decode() for a in node.attribute if a.name == "equation"), "").replace(" ", "")
        src, _, dst = equation.partition("->")
        if not dst or "." in equation or sorted(src) != sorted(dst) or len(set(src)) != len(src):
            continue
        perm = [src.index(c) for c in dst]
        node.op_type = "Transpose"
        del node.attribute[:]
        node.attribute.append(helper.make_attribute("perm", perm))
        count += 1
    return count


def cast_unsupported_bf16(model: ModelProto) -> int:
    """Run the ops the graph's opset defines without bfloat16 in float32, in place; returns how many.

    Before opset 22, ONNX's Conv, ConvTranspose and InstanceNormalization take no bfloat16 (the
    checker rejects such a graph). Their bfloat16 inputs get a Cast to float32 and their outputs
    a Cast back; bfloat16 -> float32 is exact, and PyTorch accumulates bfloat16 convolutions in
    float32 too. In an SD3.5 transformer this is only the patch-embedding Conv.

    ``model`` needs inferred types (after :func:`clean_up`).
    """
    opset = next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), 0)
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input, *graph.output)}
    types.update({t.name: t.data_type for t in graph.initializer})
    bf16, f32 = TensorProto.BFLOAT16, TensorProto.FLOAT
    nodes: list[NodeProto] = []
    count = 0
    for node in model.graph.node:
        if node.domain not in DEFAULT_DOMAINS:
            nodes.append(node)
            continue
        schema = onnx.defs.get_schema(node.op_type, opset)
        denied = {
            c.type_param_str for c in schema.type_constraints if "tensor(bfloat16)" not in c.allowed_type_strs
        }

        def param(formals, i: int) -> str:
            return formals[min(i, len(formals) - 1)].type_str  # the last formal may be variadic

        wrap = [
            i
            for i, name in enumerate(node.input)
            if name and types.get(name) == bf16 and param(schema.inputs, i) in denied
        ]
        if not wrap:
            nodes.append(node)
            continue
        params = {param(schema.inputs, i) for i in wrap}
        for i in wrap:
            cast = f"{node.name}/bf16_to_f32_{i}"
            nodes.append(helper.make_node("Cast", [node.input[i]], [cast], name=cast, to=f32))
            node.input[i] = cast
        nodes.append(node)
        for j, out in enumerate(node.output):
            if out and param(schema.outputs, j) in params:
                wide = f"{node.name}/f32_output_{j}"
                node.output[j] = wide
                nodes.append(helper.make_node("Cast", [wide], [out], name=f"{wide}_to_bf16", to=bf16))
        count += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return count


def _is_bf16(dtype) -> bool:
    """Whether a graphsurgeon dtype (numpy / ml_dtypes dtype or ONNX enum) is bfloat16."""
    return dtype == TensorProto.BFLOAT16 or getattr(dtype, "name", None) == "bfloat16"


def clean_up(model: ModelProto, fold: bool = True, size_threshold: int = 64 << 20) -> ModelProto:
    """Fold constants, drop dead nodes and tensors, sort, and infer shapes, into a new proto.

    Folding uses onnx-graphsurgeon (evaluated with ONNX Runtime). Not folded: Q and DQ nodes
    (folding would turn quantized weights into plain ones or into FP8 constants), nodes reading
    external-data tensors (their bytes stay on disk), and results over ``size_threshold``
    bytes. Folding failures on a node leave it as it was.
    """
    import onnx_graphsurgeon as gs
    import onnxruntime as ort
    from onnx_graphsurgeon.logger import G_LOGGER

    # Folding failures are expected (ORT's CPU provider has no bfloat16 kernels, FP8 has no
    # numpy type) and leave the nodes as they are, so only errors are worth printing; ORT's
    # default logger would also warn about every Unsqueeze of a dynamic shape.
    G_LOGGER.severity = G_LOGGER.ERROR
    ort.set_default_logger_severity(3)
    # The lowest IR version that carries the model's opsets (and FP8: 9): readers reject newer ones.
    model.ir_version = max(9, helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True))
    einsum_to_transpose(model)
    graph = gs.import_onnx(model)
    if fold:

        def keep(node) -> bool:
            if node.op in ("QuantizeLinear", "DequantizeLinear"):
                return True
            # ORT's CPU provider has no bfloat16 kernels: one such node would fail the whole fold.
            if any(_is_bf16(t.dtype) for t in (*node.inputs, *node.outputs)):
                return True
            return any(
                isinstance(t, gs.Constant) and uses_external_data(getattr(t._values, "tensor", TensorProto()))
                for t in node.inputs
            )

        graph.fold_constants(should_exclude_node=keep, size_threshold=size_threshold, error_ok=True)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = model.ir_version
    del out.metadata_props[:]
    out.metadata_props.extend(model.metadata_props)
    return onnx.shape_inference.infer_shapes(out, data_prop=True)
