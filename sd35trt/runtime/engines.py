"""The engine manifest: reading it, verifying engines before load, and opening them.

``engines/manifest.json`` is self-contained: it records, per component, the engine file (size,
sha256), the backend and precision actually built, the profile ranges per input, the ONNX it came
from, and for TensorRT the version, GPU name and compute capability; plus the model dims, the
runtime defaults and the tokenizer / scheduler files copied beside the engines. The runtime needs
nothing else.

A TensorRT plan is executable code tied to one TensorRT version and one GPU compute capability.
:func:`verify_engines` therefore checks, in this order and before any backend sees a byte: sizes
and sha256 of every file, then backend, TensorRT version and compute capability against this
machine. What "this machine" is comes from a :class:`MachineInfo`, which tests fabricate.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sd35trt.components import Component, ComponentSpec, ModelDims, ShapeRange, spec
from sd35trt.config import Backend, Precision
from sd35trt.errors import BackendUnavailableError, IncompatibleEngineError, ManifestError
from sd35trt.manifest import FileRecord, read_json, verify_files

if TYPE_CHECKING:
    from sd35trt.runtime.engine import Engine

ENGINE_MANIFEST_NAME = "manifest.json"
ENGINE_FORMAT = 1
REBUILD = "rebuild with `sd35trt build`"

#: Engine file suffix per backend: TensorRT plans, ONNX Runtime offline-optimized models.
ENGINE_SUFFIX = {Backend.TENSORRT: ".plan", Backend.ONNXRUNTIME: ".onnx"}


@dataclass(frozen=True)
class GpuInfo:
    """A CUDA device as TensorRT sees it: its name and compute capability."""

    name: str
    compute_capability: tuple[int, int]

    @property
    def sm(self) -> str:
        return sm_name(self.compute_capability)

    @property
    def has_fp8(self) -> bool:
        """FP8 tensor cores exist from compute capability 8.9 (Ada) and 9.0 (Hopper) on."""
        return self.compute_capability >= (8, 9)


@dataclass(frozen=True)
class MachineInfo:
    """What this machine offers to engines. ``None`` means absent (no TensorRT, no CUDA GPU)."""

    tensorrt_version: str | None
    gpu: GpuInfo | None

    @classmethod
    def detect(cls, device_index: int | None = None) -> MachineInfo:
        """Ask ``tensorrt`` and ``torch.cuda`` (imported here, only when called)."""
        return cls(tensorrt_version=detect_tensorrt_version(), gpu=detect_gpu(device_index))


def detect_tensorrt_version() -> str | None:
    """``tensorrt.__version__``, or ``None`` where the package or its libraries are missing."""
    try:
        import tensorrt
    except (ImportError, OSError):
        return None
    return str(tensorrt.__version__)


def detect_gpu(device_index: int | None = None) -> GpuInfo | None:
    """The current (or given) CUDA device, or ``None`` where torch sees no CUDA device."""
    import torch

    if not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device() if device_index is None else device_index
    props = torch.cuda.get_device_properties(index)
    return GpuInfo(name=props.name, compute_capability=(props.major, props.minor))


def sm_name(cc: tuple[int, int] | list[int]) -> str:
    return f"sm_{cc[0]}{cc[1]}"


def same_tensorrt_version(a: str, b: str) -> bool:
    """Plans load only on the TensorRT release that built them: compare major.minor.patch."""
    return a.split(".")[:3] == b.split(".")[:3]


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
    tensorrt_version: str | None = None
    gpu_name: str | None = None
    compute_capability: tuple[int, int] | None = None
    options: Mapping = field(default_factory=dict)  # backend build / session options

    @property
    def files(self) -> tuple[FileRecord, ...]:
        return (self.file, *self.extra_files)

    @property
    def built_for(self) -> str:
        """``sm_90 / TensorRT 11.4.0`` (TensorRT) or ``ONNX Runtime``."""
        if self.backend is Backend.TENSORRT:
            sm = sm_name(self.compute_capability) if self.compute_capability else "an unknown GPU"
            return f"{sm} / TensorRT {self.tensorrt_version}"
        return "ONNX Runtime"

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
            "tensorrt_version": self.tensorrt_version,
            "gpu_name": self.gpu_name,
            "compute_capability": list(self.compute_capability) if self.compute_capability else None,
            "options": dict(self.options),
        }

    @classmethod
    def from_json(cls, component: Component, data: dict) -> EngineRecord:
        cc = data.get("compute_capability")
        return cls(
            component=component,
            backend=Backend(data["backend"]),
            file=FileRecord.from_json(data["file"]),
            extra_files=tuple(FileRecord.from_json(f) for f in data.get("extra_files", [])),
            precision=Precision(data["precision"]),
            fp8=bool(data["fp8"]),
            profile={name: ShapeRange.from_json(r) for name, r in data["profile"].items()},
            source_onnx=FileRecord.from_json(data["source_onnx"]),
            build_seconds=float(data["build_seconds"]),
            skip_layers=int(data.get("skip_layers", 0)),
            tensorrt_version=data.get("tensorrt_version"),
            gpu_name=data.get("gpu_name"),
            compute_capability=(int(cc[0]), int(cc[1])) if cc else None,
            options=data.get("options", {}),
        )


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

    def spec(self, component: Component) -> ComponentSpec:
        """The I/O contract of ``component``'s engine."""
        return spec(component, self.dims, self.record(component).skip_layers)

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
        }

    @classmethod
    def from_json(cls, directory: Path, data: dict) -> EngineManifest:
        parsed = {Component(c): EngineRecord.from_json(Component(c), r) for c, r in data["engines"].items()}
        return cls(
            directory=directory,
            backend=Backend(data["backend"]),
            engines={c: parsed[c] for c in Component if c in parsed},  # execution order
            dims=ModelDims.from_json(data["dims"]),
            runtime_defaults=data["runtime_defaults"],
            build_settings=data["build_settings"],
            support_files=tuple(FileRecord.from_json(f) for f in data["support_files"]),
            created=data.get("created", ""),
            versions=data.get("versions", {}),
        )


