"""The engine every backend runs (TensorRT, ONNX Runtime, PyTorch reference).

Lifecycle, as in Polygraphy's runners: construct (touches no device), ``activate()``, ``infer()``
any number of times, ``deactivate()``. The base class guards state, inputs and outputs; a backend
implements the ``_activate_impl``, ``_infer_impl`` and ``_deactivate_impl`` hooks. Inputs and
outputs are torch tensors keyed by the :class:`~sd35trt.components.ComponentSpec`'s names.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from sd35trt.artifacts.repair import REBUILD
from sd35trt.components import ComponentSpec
from sd35trt.errors import EngineLoadError, VerificationError

if TYPE_CHECKING:  # torch is imported by the backends themselves, only when they run
    import torch


class Engine(abc.ABC):
    """One component's executable engine."""

    def __init__(self, spec: ComponentSpec) -> None:
        self.spec = spec
        self._active = False

    @property
    def name(self) -> str:
        return self.spec.component.value

    @property
    def active(self) -> bool:
        return self._active

    def activate(self) -> None:
        """Load the engine (deserialize, create sessions, allocate); a no-op when active.

        Raises:
            VerificationError: the engine's bytes do not match their record (before any backend
                sees them).
            IncompatibleEngineError / DeviceOutOfMemoryError: the backend cannot load it.
            EngineLoadError: a file of the engine is missing (named).
        """
        if self._active:
            return
        try:
            self._activate_impl()
        except FileNotFoundError as err:
            # the engines directory was moved or deleted after it was verified (``low_vram`` loads
            # each engine at its stage, long after start-up)
            raise EngineLoadError(
                f"engine {self.name}: {err.filename} is missing (the engines directory was moved or "
                "deleted after it was loaded); restore it and restart"
            ) from None
        self._active = True

    def infer(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run once. ``feeds`` holds every input of the spec; returns every output of the spec.

        Raises:
            RuntimeError: the engine is not active, or the backend returned other outputs.
            ValueError: an input of the spec is missing.
        """
        if not self._active:
            raise RuntimeError(f"engine {self.name} is not active: call activate() first")
        missing = [n for n in self.spec.input_names if n not in feeds]
        if missing:
            raise ValueError(f"engine {self.name}: missing inputs {missing}")
        outputs = self._infer_impl({n: feeds[n] for n in self.spec.input_names})
        if sorted(outputs) != sorted(self.spec.output_names):
            raise RuntimeError(
                f"engine {self.name} returned {sorted(outputs)}, "
                f"its spec has {sorted(self.spec.output_names)}"
            )
        return outputs

    def _check_io(self, path: Path, inputs: Iterable[str], outputs: Iterable[str]) -> None:
        """Raises VerificationError when the loaded model's tensor names are not the spec's."""
        found = (sorted(inputs), sorted(outputs))
        if found != (sorted(self.spec.input_names), sorted(self.spec.output_names)):
            raise VerificationError(
                f"{path} has inputs {found[0]} and outputs {found[1]}, the {self.name} spec expects "
                f"{sorted(self.spec.input_names)} and {sorted(self.spec.output_names)}; {REBUILD}"
            )

    def deactivate(self) -> None:
        """Free the engine and its buffers; a no-op when not active."""
        if not self._active:
            return
        try:
            self._deactivate_impl()
        finally:
            self._active = False

    @abc.abstractmethod
    def _activate_impl(self) -> None: ...

    @abc.abstractmethod
    def _infer_impl(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``feeds`` holds exactly the spec's inputs."""

    @abc.abstractmethod
    def _deactivate_impl(self) -> None: ...

    def __enter__(self) -> Engine:
        self.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        self.deactivate()
