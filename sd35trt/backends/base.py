"""What an engine backend is: one object per backend, registered in :mod:`sd35trt.backends.registry`.

Build, verify, the runtime, package and bench ask the registry instead of branching on the backend.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd35trt.backends.machine import NO_MACHINE, MachineInfo
from sd35trt.components import Component, ShapeRange
from sd35trt.config import Backend, BuildSettings

if TYPE_CHECKING:
    from sd35trt.artifacts.engine_manifest import EngineManifest, EngineRecord
    from sd35trt.backends.engine import Engine
    from sd35trt.backends.layers import LayerReport

Progress = Callable[[str], None]


@dataclass(frozen=True)
class BuildJob:
    """One engine to build: ``source`` ONNX (external weights beside it) to ``target``.

    Attributes:
        fp8: the source has FP8 Q/DQ layers.
        external_data: the source keeps its weights in external files (models over 2 GB).
        run_dir: the run directory (TensorRT keeps its timing cache there).
        label: prefix of the progress lines, e.g. ``[4/5] transformer``.
        build_has_fp8: some engine of this build is FP8 (TensorRT-RTX then targets, by default,
            only GPUs with FP8, so that every engine of the set runs on the same GPUs).
    """

    component: Component
    source: Path
    target: Path
    shapes: Mapping[str, ShapeRange]
    settings: BuildSettings
    fp8: bool
    external_data: bool
    machine: MachineInfo
    run_dir: Path
    progress: Progress
    label: str
    build_has_fp8: bool = False


@dataclass(frozen=True)
class BuiltEngine:
    """What a backend's build produced, for the engine manifest.

    Attributes:
        extra_files: files beside the engine that belong to it (external weights).
        options: backend build / session options to record.
        layers: what the engine runs, per precision (TensorRT only).
        device_memory_bytes: activation memory the engine needs at its largest profile (TensorRT).
        streamable_weights_bytes: weights that weight streaming may keep off the device (TensorRT).
        compute_capabilities: the GPU architectures the engine was built for (TensorRT-RTX).
    """

    extra_files: tuple[Path, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)
    layers: LayerReport | None = None
    device_memory_bytes: int | None = None
    streamable_weights_bytes: int | None = None
    compute_capabilities: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class OpenOptions:
    """How the runtime wants its engines.

    Attributes:
        device: ``cpu`` or ``cuda[:N]``; ``None`` for the backend's default.
        intra_op_threads: ONNX Runtime intra-op threads (``None``: its default).
        use_cuda_graph: TensorRT: capture and replay CUDA graphs for repeated input shapes.
    """

    device: str | None = None
    intra_op_threads: int | None = None
    use_cuda_graph: bool = False


class EngineBackend(abc.ABC):
    """One engine backend. Subclasses set the class attributes and implement build and open."""

    backend: Backend
    label: str  # for people: "TensorRT"
    suffix: str  # engine file suffix: ".plan"
    default_device: str
    requirements: str = "nothing"  # what building and running needs, for people
    #: Engines built for GPU targets, not this machine (TensorRT-RTX): verified without a GPU.
    portable: bool = False
    #: Whether :meth:`incompatibility` needs the detected machine (else it is not detected).
    needs_machine_check: bool = False

    def missing(self, machine: MachineInfo) -> list[str]:
        """What this machine lacks to build and run this backend's engines (empty: nothing)."""
        return []

    def describe(self, machine: MachineInfo) -> str:
        """What this backend runs on here, for ``build backend ... (auto: ...)``."""
        return self.label

    def runs_fp8(self, machine: MachineInfo) -> bool:
        """Whether FP8 Q/DQ layers run here (TensorRT: FP8 tensor cores; others emulate them)."""
        return True

    def recorded_machine(self, machine: MachineInfo) -> MachineInfo:
        """The part of ``machine`` an engine of this backend is tied to (recorded with it)."""
        return NO_MACHINE

    def built_for(self, record: EngineRecord) -> str:
        """``sm_90 / TensorRT 11.4.0``, or the label for machine-independent engines."""
        return self.label

    def incompatibility(self, record: EngineRecord, machine: MachineInfo) -> str | None:
        """How ``machine`` cannot load ``record``'s engine, or ``None`` when it can."""
        return None

    def runs_on(self, manifest: EngineManifest) -> str:
        """Which machines run a manifest's engines, for people."""
        return self.requirements

    def rebuild_reason(self, record: EngineRecord, machine: MachineInfo) -> str | None:
        """Why a build on ``machine`` would not reuse ``record``'s engine (``None``: it would)."""
        return self.incompatibility(record, machine)

    def runtime_problems(self) -> list[str]:
        """What is missing to run the engines here that :meth:`incompatibility` does not see."""
        return []

    def device_for(self, requested: str | None) -> str:
        """The device engines run on.

        Raises:
            BackendUnavailableError: the backend cannot run on ``requested``.
        """
        return requested or self.default_device

    @abc.abstractmethod
    def build(self, job: BuildJob) -> BuiltEngine:
        """Build ``job.target`` from ``job.source``.

        Raises:
            BuildError: the backend rejected the model or could not build it.
        """

    @abc.abstractmethod
    def open(
        self, manifest: EngineManifest, components: Iterable[Component], options: OpenOptions
    ) -> dict[Component, Engine]:
        """Engine objects for ``components`` of a manifest (constructed only, nothing loaded).

        Raises:
            BackendUnavailableError: the engines cannot run on ``options.device``.
        """