def read_engine_manifest(engines_dir: str | Path) -> EngineManifest:
    """Parse ``engines_dir/manifest.json`` without checking any file.

    Raises:
        ManifestError: missing, not JSON, another format, or lacking a field.
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
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise ManifestError(f"{path} is malformed ({type(err).__name__}: {err}); {REBUILD}") from None


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
        if rec.backend is not Backend.TENSORRT:
            continue
        here = _tensorrt_mismatch(rec, machine)
        if here is not None:
            groups.setdefault((rec.built_for, here), []).append(Path(rec.file.path).name)
    if not groups:
        return
    parts = []
    for (built, here), names in groups.items():
        subject = f"engine {names[0]} was" if len(names) == 1 else f"engines {', '.join(names)} were"
        parts.append(f"{subject} built for {built}, {here}")
    raise IncompatibleEngineError("; ".join(parts) + f": {REBUILD}")


def _tensorrt_mismatch(rec: EngineRecord, machine: MachineInfo) -> str | None:
    """How this machine differs from the one ``rec`` was built on, or ``None``."""
    if machine.tensorrt_version is None or machine.gpu is None:
        missing = [
            w
            for w, gone in (("TensorRT", not machine.tensorrt_version), ("CUDA GPU", not machine.gpu))
            if gone
        ]
        return f"this machine has no {' and no '.join(missing)} (the onnxruntime backend runs without them)"
    same = (
        rec.compute_capability == machine.gpu.compute_capability
        and rec.tensorrt_version is not None
        and same_tensorrt_version(rec.tensorrt_version, machine.tensorrt_version)
    )
    return None if same else f"this GPU is {machine.gpu.sm} / TensorRT {machine.tensorrt_version}"


def verify_engines(
    engines_dir: str | Path,
    components: Iterable[Component] | None = None,
    machine: MachineInfo | None = None,
) -> EngineManifest:
    """Read the engine manifest and check the engines before anything loads them.

    Order: every file's size, then its sha256 (engines, external weights, tokenizers, scheduler);
    then, for TensorRT engines, the TensorRT version and GPU compute capability of this machine.

    Args:
        engines_dir: a build's ``engines/`` directory.
        components: the engines to check (default: all of them); support files are always checked.
        machine: this machine; detected (importing tensorrt and torch.cuda) only when a TensorRT
            engine is to be checked and none is given.

    Returns:
        The parsed manifest, for :func:`open_engines`.

    Raises:
        ManifestError: no manifest, or a component without an engine.
        VerificationError: a file is missing, truncated or modified (named).
        IncompatibleEngineError: an engine was built for another TensorRT version or GPU.
    """
    manifest = read_engine_manifest(engines_dir)
    selected = list(components) if components is not None else list(manifest.engines)
    files = [f for c in selected for f in manifest.record(c).files] + list(manifest.support_files)
    verify_files(manifest.directory, files, what=f"engines in {manifest.directory} ({REBUILD})")
    if any(manifest.record(c).backend is Backend.TENSORRT for c in selected):
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

    Each engine re-checks the sha256 of the exact bytes it loads, so a file swapped after
    :func:`verify_engines` is still refused.

    Args:
        manifest: the result of :func:`verify_engines`.
        components: which engines (default: all).
        device: ``"cpu"`` or ``"cuda[:N]"``; default ``cuda`` for TensorRT, ``cpu`` for ONNX Runtime.
        intra_op_threads: ONNX Runtime intra-op threads (``None``: ONNX Runtime's default).
        use_cuda_graph: TensorRT: capture and replay a CUDA graph per input shape.

    Raises:
        BackendUnavailableError: TensorRT engines asked to run on the CPU.
    """
    selected = list(components) if components is not None else list(manifest.engines)
    engines: dict[Component, Engine] = {}
    for component in selected:
        rec = manifest.record(component)
        sp = manifest.spec(component)
        path = manifest.directory / rec.file.path
        if rec.backend is Backend.TENSORRT:
            from sd35trt.runtime.trt import TrtEngine

            dev = device or "cuda"
            if not dev.startswith("cuda"):
                raise BackendUnavailableError(
                    f"engine {path.name} is a TensorRT plan and runs on a CUDA device, not {dev!r}"
                )
            engines[component] = TrtEngine(
                sp, path, rec.file.sha256, device=dev, use_cuda_graph=use_cuda_graph
            )
        else:
            from sd35trt.runtime.ort import OrtEngine

            engines[component] = OrtEngine(
                sp,
                path,
                sha256=None if rec.extra_files else rec.file.sha256,
                device=device or "cpu",
                intra_op_threads=intra_op_threads,
                cuda_provider_options=rec.options.get("cuda_provider_options"),
            )
    return engines
