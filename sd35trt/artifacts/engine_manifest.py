"""The engine manifest: reading it, verifying engines before load, and opening them.

``engines/manifest.json`` is self-contained: it records, per component, the engine file (size,
sha256), the backend and precision actually built, the profile ranges per input, the ONNX it came
from, and for TensorRT the version, GPU name and compute capability; plus the model dims, the
runtime defaults and the tokenizer / scheduler files copied beside the engines, and the model they
were made from (repo commit, LoRA files with their sha256 and scales). The runtime needs nothing
else.

A TensorRT plan is executable code tied to one TensorRT version and one GPU compute capability.
:func:`verify_engines` therefore checks, in this order and before any backend sees a byte: sizes
and sha256 of every file, then backend, TensorRT version and compute capability against this
machine. What "this machine" is comes from a :class:`MachineInfo`, which tests fabricate.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sd35trt.artifacts.manifest import FileRecord, HashCache, read_json, verify_files
from sd35trt.artifacts.repair import REBUILD, repair_hint
from sd35trt.backends.base import OpenOptions
from sd35trt.backends.layers import LayerReport
from sd35trt.backends.machine import (  # noqa: F401 -- re-exported: where callers have always found them
    GpuInfo,
    MachineInfo,
    detect_gpu,
    detect_tensorrt_version,
    same_tensorrt_version,
    sm_name,
)
from sd35trt.backends.registry import backend_of
from sd35trt.components import Component, ComponentSpec, ModelDims, ShapeRange, spec
from sd35trt.config import Backend, Precision
from sd35trt.errors import IncompatibleEngineError, ManifestError, UnsafeArtifactError, VerificationError

if TYPE_CHECKING:
    from sd35trt.backends.engine import Engine

ENGINE_MANIFEST_NAME = "manifest.json"
ENGINE_FORMAT = 1


@dataclass(frozen=True)
class EngineRecord:
    """One component's engine, as built."""

    component: Component
    backend: Backend
    file: FileRecord  # relative to the engines directory
    precision: Precision  # dtype of the float tensors
    fp8: bool  # FP8 Q/DQ layers are in the engine
    profile: Mapping[str, ShapeRange]
    source_onnx: FileRecord  # relative to the run directory
    build_seconds: float
    extra_files: tuple[FileRecord, ...] = ()  # external weights of an ONNX Runtime engine
    skip_layers: int = 0  # transformer: size of the skip-layer-guidance input
    controlnet_layers: int = 0  # transformer: ControlNet residuals it takes (model.controlnet)
    tensorrt_version: str | None = None
    gpu_name: str | None = None
    compute_capability: tuple[int, int] | None = None
    options: Mapping = field(default_factory=dict)  # backend build / session options
    layers: LayerReport | None = None  # TensorRT: what the engine runs, per precision
    device_memory_bytes: int | None = None  # TensorRT: activation memory at the largest profile
    streamable_weights_bytes: int | None = None  # TensorRT: weights weight streaming can page

    @property
    def files(self) -> tuple[FileRecord, ...]:
        return (self.file, *self.extra_files)

    @property
    def built_for(self) -> str:
        """``sm_90 / TensorRT 11.4.0`` (TensorRT) or ``ONNX Runtime``."""
        return backend_of(self.backend).built_for(self)

    def to_json(self) -> dict:
        return {
            "backend": self.backend.value,
            "file": self.file.to_json(),
            "extra_files": [f.to_json() for f in self.extra_files],
            "precision": self.precision.value,
            "fp8": self.fp8,
            "profile": {name: r.to_json() for name, r in self.profile.items()},
            "source_onnx": self.source_onnx.to_json(),
            "build_seconds": round(self.build_seconds, 3),
            "skip_layers": self.skip_layers,
            # only where there is a ControlNet: manifests without one keep their bytes
            **({"controlnet_layers": self.controlnet_layers} if self.controlnet_layers else {}),
            "tensorrt_version": self.tensorrt_version,
            "gpu_name": self.gpu_name,
            "compute_capability": list(self.compute_capability) if self.compute_capability else None,
            "options": dict(self.options),
            "layers": self.layers.model_dump(mode="json") if self.layers is not None else None,
            "device_memory_bytes": self.device_memory_bytes,
            "streamable_weights_bytes": self.streamable_weights_bytes,
        }

    @classmethod
    def from_json(cls, component: Component, data: dict) -> EngineRecord:
        """Parse one engine record of the manifest's JSON.

        Raises:
            pydantic.ValidationError: a field is missing or has the wrong JSON type (located).
        """
        return _record(component, _EngineJson.model_validate_json(json.dumps(data)))


