"""The backend registry: :class:`~sd35trt.config.Backend` -> its :class:`EngineBackend` object."""

from __future__ import annotations

from sd35trt.backends.base import EngineBackend
from sd35trt.backends.machine import MachineInfo
from sd35trt.backends.onnxruntime import OnnxRuntimeBackend
from sd35trt.backends.tensorrt import TensorRTBackend
from sd35trt.backends.tensorrt_rtx import TensorRTRtxBackend
from sd35trt.config import Backend
from sd35trt.errors import BackendUnavailableError

#: Every engine backend, in the order ``auto`` prefers them. ONNX Runtime runs everywhere, so
#: ``auto`` never reaches TensorRT-RTX (whose engines need a GPU this machine may lack): ask for it.
BACKENDS: dict[Backend, EngineBackend] = {
    Backend.TENSORRT: TensorRTBackend(),
    Backend.ONNXRUNTIME: OnnxRuntimeBackend(),
    Backend.TENSORRT_RTX: TensorRTRtxBackend(),
}


def backend_of(backend: Backend) -> EngineBackend:
    """The registered object of a concrete backend.

    Raises:
        BackendUnavailableError: ``auto`` or an unregistered backend (resolve ``auto`` first).
    """
    try:
        return BACKENDS[backend]
    except KeyError:
        known = ", ".join(b.value for b in BACKENDS)
        raise BackendUnavailableError(f"backend {backend.value!r} is not one of: {known}") from None


def resolve_backend(requested: Backend, machine: MachineInfo) -> tuple[EngineBackend, str]:
    """The backend a build uses, and why.

    ``auto`` takes the first registered backend this machine has everything for.

    Raises:
        BackendUnavailableError: a backend was asked for that this machine cannot build
            (e.g. ``tensorrt`` without TensorRT or a CUDA GPU).
    """
    if requested is not Backend.AUTO:
        chosen = backend_of(requested)
        missing = chosen.missing(machine)
        if missing:
            raise BackendUnavailableError(
                f"backend {requested.value} needs {chosen.requirements}; this machine has no "
                f"{' and no '.join(missing)}: use --backend onnxruntime (or auto)"
            )
        return chosen, "requested"
    skipped: list[str] = []
    for candidate in BACKENDS.values():
        missing = candidate.missing(machine)
        if not missing:
            if skipped:
                return candidate, f"auto: no {' and no '.join(skipped)}, using {candidate.describe(machine)}"
            return candidate, f"auto: {candidate.describe(machine)}"
        skipped += missing
    raise BackendUnavailableError("no engine backend can run on this machine")  # ONNX Runtime always can
