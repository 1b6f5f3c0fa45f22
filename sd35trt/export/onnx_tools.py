"""ONNX graph work of the export stage: standard FP8 Q/DQ, clean-up, external data, checks.

Everything here works on the graph without loading external weights into memory, so a 16 GB
transformer is processed one tensor at a time (see :mod:`sd35trt.export` on memory):

- :func:`rewrite_fp8_qdq` turns ModelOpt's ``trt::TRT_FP8QuantizeLinear`` /
  ``trt::TRT_FP8DequantizeLinear`` into standard ``QuantizeLinear`` / ``DequantizeLinear``
  with a ``float8e4m3fn`` zero point (opset >= 19), which both ONNX Runtime and TensorRT read.
  ModelOpt's own ``FP8QuantExporter.post_process`` is not used: it also FP8-quantizes the
  weights of every un-quantized Conv (``pos_embed.proj``, which calibration excludes) and adds
  Q/DQ after softmax, so its graph would no longer be the calibrated fake-quant model.
- :func:`fold_fp8_weights` stores quantized weights as FP8 initializers (half the bytes of BF16).
- :func:`clean_up` folds constants and removes dead nodes with onnx-graphsurgeon, never folding
  Q/DQ (that would silently (de)quantize weights) nor nodes that read external weights.
- :func:`save_model` streams tensors into one ``<name>.onnx.data`` file beside the model.
- :func:`check_external_data` refuses data locations that are absolute, escape the model's
  directory or go through a symlink, before any ONNX parser follows them; :func:`check_onnx_file`
  adds the ONNX checker on the path.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import onnx
from onnx import GraphProto, ModelProto, NodeProto, TensorProto, helper, numpy_helper

from sd35trt.errors import ExportError, ModelError

TRT_DOMAIN = "trt"
TRT_FP8_Q = "TRT_FP8QuantizeLinear"
TRT_FP8_DQ = "TRT_FP8DequantizeLinear"
FP8 = TensorProto.FLOAT8E4M3FN
#: Largest finite FP8 E4M3FN magnitude (the format has no infinity; QuantizeLinear saturates).
FP8_MAX = 448.0
#: Tensor bytes above which a model is saved with external data: protobuf refuses messages of
#: 2 GiB and more, and the graph itself needs some room.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**27
#: With external data, tensors smaller than this stay inside the .onnx file (shapes, scales).
SMALL_TENSOR_BYTES = 1024
#: Tensors in the data file start at multiples of this (page size: runtimes can mmap them).
ALIGNMENT = 4096
_DEFAULT_DOMAINS = ("", "ai.onnx")


def _dtype_name(elem_type: int) -> str:
    return helper.tensor_dtype_to_np_dtype(elem_type).name if elem_type != FP8 else "float8e4m3fn"


# --------------------------------------------------------------------------------------------
# Tensors and external data
# --------------------------------------------------------------------------------------------


def _graph_tensors(graph: GraphProto) -> Iterator[TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _graph_tensors(attr.g)
            for sub in attr.graphs:
                yield from _graph_tensors(sub)


def iter_tensors(model: ModelProto) -> Iterator[TensorProto]:
    """Every tensor stored in ``model``: initializers and Constant attributes, subgraphs included.

    Args:
        model: the model proto (external data loaded or not).

    Returns:
        An iterator over the TensorProtos, which callers may modify in place.
    """
    yield from _graph_tensors(model.graph)
    for fn in model.functions:
        for node in fn.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t


def uses_external_data(tensor: TensorProto) -> bool:
    """Whether ``tensor``'s bytes live in a file outside the proto."""
    return tensor.data_location == TensorProto.EXTERNAL


@dataclass(frozen=True)
class ExternalRef:
    """Where a tensor's bytes are: ``length`` None means up to the end of the file."""

    location: str
    offset: int
    length: int | None


