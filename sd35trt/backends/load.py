"""Engines checked against this machine and opened: the step between the engine manifest and a run.

A TensorRT plan is executable code tied to one TensorRT version and one GPU compute capability, so
:func:`verify_engines` checks both (after every file's size and sha256) before any backend sees a byte.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from sd35trt.artifacts.engine_manifest import EngineManifest, EngineRecord, read_engine_manifest
from sd35trt.artifacts.files import HashCache, verify_files
from sd35trt.artifacts.repair import REBUILD, repair_hint
from sd35trt.backends.base import OpenOptions
from sd35trt.backends.machine import MachineInfo
from sd35trt.backends.registry import backend_of
from sd35trt.components import Component
from sd35trt.errors import IncompatibleEngineError, UnsafeArtifactError, VerificationError

if TYPE_CHECKING:
    from sd35trt.backends.engine import Engine


def built_for(record: EngineRecord) -> str:
    """``sm_90 / TensorRT 11.4.0`` (TensorRT) or ``ONNX Runtime``: what an engine was built for."""
    return backend_of(record.backend).built_for(record)


def check_compatible(
    manifest: EngineManifest, machine: MachineInfo, components: Iterable[Component] | None = None
) -> None:
    """Refuse engines this machine cannot load: other backend, TensorRT version or GPU.

    Engines that fail the same way are reported together, e.g.
    "engine transformer.plan was built for sm_90 / TensorRT 11.4.0, this GPU is sm_89 / TensorRT
    11.4.0: rebuild with `sd35trt build`".

    Raises:
        IncompatibleEngineError: naming the engines, what they were built for and what this machine is.
    """
    selected = list(components) if components is not None else list(manifest.engines)
    groups: dict[tuple[str, str], list[str]] = {}
    portable = machine.gpu is None  # built for GPU targets, checked where there is none: no rebuild helps
    for component in selected:
        rec = manifest.record(component)
        backend = backend_of(rec.backend)
        here = backend.incompatibility(rec, machine)
        if here is not None:
            groups.setdefault((built_for(rec), here), []).append(Path(rec.file.path).name)
            portable = portable and backend.portable
    if not groups:
        return
    parts = []
    for (built, here), names in groups.items():
        subject = f"engine {names[0]} was" if len(names) == 1 else f"engines {', '.join(names)} were"
        parts.append(f"{subject} built for {built}, {here}")
    raise IncompatibleEngineError("; ".join(parts) + ("" if portable else f": {REBUILD}"))


def verify_engines(
    engines_dir: str | Path,
    components: Iterable[Component] | None = None,
    machine: MachineInfo | None = None,
    *,
    hash_engines: bool = True,
    cache: HashCache | None = None,
    check_machine: bool = True,
) -> EngineManifest:
    """Read the engine manifest and check every file's size and sha256, then this machine.

    Args:
        engines_dir: a build's ``engines/`` directory.
        components: the engines to check (default: all of them); support files are always checked.
        machine: this machine; detected (importing tensorrt and torch.cuda) only when a backend
            needs it and none is given.
        hash_engines: ``False`` checks engine files' sizes only: for a load, whose engines hash the
            bytes they deserialize themselves (each byte hashed once per load).
        cache: reuse digests of files unchanged since last hashed (freshness checks only).
        check_machine: ``False`` checks the files only (the build's freshness check, which asks
            each backend's :meth:`~sd35trt.backends.base.EngineBackend.rebuild_reason` instead).

    Returns:
        The parsed manifest, for :func:`open_engines`.

    Raises:
        ManifestError: no manifest, or a component without an engine.
        UnsafeArtifactError: a recorded path leaves the directory or goes through a symlink.
        VerificationError: a file is missing, truncated or modified (named).
        IncompatibleEngineError: an engine was built for another TensorRT version or GPU.
    """
    manifest = read_engine_manifest(engines_dir)
    selected = list(components) if components is not None else list(manifest.engines)
    what = f"engines in {manifest.directory} ({repair_hint(manifest.directory)})"
    engine_files = [f for c in selected for f in manifest.record(c).files]
    problems, unsafe = [], False
    for files, contents in ((engine_files, hash_engines), (manifest.support_files, True)):
        try:
            verify_files(manifest.directory, files, cache=cache, contents=contents)
        except VerificationError as err:
            problems.append(str(err))
            unsafe = unsafe or isinstance(err, UnsafeArtifactError)
    if problems:
        raise (UnsafeArtifactError if unsafe else VerificationError)(f"{what}: " + "; ".join(problems))
    if check_machine and any(backend_of(manifest.record(c).backend).needs_machine_check for c in selected):
        check_compatible(manifest, machine or MachineInfo.detect(), selected)
    return manifest


def open_engines(
    manifest: EngineManifest,
    components: Iterable[Component] | None = None,
    device: str | None = None,
    *,
    intra_op_threads: int | None = None,
    use_cuda_graph: bool = False,
) -> dict[Component, Engine]:
    """Engine objects for :func:`verify_engines`' manifest (constructed only, see :class:`OpenOptions`).

    Each engine checks the sha256 of the exact bytes it loads before its backend sees them, so a
    file swapped after :func:`verify_engines` is still refused.

    Raises:
        BackendUnavailableError: TensorRT engines asked to run on the CPU.
    """
    selected = list(components) if components is not None else list(manifest.engines)
    options = OpenOptions(device=device, intra_op_threads=intra_op_threads, use_cuda_graph=use_cuda_graph)
    return backend_of(manifest.backend).open(manifest, selected, options)
