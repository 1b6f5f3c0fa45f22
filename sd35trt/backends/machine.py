"""What this machine offers to engines: TensorRT, TensorRT-RTX, CUDA GPU (tests fabricate these)."""

from __future__ import annotations

from dataclasses import dataclass


def sm_name(cc: tuple[int, int] | list[int]) -> str:
    """``(9, 0)`` -> ``sm_90``."""
    return f"sm_{cc[0]}{cc[1]}"


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
    tensorrt_rtx_version: str | None = None

    @classmethod
    def detect(cls) -> MachineInfo:
        """Ask ``tensorrt``, ``tensorrt_rtx`` and ``torch.cuda`` (imported here, only when called)."""
        return cls(
            tensorrt_version=detect_tensorrt_version(),
            gpu=detect_gpu(),
            tensorrt_rtx_version=detect_tensorrt_version("tensorrt_rtx"),
        )


#: A machine with neither TensorRT nor a CUDA GPU (what ONNX Runtime engines record).
NO_MACHINE = MachineInfo(tensorrt_version=None, gpu=None)


def detect_tensorrt_version(module: str = "tensorrt") -> str | None:
    """``tensorrt.__version__`` (or ``module``'s), ``None`` where the package or its libraries are missing."""
    import importlib

    try:
        return str(importlib.import_module(module).__version__)
    except (ImportError, OSError):
        return None


def detect_gpu() -> GpuInfo | None:
    """The current CUDA device, or ``None`` where torch sees no CUDA device."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return GpuInfo(name=props.name, compute_capability=(props.major, props.minor))


def same_tensorrt_version(a: str, b: str) -> bool:
    """Plans load only on the TensorRT release that built them: compare major.minor.patch."""
    return a.split(".")[:3] == b.split(".")[:3]
