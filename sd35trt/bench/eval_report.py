"""``eval.json``: the schema of an image-quality evaluation, reading it, and its Markdown table.

PSNR is in dB, ``None`` where the two images are identical (infinite PSNR); SSIM and LPIPS are
unitless; image paths are relative to the directory of ``eval.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from sd35trt.bench.reports import ReportModel, read_report
from sd35trt.bench.reports import fmt_number as _cell
from sd35trt.config import SkipLayerGuidance

#: ``/2``: generation parameters named as diffusers names them (``num_inference_steps``).
SCHEMA = "sd35trt.eval/2"
EVAL_JSON = "eval.json"
EVAL_TABLE = "eval.md"
EVAL_GRID = "eval_grid.png"


class Stats(ReportModel):
    """Mean, median, min and max of a metric over prompts; ``None`` when there is no value."""

    mean: float | None
    median: float | None
    min: float | None
    max: float | None

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats:
        if not values:
            return cls(mean=None, median=None, min=None, max=None)
        x = np.asarray(values, dtype=np.float64)
        return cls(mean=float(x.mean()), median=float(np.median(x)), min=float(x.min()), max=float(x.max()))


class PromptScore(ReportModel):
    """One held-out prompt: its seed, the metrics of the engine image against the reference image."""

    index: int
    prompt: str
    seed: int
    psnr_db: float | None
    ssim: float = Field(ge=-1.0, le=1.0)
    lpips: float | None
    reference_image: str
    engine_image: str


class Aggregate(ReportModel):
    """Statistics over prompts; PSNR over the non-identical pairs only (identical = infinite)."""

    prompts: int
    identical: int
    psnr_db: Stats
    ssim: Stats
    lpips: Stats | None

    @classmethod
    def of(cls, rows: Sequence[PromptScore]) -> Aggregate:
        lpips = [r.lpips for r in rows if r.lpips is not None]
        return cls(
            prompts=len(rows),
            identical=sum(1 for r in rows if r.psnr_db is None),
            psnr_db=Stats.of([r.psnr_db for r in rows if r.psnr_db is not None]),
            ssim=Stats.of([r.ssim for r in rows]),
            lpips=Stats.of(lpips) if lpips else None,
        )


class LpipsStatus(ReportModel):
    """Whether LPIPS ran, and why not when it did not."""

    available: bool
    reason: str | None


class EvalParams(ReportModel):
    """The generation parameters of both sides: the engines' runtime defaults."""

    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int
    negative_prompt: str
    max_sequence_length: int
    #: the skip-layer guidance applied (``None`` when off or without CFG).
    skip_layer_guidance: SkipLayerGuidance | None
    seeds: str


class EvalDevices(ReportModel):
    engines: str
    reference: str


class EvalEngines(ReportModel):
    dir: str
    label: str
    backend: str


class EvalReference(ReportModel):
    dir: str
    label: str
    dtype: str


class EvalFiles(ReportModel):
    json_path: str = Field(alias="json")
    table: str
    grid: str | None


class CacheQuality(ReportModel):
    """One threshold of the sweep: steps skipped and the quality of the cached images, over prompts
    (PSNR over the images that differ from the uncached ones; ``identical`` counts the others)."""

    threshold: float = Field(ge=0.0)
    steps: int = Field(ge=1, description="denoising steps per image")
    skipped_steps: Stats
    identical: int
    psnr_db: Stats
    ssim: Stats


class EvalReport(ReportModel):
    """The content of ``eval.json``."""

    schema_id: Literal["sd35trt.eval/2"] = Field(default=SCHEMA, alias="schema")
    created: str
    device: EvalDevices
    engines: EvalEngines
    reference: EvalReference
    prompts_file: str
    params: EvalParams
    per_prompt: list[PromptScore] = Field(min_length=1)
    aggregate: Aggregate
    lpips: LpipsStatus
    warnings: list[str]
    files: EvalFiles
    #: engines built with the first-block cache: quality of cached vs uncached images per threshold.
    cache: list[CacheQuality] = Field(default_factory=list)


def read_eval(path: str | Path) -> EvalReport:
    """Read ``eval.json``; ReportError when missing, not JSON, or a field is off the schema (named)."""
    return read_report(path, EvalReport)


def format_cache_quality(rows: Sequence[CacheQuality]) -> list[str]:
    """Markdown lines: a table of threshold, steps skipped (mean of N), PSNR and SSIM (means)."""
    if not rows:
        return []

    lines = [
        "",
        "First-block cache: cached vs uncached (threshold 0) images of the same engines, means over prompts",
        "",
        "| threshold | steps skipped | PSNR (dB) | SSIM | identical |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.threshold:g} | {r.skipped_steps.mean:.2f} of {r.steps} | "
            f"{_cell(r.psnr_db.mean, 2, 'inf')} | {r.ssim.mean:.4f} | {r.identical} |"
        )
    return lines


def format_eval(report: EvalReport) -> str:
    """The per-prompt and aggregate metrics as a Markdown table."""
    lp = report.lpips
    p = report.params
    header = ["#", "seed", "prompt", "PSNR (dB)", "SSIM"] + (["LPIPS"] if lp.available else [])
    lines = [
        f"engines {report.engines.label} vs reference {report.reference.label}, "
        f"{p.height}x{p.width}, {p.num_inference_steps} steps",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for r in report.per_prompt:
        prompt = r.prompt if len(r.prompt) <= 60 else r.prompt[:59] + "…"
        cells = [str(r.index), str(r.seed), prompt, _cell(r.psnr_db, 2, "inf"), f"{r.ssim:.4f}"]
        if lp.available:
            cells.append(_cell(r.lpips, 4))
        lines.append("| " + " | ".join(cells) + " |")
    agg = report.aggregate
    for stat in ("mean", "median", "min", "max"):
        cells = [stat, "", "", _cell(getattr(agg.psnr_db, stat), 2, "inf"), _cell(getattr(agg.ssim, stat), 4)]
        if lp.available:
            cells.append(_cell(getattr(agg.lpips, stat) if agg.lpips else None, 4))
        lines.append("| " + " | ".join(f"**{c}**" if c else c for c in cells) + " |")
    lines.append("")
    lines.append(
        "PSNR statistics over non-identical pairs; identical pairs (infinite PSNR): "
        f"{agg.identical}/{agg.prompts}."
    )
    lines.append("LPIPS: computed (AlexNet)." if lp.available else f"{lp.reason}.")
    for w in report.warnings:
        lines.append(f"warning: {w} (the reference truncates the same way)")
    lines += format_cache_quality(report.cache)
    return "\n".join(lines)