def external_ref(tensor: TensorProto) -> ExternalRef:
    """Where an external tensor's bytes are.

    Raises:
        ModelError: the offset or length is not an integer.
    """
    entries = {e.key: e.value for e in tensor.external_data}
    try:
        offset = int(entries.get("offset", 0))
        length = int(entries["length"]) if "length" in entries else None
    except ValueError:
        raise ModelError(f"tensor {tensor.name!r} has a non-integer external data offset or length") from None
    return ExternalRef(entries.get("location", ""), offset, length)


def _tensor_nbytes(tensor: TensorProto) -> int:
    """Bytes of a tensor's data, stored in the proto or outside it."""
    if uses_external_data(tensor):
        ref = external_ref(tensor)
        if ref.length is not None:
            return ref.length
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    count = int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
    itemsize = 1 if tensor.data_type == FP8 else helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return count * itemsize


def _safe_data_path(model_path: Path, tensor_name: str, location: str) -> Path:
    """The data file of ``location`` for the model at ``model_path``, or a ModelError.

    Allowed: a relative path that stays inside the model's directory, with no symlink anywhere
    between that directory and the file, naming an existing regular file.
    """
    where = f"{model_path}: tensor {tensor_name!r} has external data location {location!r}"
    allowed = f"only a relative path to a regular file inside {model_path.parent} is allowed"
    if not location:
        raise ModelError(f"{where} (empty); {allowed}")
    windows = PureWindowsPath(location)
    if (
        PurePosixPath(location).is_absolute()
        or windows.is_absolute()
        or windows.drive
        or location[0] in "/\\"
    ):
        raise ModelError(f"{where}, an absolute path; {allowed}")
    parts = PurePosixPath(location.replace("\\", "/")).parts
    if ".." in parts:
        raise ModelError(f"{where}, which escapes the model directory; {allowed}")
    base = model_path.parent
    current = base
    for part in parts:
        current = current / part
        if current.is_symlink():
            raise ModelError(f"{where}, and {current} is a symlink; {allowed}")
    real_base = base.resolve()
    if not current.resolve().is_relative_to(real_base):
        raise ModelError(f"{where}, which resolves outside {real_base}; {allowed}")
    try:
        mode = current.lstat().st_mode
    except FileNotFoundError:
        raise ModelError(f"{where}, which does not exist; {allowed}") from None
    if not stat.S_ISREG(mode):
        raise ModelError(f"{where}, which is not a regular file; {allowed}")
    return current


def check_external_data(path: str | Path) -> ModelProto:
    """Refuse unsafe or broken external-data references of the ONNX file at ``path``.

    Only the graph is parsed (``load_external_data=False``); no data file is opened unless its
    location passed the checks. Run this before handing a file to ONNX Runtime or TensorRT.

    Returns:
        The model proto without its external data.

    Raises:
        ModelError: the file is missing or not ONNX, or a tensor's location is absolute, escapes
            the model's directory, goes through a symlink, is missing, or its offset and length
            run past the end of the data file.
    """
    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except FileNotFoundError:
        raise ModelError(f"ONNX file {path} does not exist") from None
    except Exception as err:  # protobuf's DecodeError and friends: the file is not ONNX
        raise ModelError(f"{path} is not a readable ONNX model ({type(err).__name__}: {err})") from None
    sizes: dict[Path, int] = {}
    for tensor in iter_tensors(model):
        if not uses_external_data(tensor):
            continue
        ref = external_ref(tensor)
        data = _safe_data_path(path, tensor.name, ref.location)
        size = sizes.setdefault(data, data.stat().st_size)
        end = ref.offset + (ref.length or 0)
        if ref.offset > size or end > size:
            raise ModelError(
                f"{path}: tensor {tensor.name!r} needs bytes {ref.offset}..{end} of {data}, which has {size} "
                "(truncated data file)"
            )
    return model


