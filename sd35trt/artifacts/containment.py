"""Paths recorded in run directories and artefacts stay inside them.

A manifest or ``SHA256SUMS`` edited (or crafted) to name ``../../elsewhere`` or to pass through a
symlink would make ``verify`` vouch for, and ``run`` load, a file outside that directory.
:func:`contained_path` is the one check every reader of a recorded path goes through, the
external-data locations inside ONNX engines included (:func:`check_onnx_external_data`).
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from sd35trt.errors import UnsafeArtifactError


def contained_path(root: str | Path, rel: str) -> Path:
    """``root / rel`` after checking that ``rel`` stays inside ``root`` with no symlink on the way
    (``root`` itself may be reached through one: ``/srv`` -> ``/data/srv``).

    Raises:
        UnsafeArtifactError: ``rel`` is empty, absolute, contains ``..`` or a NUL, or a
            component of it is a symlink (its target is named).
    """
    root = Path(root)
    parts = PurePosixPath(rel).parts if isinstance(rel, str) else ()
    if not parts or "\0" in rel or parts[0] == "/" or ".." in parts:
        raise UnsafeArtifactError(
            f"path {rel!r} recorded in {root} leaves it (absolute, empty or with '..'); "
            "recorded paths must stay inside their directory"
        )
    current = root
    for part in parts:
        current = current / part
        if current.is_symlink():
            raise UnsafeArtifactError(
                f"{current} is a symlink (to {os.readlink(current)}); artefacts and run directories "
                "hold regular files only"
            )
    return current


# -- ONNX external data ------------------------------------------------------------------------------
# A crafted engine naming ``../secret.bin`` makes ONNX Runtime before 1.32 read a file outside the
# artefact. The graph is read at the protobuf wire level (the runtime does not import ``onnx``), for
# every tensor ONNX Runtime could load: initializers, sparse initializers and tensor attributes, in
# subgraphs and functions too.

#: Protobuf field numbers (onnx.proto) of the messages that hold tensors, by message kind.
_TENSOR_FIELDS: dict[str, dict[int, str]] = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "function": {7: "node", 11: "attribute"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}
#: Deepest nesting of graphs walked (a deeper model is refused: ONNX Runtime limits it too).
_MAX_NESTING = 64


class _Malformed(Exception):
    """Not a protobuf message: ONNX Runtime cannot parse it either, and says so itself."""


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while pos < end and shift < 70:
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos
    raise _Malformed


def _fields(buf: memoryview, start: int, end: int, group: int | None = None) -> tuple[list, int]:
    """The fields of the message in ``buf[start:end]`` as ``(number, wire type, value)`` (a varint,
    or ``(start, end)`` of a length-delimited field), and where it ended. Groups (wire types 3, 4)
    are skipped as protobuf skips unknown fields; ``group`` is the number of an open group."""
    out, pos = [], start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            out.append((number, wire, value))
        elif wire == 2:
            size, pos = _varint(buf, pos, end)
            if pos + size > end:
                raise _Malformed
            out.append((number, wire, (pos, pos + size)))
            pos += size
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        elif wire == 3:
            pos = _fields(buf, pos, end, group=number)[1]
        elif wire == 4 and number == group:
            return out, pos
        else:
            raise _Malformed
    if pos != end or group is not None:
        raise _Malformed
    return out, pos


def _tensor_location(buf: memoryview, fields: list) -> tuple[str, str] | None:
    """``(name, location)`` of a TensorProto with an external-data ``location``, else ``None``."""
    name, location = "", None
    for number, wire, value in fields:
        if wire != 2:
            continue
        if number == 8:
            name = bytes(buf[value[0] : value[1]]).decode("utf-8", "replace")
        elif number == 13:  # external_data: StringStringEntryProto {key = 1, value = 2}
            entry = {n: bytes(buf[v[0] : v[1]]) for n, w, v in _fields(buf, *value)[0] if w == 2}
            if entry.get(1) == b"location":
                location = entry.get(2, b"").decode("utf-8", "surrogateescape")
    return (name, location) if location is not None else None


def onnx_external_locations(data: bytes) -> list[tuple[str, str]]:
    """``(tensor name, location)`` of every tensor of an ONNX model that names external data (none
    for bytes that are not a protobuf message: ONNX Runtime refuses the file itself).

    Raises:
        UnsafeArtifactError: graphs nested deeper than :data:`_MAX_NESTING`.
    """
    buf = memoryview(data)
    found: list[tuple[str, str]] = []
    stack = [("model", 0, len(buf), 0)]
    try:
        while stack:
            kind, start, end, depth = stack.pop()
            if depth > _MAX_NESTING:
                raise UnsafeArtifactError(f"the ONNX graph nests deeper than {_MAX_NESTING} levels")
            fields = _fields(buf, start, end)[0]
            if kind == "tensor":
                if (ref := _tensor_location(buf, fields)) is not None:
                    found.append(ref)
                continue
            inner = _TENSOR_FIELDS[kind]
            for number, wire, value in fields:
                if wire == 2 and number in inner:
                    stack.append((inner[number], value[0], value[1], depth + 1))
    except _Malformed:
        return found
    return found


def check_onnx_external_data(path: Path, data: bytes | None = None) -> None:
    """Refuse the ONNX model at ``path`` (or its already read ``data``) when a tensor's external data
    leaves its directory.

    Raises:
        UnsafeArtifactError: a location that is absolute, empty, contains ``..`` or passes a
            symlink (:func:`contained_path`), naming the file, the tensor and the location. A
            location inside the directory that does not exist is left to the loader.
    """
    path = Path(path)
    for name, location in onnx_external_locations(path.read_bytes() if data is None else data):
        try:
            contained_path(path.parent, location)
        except UnsafeArtifactError:
            raise UnsafeArtifactError(
                f"{path}: tensor {name!r} has external data location {location!r}, which leaves "
                f"{path.parent}; only a relative path to a file inside it is allowed"
            ) from None
