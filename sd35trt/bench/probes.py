"""Clocks and memory probes of the bench: CUDA events or ``perf_counter``; peak RSS or device memory."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from sd35trt.bench.report import Memory


class StageClock:
    """Collects the durations of named stages: CUDA events on a GPU (read only in :meth:`collect`,
    after one synchronization, so timing adds none per call), ``perf_counter`` on the CPU."""

    def __init__(self, device: str = "cpu") -> None:
        self.set_device(device)
        self._marks: list[tuple[str, Any, Any]] = []
        self._recorded: list[tuple[str, float]] = []

    def set_device(self, device: str) -> None:
        self.cuda = str(device).startswith("cuda")

    def mark(self) -> Any:
        if self.cuda:
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def add(self, stage: str, start: Any, end: Any) -> None:
        self._marks.append((stage, start, end))

    @contextmanager
    def time(self, stage: str) -> Iterator[None]:
        start = self.mark()
        try:
            yield
        finally:
            self.add(stage, start, self.mark())

    def record(self, stage: str, seconds: float) -> None:
        """A duration measured elsewhere (e.g. the runtime's own denoising span), in seconds."""
        self._recorded.append((stage, seconds))

    def collect(self) -> dict[str, list[float]]:
        """Durations in seconds per stage since the last collect (synchronizes on CUDA)."""
        if self.cuda and self._marks:
            import torch

            torch.cuda.synchronize()
        out: dict[str, list[float]] = {}
        for stage, seconds in self._recorded:
            out.setdefault(stage, []).append(seconds)
        self._recorded = []
        for stage, start, end in self._marks:
            seconds = start.elapsed_time(end) / 1e3 if self.cuda else end - start
            out.setdefault(stage, []).append(seconds)
        self._marks = []
        return out


def _rss_status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(v) * 1024 for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.M)}


class MemoryProbe:
    """Peak memory over a window (bytes): peak RSS on the CPU, device memory on CUDA.

    CPU: Linux's ``VmHWM`` reset through ``/proc/self/clear_refs`` (else ``ru_maxrss``, the peak
    since the process started, and said so). CUDA: device memory in use (``total - free``, sampled
    after every engine call, other processes included) and the torch allocator's peak (TensorRT
    allocates its own memory, which only the former sees).
    """

    def __init__(self, device: str = "cpu") -> None:
        self.set_device(device)
        self._method = ""
        self._baseline = 0
        self._device_used_peak = 0

    def set_device(self, device: str) -> None:
        self.cuda = str(device).startswith("cuda")
        self.device = device

    def reset(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._baseline = self._device_used()
            self._device_used_peak = self._baseline
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._method = "VmHWM of this process, reset before the timed runs"
        except OSError:
            self._method = "ru_maxrss: peak RSS since the process started (VmHWM reset not permitted)"
        try:
            self._baseline = _rss_status().get("VmRSS", 0)
        except OSError:
            self._baseline = 0

    def _device_used(self) -> int:
        import torch

        free, total = torch.cuda.mem_get_info(self.device)
        return int(total - free)

    def sample(self) -> None:
        if self.cuda:
            self._device_used_peak = max(self._device_used_peak, self._device_used())

    def read(self) -> Memory:
        """The peak since :meth:`reset` (bytes)."""
        if self.cuda:
            import torch

            self.sample()
            return Memory(
                kind="cuda",
                peak_device_used_bytes=self._device_used_peak,
                baseline_device_used_bytes=self._baseline,
                peak_torch_allocated_bytes=int(torch.cuda.max_memory_allocated(self.device)),
                method="device memory in use (total - free) sampled after each engine call",
            )
        peak = 0
        with suppress(OSError):
            peak = _rss_status().get("VmHWM", 0)
        if not peak or self._method.startswith("ru_maxrss"):
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return Memory(
            kind="peak_rss",
            peak_rss_bytes=int(peak),
            baseline_rss_bytes=int(self._baseline),
            method=self._method,
        )