def _read_external(tensor: TensorProto, model_path: Path) -> bytes:
    """The bytes of one external tensor of the model at ``model_path`` (location checked first)."""
    ref = external_ref(tensor)
    data = _safe_data_path(model_path, tensor.name, ref.location)
    fd = os.open(data, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        f.seek(ref.offset)
        blob = f.read() if ref.length is None else f.read(ref.length)
    if ref.length is not None and len(blob) != ref.length:
        raise ModelError(
            f"{data} is truncated: tensor {tensor.name!r} needs {ref.length} bytes at {ref.offset}"
        )
    return blob


def _tensor_array(tensor: TensorProto, model_path: Path) -> np.ndarray:
    """A tensor's values as numpy (bfloat16 / float8 as ml_dtypes), reading external data."""
    if not uses_external_data(tensor):
        return numpy_helper.to_array(tensor)
    inline = TensorProto()
    inline.CopyFrom(tensor)
    del inline.external_data[:]
    inline.data_location = TensorProto.DEFAULT
    inline.raw_data = _read_external(tensor, model_path)
    return numpy_helper.to_array(inline)


def _raw_bytes(tensor: TensorProto) -> bytes:
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    # Typed fields (float_data, int64_data, ...): convert through numpy to the raw layout.
    return numpy_helper.from_array(numpy_helper.to_array(tensor)).raw_data


# --------------------------------------------------------------------------------------------
# Q/DQ
# --------------------------------------------------------------------------------------------


def _constant_values(model: ModelProto) -> dict[str, TensorProto]:
    """Tensors by name: initializers and the outputs of Constant nodes."""
    out = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS:
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
    """Turn ModelOpt's TensorRT FP8 Q/DQ custom ops into standard ONNX ops, in place.

    ``QuantizeLinear`` gets a ``float8e4m3fn`` zero point of its scale's shape (that is what
    makes its output FP8) and ``saturate=1``; the Q outputs' value_info becomes FP8 (the
    exporter typed them uint8). The ``trt`` opset import is dropped once unused.

    Returns:
        The number of Q/DQ pairs rewritten.

    Raises:
        ExportError: a scale is not a constant, or opset < 19 (no FP8 Q/DQ before 19).
    """
    opset = next((o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), 0)
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


def float32_io(model: ModelProto) -> ModelProto | None:
    """A copy of ``model`` whose bfloat16 inputs and outputs are float32, or None if it has none.

    Casts at the edges keep the compute in bfloat16; names are unchanged. Only the graph is
    copied (``model`` is loaded without external data, locations stay relative).
    """
    bf16, f32 = TensorProto.BFLOAT16, TensorProto.FLOAT
    edges = [v for v in (*model.graph.input, *model.graph.output) if v.type.tensor_type.elem_type == bf16]
    if not edges:
        return None
    out = ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inputs = {v.name for v in graph.input if v.type.tensor_type.elem_type == bf16}
    outputs = {v.name for v in graph.output if v.type.tensor_type.elem_type == bf16}
    inner = {name: f"{name}__bfloat16" for name in inputs | outputs}
    for node in graph.node:
        node.input[:] = [inner.get(n, n) for n in node.input]
        node.output[:] = [inner.get(n, n) for n in node.output]
    casts = [
        helper.make_node("Cast", [n], [inner[n]], name=f"{n}/to_bfloat16", to=bf16) for n in sorted(inputs)
    ]
    tail = [
        helper.make_node("Cast", [inner[n]], [n], name=f"{n}/to_float32", to=f32) for n in sorted(outputs)
    ]
    nodes = [*casts, *graph.node, *tail]
    del graph.node[:]
    graph.node.extend(nodes)
    for v in (*graph.input, *graph.output):
        if v.name in inner:
            v.type.tensor_type.elem_type = f32
    return out


def custom_ops(model: ModelProto) -> set[str]:
    """Ops ONNX Runtime and TensorRT can't read without plugins.

    Returns:
        ``domain::op`` of every node outside the standard ONNX domain.
    """
    return {f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in _DEFAULT_DOMAINS}


def _consumers(graph: GraphProto) -> dict[str, list[NodeProto]]:
    out: dict[str, list[NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def fold_fp8_weights(model: ModelProto, model_path: Path) -> int:
    """Store quantized weights as FP8: ``W -> Q -> DQ`` becomes ``W_fp8 -> DQ``, in place.

    The FP8 values are what ``QuantizeLinear`` computes (``saturate(round(W / scale))``, round
    to nearest even, in float32), so the graph's numbers do not change. One weight is in memory
    at a time: each FP8 weight goes straight to ``<model_path>.fp8.data`` and the graph refers
    to it as external data (:func:`save_model` later streams it into the final file).

    Args:
        model: a graph after :func:`rewrite_fp8_qdq` and :func:`clean_up` (scales are constants).
        model_path: where ``model``'s external data is relative to (the exported file).

    Returns:
        The number of weights folded.
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
            if node.op_type != "QuantizeLinear" or node.domain not in _DEFAULT_DOMAINS:
                continue
            weight = initializers.get(node.input[0])
            users = consumers.get(node.output[0], [])
            if weight is None or not users or any(u.op_type != "DequantizeLinear" for u in users):
                continue
            scale = numpy_helper.to_array(constants[node.input[1]]).astype(np.float32)
            values = _tensor_array(weight, model_path).astype(np.float32)  # one weight, float32
            fp8 = np.clip(values / scale, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
            tensor = TensorProto(name=f"{weight.name}_fp8", data_type=FP8, dims=fp8.shape)
            _point_at(tensor, sink.name, out.tell(), fp8.nbytes)
            out.write(fp8.tobytes())
            graph.initializer.append(tensor)
            for user in users:
                user.input[0] = tensor.name
            folded.append(node)
    for node in folded:
        graph.node.remove(node)
    _remove_unused_initializers(model)
    return len(folded)


def _point_at(tensor: TensorProto, location: str, offset: int, length: int) -> None:
    """Make ``tensor`` refer to ``length`` bytes at ``offset`` of the file ``location``."""
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        tensor.ClearField(field)
    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)


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
        if node.op_type != "DequantizeLinear" or node.domain not in _DEFAULT_DOMAINS:
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


# --------------------------------------------------------------------------------------------
# Clean-up
# --------------------------------------------------------------------------------------------


def einsum_to_transpose(model: ModelProto) -> int:
    """Replace single-input Einsums that only permute axes (diffusers' unpatchify) by Transpose.

    ONNX defines Einsum for no 16-bit float type, and TensorRT maps Transpose to a shuffle
    directly.

    Returns:
        The number of nodes replaced.
    """
    count = 0
    for node in model.graph.node:
        if node.op_type != "Einsum" or node.domain not in _DEFAULT_DOMAINS or len(node.input) != 1:
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


def _elem_types(model: ModelProto) -> dict[str, int]:
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input, *graph.output)}
    types.update({t.name: t.data_type for t in graph.initializer})
    return types


def cast_unsupported_bf16(model: ModelProto) -> int:
    """Run the ops the graph's opset defines without bfloat16 in float32, in place.

    Before opset 22, ONNX's Conv, ConvTranspose and InstanceNormalization take no bfloat16 (the
    checker rejects such a graph). Their bfloat16 inputs get a Cast to float32 and their outputs
    a Cast back; bfloat16 -> float32 is exact, and PyTorch accumulates bfloat16 convolutions in
    float32 too. In an SD3.5 transformer this is only the patch-embedding Conv.

    Args:
        model: a graph with inferred types (after :func:`clean_up`).

    Returns:
        The number of nodes wrapped.
    """
    opset = next((o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), 0)
    types = _elem_types(model)
    bf16, f32 = TensorProto.BFLOAT16, TensorProto.FLOAT
    nodes: list[NodeProto] = []
    count = 0
    for node in model.graph.node:
        if node.domain not in _DEFAULT_DOMAINS:
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


def _set_ir_version(model: ModelProto) -> None:
    """The lowest IR version that carries the model's opsets (and FP8: 9): readers reject newer ones."""
    model.ir_version = max(9, helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True))


def clean_up(model: ModelProto, fold: bool = True, size_threshold: int = 64 << 20) -> ModelProto:
    """Fold constants, drop dead nodes and tensors, sort, and infer shapes.

    Folding uses onnx-graphsurgeon (evaluated with ONNX Runtime). Not folded: Q and DQ nodes
    (folding would turn quantized weights into plain ones or into FP8 constants), nodes reading
    external-data tensors (their bytes stay on disk), and results over ``size_threshold``
    bytes. Folding failures on a node leave it as it was.

    Returns:
        The cleaned model (a new proto).
    """
    import onnx_graphsurgeon as gs
    import onnxruntime as ort
    from onnx_graphsurgeon.logger import G_LOGGER

    # Folding failures are expected (ORT's CPU provider has no bfloat16 kernels, FP8 has no
    # numpy type) and leave the nodes as they are, so only errors are worth printing; ORT's
    # default logger would also warn about every Unsqueeze of a dynamic shape.
    G_LOGGER.severity = G_LOGGER.ERROR
    ort.set_default_logger_severity(3)
    _set_ir_version(model)
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


# --------------------------------------------------------------------------------------------
# Saving and checking
# --------------------------------------------------------------------------------------------


def tensors_bytes(model: ModelProto) -> int:
    """Bytes of all tensors of ``model``, stored inline or outside."""
    return sum(_tensor_nbytes(t) for t in iter_tensors(model))


def save_model(model: ModelProto, path: Path, source: Path | None, external: bool) -> list[Path]:
    """Write ``model`` to ``path``, streaming its weights; ``model`` is updated to match the file.

    Args:
        model: the graph; its external tensors are read from beside ``source``.
        path: the ``.onnx`` file to write.
        source: the file ``model``'s external locations are relative to (None: none are).
        external: put every tensor of ``SMALL_TENSOR_BYTES`` or more into ``<path>.data``
            beside the model, with a relative location; otherwise everything goes inline.

    Returns:
        The files written (the model, then the data file if any).
    """
    path = Path(path)
    data_path = path.with_name(path.name + ".data")
    written = [path]
    if external:
        with open(data_path, "wb") as out:
            for tensor in iter_tensors(model):
                if not uses_external_data(tensor) and _tensor_nbytes(tensor) < SMALL_TENSOR_BYTES:
                    continue
                blob = _read_external(tensor, source) if uses_external_data(tensor) else _raw_bytes(tensor)
                offset = -(-out.tell() // ALIGNMENT) * ALIGNMENT
                out.seek(offset)
                out.write(blob)
                _point_at(tensor, data_path.name, offset, len(blob))
            out.flush()
            os.fsync(out.fileno())
        written.append(data_path)
    else:
        for tensor in iter_tensors(model):
            if uses_external_data(tensor):
                blob = _read_external(tensor, source)
                del tensor.external_data[:]
                tensor.data_location = TensorProto.DEFAULT
                tensor.raw_data = blob
    onnx.save_model(model, str(path))
    return written


def check_onnx_file(path: str | Path) -> ModelProto:
    """:func:`check_external_data`, then the ONNX checker on the path (full check, data included).

    Returns:
        The model proto without its external data.

    Raises:
        ModelError: an unsafe or broken external-data reference.
        ExportError: the checker rejects the model.
    """
    model = check_external_data(path)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(f"{path} fails the ONNX checker: {first}") from None
    return model


def io_signature(model: ModelProto) -> dict[str, dict[str, dict]]:
    """The graph's inputs and outputs as the manifest records them.

    Returns:
        ``{"inputs"|"outputs": {name: {"dtype": "float32", "shape": [dim or axis name]}}}``.
    """

    def describe(values) -> dict[str, dict]:
        out = {}
        for v in values:
            tt = v.type.tensor_type
            dims = [d.dim_param if d.HasField("dim_param") else d.dim_value for d in tt.shape.dim]
            out[v.name] = {"dtype": _dtype_name(tt.elem_type), "shape": dims}
        return out

    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    return {"inputs": describe(inputs), "outputs": describe(model.graph.output)}


def count_ops(model: ModelProto) -> dict[str, int]:
    """Number of nodes per op type in the main graph."""
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
