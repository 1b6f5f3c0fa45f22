"""Statistics of the bench's timings (numpy) and the per-step overhead arithmetic."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import numpy as np

from sd35trt.bench.report import STAGES, Stages, Summary

_UNIT_SCALE = {"s": 1.0, "ms": 1e3, "us": 1e6}
#: Engine (module) stages whose calls are timed; ``host`` is ``total`` minus all of them.
ENGINE_STAGES = ("clip_l", "clip_g", "t5", "transformer", "vae_decoder", "vae_encoder")


def summarize(seconds: Sequence[float], unit: str = "ms") -> Summary:
    """Median, 90th percentile (numpy's default linear interpolation), mean, min and max of
    ``seconds``, in ``unit`` (``s``, ``ms`` or ``us``; else ValueError); ``None`` without samples."""
    if unit not in _UNIT_SCALE:
        raise ValueError(f"unit must be one of {sorted(_UNIT_SCALE)}, got {unit!r}")
    if not len(seconds):
        return Summary.empty(unit)
    x = np.asarray(seconds, dtype=np.float64) * _UNIT_SCALE[unit]
    return Summary(
        unit=unit,
        n=int(x.size),
        median=float(np.median(x)),
        p90=float(np.percentile(x, 90)),
        mean=float(x.mean()),
        min=float(x.min()),
        max=float(x.max()),
    )


def stage_stats(runs: Sequence[Mapping[str, Sequence[float]]], num_inference_steps: int) -> Stages:
    """Per-stage statistics (ms) over timed runs.

    Args:
        runs: per run, the durations (seconds) of every call of each stage (:data:`ENGINE_STAGES`,
            ``total`` and ``denoise``, the loop's span).
        num_inference_steps: denoising steps per run that ran (image-to-image runs fewer).

    Returns:
        :data:`~sd35trt.bench.report.STAGES` plus ``transformer_call`` (every call). A stage's sample
        per run is the sum of its calls; ``transformer_step`` is that sum divided by the steps;
        ``host`` is ``total`` minus every engine call; ``host_loop`` is ``denoise`` minus the
        transformer calls. A stage never called has no samples (no invented zero).
    """
    per_run: dict[str, list[float]] = {s: [] for s in (*STAGES, "vae_encoder")}
    calls: list[float] = []
    loop: list[float] = []
    for run in runs:
        if run.get("denoise") and run.get("transformer"):
            loop.append(sum(run["denoise"]) - sum(run["transformer"]))
        for s in ("clip_l", "clip_g", "t5", "vae_decoder", "vae_encoder", "total"):
            if run.get(s):
                per_run[s].append(sum(run[s]))
        if run.get("transformer"):
            per_run["transformer_step"].append(sum(run["transformer"]) / num_inference_steps)
            calls.extend(run["transformer"])
        if run.get("total"):
            per_run["host"].append(sum(run["total"]) - sum(sum(run.get(e, ())) for e in ENGINE_STAGES))
    encoder = summarize(per_run["vae_encoder"]) if per_run["vae_encoder"] else None
    return Stages(
        **{s: summarize(per_run[s]) for s in STAGES},
        transformer_call=summarize(calls),
        vae_encoder=encoder,
        host_loop=summarize(loop) if loop else None,
    )


def step_overheads(calls: Sequence[tuple[int, int, float]]) -> list[float]:
    """Host seconds per denoising step spent outside the transformer, one per step but the last.

    ``calls`` are ``(start_ns, end_ns, timestep)`` per transformer call, in order; consecutive calls
    with the same timestep form one step (the CFG batch, then the skip-layer pass). A step runs from
    its first call's start to the next step's; its overhead is that span minus its calls' time.
    """
    steps: list[tuple[int, int]] = []  # (first call's start, ns inside the step's calls)
    last_key: float | None = None
    for start, end, key in calls:
        if steps and key == last_key:
            first, inside = steps[-1]
            steps[-1] = (first, inside + end - start)
        else:
            steps.append((start, end - start))
        last_key = key
    return [(nxt[0] - cur[0] - cur[1]) / 1e9 for cur, nxt in itertools.pairwise(steps)]
