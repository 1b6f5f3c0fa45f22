"""The interface every engine backend implements (TensorRT, ONNX Runtime, PyTorch reference).

Lifecycle, as in Polygraphy's runners: construct (cheap, touches no device), ``activate()``
(deserialize / create the session, allocate), ``infer()`` any number of times, ``deactivate()``
(free everything). Inputs and outputs are torch tensors keyed by the names of the component's
:class:`~sd35trt.components.ComponentSpec`; a backend copies to and from its device as needed.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import TYPE_CHECKING

from sd35trt.components import ComponentSpec

if TYPE_CHECKING:  # torch is imported by the backends themselves, only when they run
    import torch


class Engine(abc.ABC):
    """One component's executable engine."""

    def __init__(self, spec: ComponentSpec) -> None:
        self.spec = spec
        self.active = False

    @property
    def name(self) -> str:
        return self.spec.component.value

    @abc.abstractmethod
    def activate(self) -> None:
        """Load the engine (deserialize, create sessions, allocate)."""

    @abc.abstractmethod
    def infer(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run once. ``feeds`` holds every input of the spec; returns every output of the spec."""

    @abc.abstractmethod
    def deactivate(self) -> None:
        """Free the engine and its buffers."""

    def __enter__(self) -> Engine:
        if not self.active:
            self.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.active:
            self.deactivate()