@dataclass(frozen=True)
class EngineManifest:
    """``engines/manifest.json``, parsed. ``directory`` is where it was read from."""

    directory: Path
    backend: Backend
    engines: Mapping[Component, EngineRecord]
    dims: ModelDims
    runtime_defaults: Mapping
    build_settings: Mapping
    support_files: tuple[FileRecord, ...]  # tokenizers and scheduler config
    created: str = ""
    versions: Mapping = field(default_factory=dict)
    #: the weights the engines hold: ``{hub: {repo_id, revision, commit} | None, loras: [...]}``.
    model: Mapping = field(default_factory=dict)

    def spec(self, component: Component) -> ComponentSpec:
        """The I/O contract of ``component``'s engine."""
        tr = self.engines.get(Component.TRANSFORMER)
        controlnet = tr.controlnet_layers if tr is not None else 0  # the ControlNet's outputs too
        return spec(component, self.dims, self.record(component).skip_layers, controlnet)

    def record(self, component: Component) -> EngineRecord:
        try:
            return self.engines[component]
        except KeyError:
            built = ", ".join(c.value for c in self.engines) or "none"
            raise ManifestError(
                f"{self.directory} has no {component.value} engine (built: {built}); {REBUILD}"
            ) from None

    def path(self, component: Component) -> Path:
        return self.directory / self.record(component).file.path

    def to_json(self) -> dict:
        return {
            "format": ENGINE_FORMAT,
            "created": self.created,
            "backend": self.backend.value,
            "engines": {c.value: r.to_json() for c, r in self.engines.items()},
            "dims": self.dims.to_json(),
            "runtime_defaults": dict(self.runtime_defaults),
            "build_settings": dict(self.build_settings),
            "support_files": [f.to_json() for f in self.support_files],
            "versions": dict(self.versions),
            "model": dict(self.model),
        }

    @classmethod
    def from_json(cls, directory: Path, data: dict) -> EngineManifest:
        """Parse the manifest's JSON (``directory`` is where it was read from).

        Raises:
            pydantic.ValidationError: a field is missing or has the wrong JSON type (located).
        """
        m = _ManifestJson.model_validate_json(json.dumps(data))
        return cls(
            directory=directory,
            backend=m.backend,
            engines={c: _record(c, m.engines[c]) for c in Component if c in m.engines},  # execution order
            dims=m.dims,
            runtime_defaults=m.runtime_defaults,
            build_settings=m.build_settings,
            support_files=m.support_files,
            created=m.created,
            versions=m.versions,
            model=m.model,
        )


# -- the manifest's JSON, typed: wrong types are refused with their location -----------------------


class _Json(BaseModel):
    # Strict: "12" is not a size, 1 is not a bool. Unknown keys are ignored (the format number
    # guards incompatible changes).
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class _EngineJson(_Json):
    backend: Backend
    file: FileRecord
    extra_files: tuple[FileRecord, ...] = ()
    precision: Precision
    fp8: bool
    profile: dict[str, ShapeRange]
    source_onnx: FileRecord
    build_seconds: float
    skip_layers: int = Field(default=0, ge=0)
    controlnet_layers: int = Field(default=0, ge=0)
    tensorrt_version: str | None = None
    gpu_name: str | None = None
    compute_capability: tuple[int, int] | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    layers: LayerReport | None = None
    device_memory_bytes: int | None = Field(default=None, ge=0)
    streamable_weights_bytes: int | None = Field(default=None, ge=0)


class _ManifestJson(_Json):
    backend: Backend
    engines: dict[Component, _EngineJson]
    dims: ModelDims
    runtime_defaults: dict[str, Any]
    build_settings: dict[str, Any]
    support_files: tuple[FileRecord, ...]
    created: str = ""
    versions: dict[str, str] = Field(default_factory=dict)
    #: the weights: ``{hub, loras}`` as the export record has them (absent in older manifests).
    model: dict[str, Any] = Field(default_factory=dict)


