"""The runtime's host overhead per denoising step, against diffusers', with instant transformers.

The time counts everything the loop does per step outside the transformer (CFG combine, skip-layer
guidance, scheduler update, checks, callbacks, building the next inputs) and nothing outside the
loop (text encoders, VAE). Runs of the two sides alternate so that load from other processes falls
on both alike.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

from sd35trt.backends.engine import Engine
from sd35trt.bench.report import OVERHEAD_TARGET_RATIO, BenchParams, Overhead, OverheadSide
from sd35trt.bench.stats import step_overheads, summarize
from sd35trt.bench.subjects import run_diffusers, runtime_request
from sd35trt.components import Component

if TYPE_CHECKING:
    import torch

    from sd35trt.components import ComponentSpec

METHOD = (
    "host time per denoising step outside the transformer call, with the transformer replaced by an "
    "instant stand-in returning a preallocated zero tensor on both sides; a step runs from the first "
    "transformer call of one timestep to the first call of the next, minus the time inside the "
    "calls; runs of the two sides alternate; the first run of each is a warm-up"
)


#: ``(start_ns, end_ns, timestep)`` of each stand-in transformer call (``perf_counter_ns``).
CallLog = list[tuple[int, int, float]]


def _timestep_key(t: torch.Tensor) -> float:
    return float(t.reshape(-1)[0])


class InstantTransformer(Engine):
    """A transformer engine that returns a preallocated zero ``noise_pred`` at once (one per input
    shape, allocated at the warm-up; the runtime never writes into engine outputs)."""

    def __init__(self, spec: ComponentSpec, log: CallLog) -> None:
        super().__init__(spec)
        self.log = log
        self._outputs: dict[tuple, torch.Tensor] = {}
        self._output_name = spec.output_names[0]

    def _activate_impl(self) -> None:
        pass

    def _deactivate_impl(self) -> None:
        self._outputs = {}

    def _infer_impl(self, feeds):
        start = time.perf_counter_ns()
        x = feeds["hidden_states"]  # [B, C, h, w]
        key = (tuple(x.shape), x.dtype, x.device)
        out = self._outputs.get(key)
        if out is None:
            import torch

            out = self._outputs[key] = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
        self.log.append((start, time.perf_counter_ns(), _timestep_key(feeds["timestep"])))
        return {self._output_name: out}


@contextmanager
def instant_diffusers_transformer(pipe, log: CallLog) -> Iterator[None]:
    """Replace ``pipe.transformer.forward`` by an instant stand-in for the duration of the block."""
    outputs: dict[tuple, Any] = {}

    def forward(hidden_states, timestep=None, *args, **kwargs):
        start = time.perf_counter_ns()
        key = (tuple(hidden_states.shape), hidden_states.dtype, hidden_states.device)
        out = outputs.get(key)
        if out is None:
            import torch

            out = outputs[key] = (torch.zeros_like(hidden_states),)
        log.append((start, time.perf_counter_ns(), _timestep_key(timestep)))
        return out

    module = pipe.transformer
    module.forward = forward
    try:
        yield
    finally:
        del module.forward  # the class's forward again


def measure_overhead(runtime, pipe, params: BenchParams, max_sequence_length: int, runs: int) -> Overhead:
    """Per-step host overhead of sd35trt and of diffusers with instant transformers.

    Args:
        runtime: an ``Sd35Runtime``; its transformer engine is replaced by
            :class:`InstantTransformer` (and deactivated), so the runtime is for this use only.
        pipe: a diffusers ``StableDiffusion3Pipeline`` on the same device, or ``None`` to measure
            sd35trt only; its ``transformer.forward`` is swapped for the duration.
        runs: timed generations per side, after one warm-up each.

    Returns:
        The ``overhead`` section of ``bench.json`` (per-step statistics in microseconds).
    """
    ours_log: CallLog = []
    theirs_log: CallLog = []
    engines = runtime.engines.engines
    real = engines[Component.TRANSFORMER]
    engines[Component.TRANSFORMER] = InstantTransformer(real.spec, ours_log)
    if real.active:
        real.deactivate()  # its memory is not needed while the stand-in runs
    request = runtime_request(params)
    samples: dict[str, list[float]] = {"sd35trt": [], "diffusers": []}
    ctx = instant_diffusers_transformer(pipe, theirs_log) if pipe is not None else nullcontext()
    with ctx:
        for i in range(runs + 1):  # run 0 of each side warms up (allocations, caches)
            ours_log.clear()
            runtime.generate(request)
            if i:
                samples["sd35trt"].extend(step_overheads(ours_log))
            if pipe is not None:
                theirs_log.clear()
                run_diffusers(pipe, params, max_sequence_length)
                if i:
                    samples["diffusers"].extend(step_overheads(theirs_log))

    ours = summarize(samples["sd35trt"], "us")
    theirs = summarize(samples["diffusers"], "us") if pipe is not None else None
    ratio = None
    if theirs is not None and theirs.median:
        ratio = ours.median / theirs.median
    return Overhead(
        method=METHOD,
        device=str(runtime.device),
        **{k: getattr(params, k) for k in ("num_inference_steps", "height", "width", "guidance_scale")},
        skip_layer_guidance=params.skip_layer_guidance,
        runs=runs,
        sd35trt=OverheadSide(per_step=ours),
        diffusers=None if theirs is None else OverheadSide(per_step=theirs, progress_bar="disabled"),
        ratio=ratio,
        target_ratio=OVERHEAD_TARGET_RATIO,
        meets_target=(ratio <= OVERHEAD_TARGET_RATIO) if ratio is not None else None,
        note=None if pipe is not None else "no --reference: the diffusers side was not measured",
    )
