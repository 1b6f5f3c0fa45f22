"""ONNX files of the export stage: tensors and external data, saving, checking, signatures.

Nothing here loads external weights into memory: a 16 GB transformer is read and written one
tensor at a time (see :mod:`sd35trt.stages.export` on memory).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import onnx
from onnx import GraphProto, ModelProto, TensorProto, helper, numpy_helper

from sd35trt.errors import ExportError, ModelError, first_line

FP8 = TensorProto.FLOAT8E4M3FN
#: Tensor bytes above which a model is saved with external data: protobuf refuses messages of
#: 2 GiB and more, and the graph itself needs some room.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**27
#: With external data, tensors smaller than this stay inside the .onnx file (shapes, scales).
SMALL_TENSOR_BYTES = 1024
#: Tensors in the data file start at multiples of this (page size: runtimes can mmap them).
ALIGNMENT = 4096


def _dtype_name(elem_type: int) -> str:
    return helper.tensor_dtype_to_np_dtype(elem_type).name if elem_type != FP8 else "float8e4m3fn"


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
    """Every tensor stored in ``model`` (initializers and Constant attributes, subgraphs included).

    External data may be loaded or not; callers may modify the tensors in place.
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

    Only the graph is parsed (``load_external_data=False``) and returned; no data file is opened
    unless its location passed the checks. Run this before handing a file to ONNX Runtime or TensorRT.

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


def tensor_array(tensor: TensorProto, model_path: Path) -> np.ndarray:
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


def transpose_stored(tensor: TensorProto, model_path: Path) -> None:
    """Transpose a 2-D tensor's stored bytes where they are: inline, or in place in its data file.

    No second copy of the weight is written anywhere (the traced model's data file is scratch);
    one tensor is in memory at a time. Elements are moved as unsigned integers of their width,
    which is exact for every dtype (bfloat16 and FP8 included).

    Args:
        tensor: a 2-D initializer ``[rows, cols]``; becomes ``[cols, rows]``.
        model_path: the model file its external location is relative to.

    Raises:
        ModelError: its external data is unsafe or truncated.
    """
    rows, cols = tensor.dims
    external = uses_external_data(tensor)
    raw = _read_external(tensor, model_path) if external else _raw_bytes(tensor)
    itemsize = len(raw) // (rows * cols)
    flipped = np.frombuffer(raw, dtype=f"<u{itemsize}").reshape(rows, cols).T.tobytes()
    del tensor.dims[:]
    tensor.dims.extend([cols, rows])
    if external:
        ref = external_ref(tensor)
        data = _safe_data_path(model_path, tensor.name, ref.location)
        fd = os.open(data, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "r+b") as f:
            f.seek(ref.offset)
            f.write(flipped)
        return
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        tensor.ClearField(field)
    tensor.raw_data = flipped


def point_at(tensor: TensorProto, location: str, offset: int, length: int) -> None:
    """Make ``tensor`` refer to ``length`` bytes at ``offset`` of the file ``location``."""
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        tensor.ClearField(field)
    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)


def tensors_bytes(model: ModelProto) -> int:
    """Bytes of all tensors of ``model``, stored inline or outside."""
    return sum(_tensor_nbytes(t) for t in iter_tensors(model))


def save_model(model: ModelProto, path: Path, source: Path | None, external: bool) -> list[Path]:
    """Write ``model`` to ``path``, streaming its weights; ``model`` is updated to match the file.

    Args:
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
                point_at(tensor, data_path.name, offset, len(blob))
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
    """:func:`check_external_data` (whose model proto it returns), then the full ONNX checker.

    Raises:
        ModelError: an unsafe or broken external-data reference.
        ExportError: the checker rejects the model.
    """
    model = check_external_data(path)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        first = first_line(err)
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