def _record(component: Component, e: _EngineJson) -> EngineRecord:
    return EngineRecord(component=component, **{name: getattr(e, name) for name in _EngineJson.model_fields})


def _validation_summary(err: ValidationError, limit: int = 3) -> str:
    """``engines.transformer.file.size: Input should be a valid integer (found '12')``, a few of them."""
    parts = []
    for e in err.errors()[:limit]:
        loc = ".".join(str(p) for p in e["loc"] if p != "[key]") or "(top level)"
        found = "" if e["type"] == "missing" else f" (found {e['input']!r:.60})"
        parts.append(f"{loc}: {e['msg']}{found}")
    more = err.error_count() - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def read_engine_manifest(engines_dir: str | Path) -> EngineManifest:
    """Parse ``engines_dir/manifest.json`` without checking any file.

    Raises:
        ManifestError: missing, not JSON, another format, or a field missing or of the wrong JSON
            type (the file and the field are named).
    """
    directory = Path(engines_dir)
    path = directory / ENGINE_MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(
            f"{path} does not exist: {directory} is not an engines directory; run `sd35trt build`"
        )
    data = read_json(path, REBUILD)
    if data.get("format") != ENGINE_FORMAT:
        raise ManifestError(
            f"{path} has format {data.get('format')!r}, this sd35trt reads format {ENGINE_FORMAT}; {REBUILD}"
        )
    try:
        return EngineManifest.from_json(directory, data)
    except ValidationError as err:
        raise ManifestError(f"{path} is malformed: {_validation_summary(err)}; {REBUILD}") from None


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
    for component in selected:
        rec = manifest.record(component)
        here = backend_of(rec.backend).incompatibility(rec, machine)
        if here is not None:
            groups.setdefault((rec.built_for, here), []).append(Path(rec.file.path).name)
    if not groups:
        return
    parts = []
    for (built, here), names in groups.items():
        subject = f"engine {names[0]} was" if len(names) == 1 else f"engines {', '.join(names)} were"
        parts.append(f"{subject} built for {built}, {here}")
    raise IncompatibleEngineError("; ".join(parts) + f": {REBUILD}")


def verify_engines(
    engines_dir: str | Path,
    components: Iterable[Component] | None = None,
    machine: MachineInfo | None = None,
    *,
    hash_engines: bool = True,
    cache: HashCache | None = None,
) -> EngineManifest:
    """Read the engine manifest and check the engines before anything loads them.

    Order: every file's size, then its sha256 (engines, external weights, tokenizers, scheduler);
    then whether this machine can load them (for TensorRT: version and GPU compute capability).

    Args:
        engines_dir: a build's ``engines/`` directory.
        components: the engines to check (default: all of them); support files are always checked.
        machine: this machine; detected (importing tensorrt and torch.cuda) only when a backend
            needs it and none is given.
        hash_engines: ``False`` checks engine files' sizes only: for a load, whose engines hash the
            bytes they deserialize themselves (each byte hashed once per load).
        cache: reuse digests of files unchanged since last hashed (freshness checks only).

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
    if any(backend_of(manifest.record(c).backend).needs_machine_check for c in selected):
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
    """Engine objects for verified engines (constructed only: nothing is loaded until ``activate``).

    Each engine checks the sha256 of the exact bytes it loads before its backend sees them, so a
    file swapped after :func:`verify_engines` is still refused.

    Args:
        manifest: the result of :func:`verify_engines`.
        components: which engines (default: all).
        device: ``"cpu"`` or ``"cuda[:N]"``; default: the backend's (TensorRT ``cuda``, ONNX
            Runtime ``cpu``).
        intra_op_threads: ONNX Runtime intra-op threads (``None``: ONNX Runtime's default).
        use_cuda_graph: TensorRT: capture and replay CUDA graphs per input shape.

    Raises:
        BackendUnavailableError: TensorRT engines asked to run on the CPU.
    """
    selected = list(components) if components is not None else list(manifest.engines)
    options = OpenOptions(device=device, intra_op_threads=intra_op_threads, use_cuda_graph=use_cuda_graph)
    return backend_of(manifest.backend).open(manifest, selected, options)
