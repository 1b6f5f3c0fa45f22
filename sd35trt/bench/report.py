"""``bench.json``: the schema of a benchmark result, reading it, merging several, printing one.

Times are in the unit each :class:`Summary` states (ms for stages, µs for the per-step overhead);
memory in bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field

from sd35trt.bench.reports import ReportModel, read_report
from sd35trt.bench.reports import fmt_number as _fmt
from sd35trt.config import SkipLayerGuidance

#: ``/2``: generation parameters named as diffusers names them (``num_inference_steps``).
SCHEMA = "sd35trt.bench/2"
BENCH_JSON = "bench.json"
BENCH_PNG = "bench.png"
#: The overhead target: sd35trt's per-step host overhead at most this fraction of diffusers'.
OVERHEAD_TARGET_RATIO = 0.5

#: Reported stages, in pipeline order: ``transformer_step`` is per denoising step; ``host`` is
#: the time of a whole generation outside every engine (module) call: tokenizing, joining
#: embeddings, drawing the noise, the NaN checks, converting the images, and the denoising loop's
#: own work, which ``host_loop`` (the loop's span minus its transformer calls, sd35trt only) shows
#: apart. Per step, ``host_loop`` is what the overhead panel measures with an instant transformer.
STAGES = ("clip_l", "clip_g", "t5", "transformer_step", "vae_decoder", "host", "total")
STAGE_LABELS = {
    "host": "host, whole generation (outside engines)",
    "host_loop": "host, denoising loop (outside the transformer)",
    "clip_l": "CLIP-L",
    "clip_g": "CLIP-G",
    "t5": "T5",
    "transformer_step": "transformer / step",
    "transformer_call": "transformer / call",
    "vae_decoder": "VAE decode",
    "vae_encoder": "VAE encode",
    "total": "total",
}
#: Stages of the image-to-image configuration (:attr:`BenchReport.img2img`).
IMG2IMG_STAGES = ("vae_encoder", "transformer_step", "vae_decoder", "host", "total")


class Summary(ReportModel):
    """Statistics of one set of durations, in ``unit``; ``None`` when there were no samples."""

    unit: Literal["s", "ms", "us"]
    n: int = Field(ge=0)
    median: float | None
    p90: float | None
    mean: float | None
    min: float | None
    max: float | None

    @classmethod
    def empty(cls, unit: str) -> Summary:
        """No samples."""
        return cls(unit=unit, n=0, median=None, p90=None, mean=None, min=None, max=None)


class Stages(ReportModel):
    """Per-stage statistics over the timed runs (see :data:`STAGES`; ``transformer_call``: per call)."""

    clip_l: Summary
    clip_g: Summary
    t5: Summary
    transformer_step: Summary
    transformer_call: Summary
    vae_decoder: Summary
    host: Summary
    total: Summary
    #: image-to-image runs only: the VAE encoder engine.
    vae_encoder: Summary | None = None
    #: sd35trt only: the denoising loop's span minus its transformer calls (part of ``host``).
    host_loop: Summary | None = None

    def get(self, stage: str) -> Summary:
        """The statistics of ``stage`` (an optional stage that was not measured: no samples)."""
        return getattr(self, stage) or Summary.empty(self.total.unit)


class Memory(ReportModel):
    """Peak memory during the timed runs: host RSS on the CPU, device memory on CUDA (bytes)."""

    kind: Literal["peak_rss", "cuda"]
    method: str
    peak_rss_bytes: int | None = None
    baseline_rss_bytes: int | None = None
    peak_device_used_bytes: int | None = None
    baseline_device_used_bytes: int | None = None
    peak_torch_allocated_bytes: int | None = None

    @property
    def peak_bytes(self) -> int:
        """The headline peak: RSS on the CPU, device memory in use on CUDA."""
        peak = self.peak_rss_bytes if self.kind == "peak_rss" else self.peak_device_used_bytes
        return int(peak or 0)


class Configuration(ReportModel):
    """One benchmarked configuration: an engines directory or the diffusers pipeline."""

    label: str
    kind: Literal["engines", "diffusers"]
    device: str
    stages: Stages
    images_per_second: float | None
    memory: Memory
    #: other processes' load (1-minute average) before and after the runs: timings are noisy when high.
    load_average_1m: tuple[float | None, float | None]
    # engines
    engines_dir: str | None = None
    backend: str | None = None
    precision: dict[str, str] | None = None
    transformer_fp8: bool | None = None
    #: TensorRT: bytes of the one activation buffer the engines share (``None`` for other backends).
    activation_memory_bytes: int | None = None
    # diffusers
    model_dir: str | None = None
    dtype: str | None = None
    # image-to-image: the strength and the denoising steps it keeps
    strength: float | None = None
    steps_run: int | None = None
    # first-block cache: the threshold, and per generation (last timed run) the transformer calls
    # (CFG and skip-layer passes) and how many of them skipped the rest of the transformer
    cache_threshold: float | None = None
    transformer_calls: int | None = None
    transformer_skipped: int | None = None


class BenchParams(ReportModel):
    """What every configuration generates: the first engines directory's runtime defaults, as
    resolved for a request (so without CFG no negative prompt), replaced where ``bench`` was asked."""

    prompt: str
    negative_prompt: str | None
    num_inference_steps: int = Field(ge=1)
    guidance_scale: float
    height: int
    width: int
    num_images: int = Field(ge=1)
    seed: int
    #: the skip-layer guidance applied (``None`` when off or without CFG).
    skip_layer_guidance: SkipLayerGuidance | None
    #: image-to-image at this strength (the initial image is :func:`sd35trt.bench.subjects.bench_image`).
    strength: float | None = None
    #: the first-block cache's threshold (``None``: the engines' default).
    cache_threshold: float | None = None

    @property
    def steps_run(self) -> int:
        """Denoising steps that run: all, or the share ``strength`` keeps (diffusers' ``get_timesteps``)."""
        from sd35trt.runtime.request import img2img_steps

        n = self.num_inference_steps
        return n if self.strength is None else img2img_steps(n, self.strength)[1]


class OverheadSide(ReportModel):
    """One side of the overhead measurement: per-step host time outside the transformer (µs)."""

    per_step: Summary
    engines_dir: str | None = None
    model_dir: str | None = None
    progress_bar: str | None = None


class Overhead(ReportModel):
    """Per-step host overhead of sd35trt and of diffusers, both with an instant transformer."""

    method: str
    device: str
    num_inference_steps: int
    height: int
    width: int
    guidance_scale: float
    skip_layer_guidance: SkipLayerGuidance | None
    runs: int
    sd35trt: OverheadSide
    diffusers: OverheadSide | None
    ratio: float | None
    target_ratio: float
    meets_target: bool | None
    note: str | None = None


class Host(ReportModel):
    """The machine the bench ran on."""

    platform: str
    python: str
    torch: str
    cpu_count: int | None
    torch_threads: int
    device: str
    timer: str
    gpu: str | None = None
    load_average_1m: float | None = None


class BenchFiles(ReportModel):
    json_path: str = Field(alias="json")
    png: str | None


class BenchReport(ReportModel):
    """The content of ``bench.json``."""

    schema_id: Literal["sd35trt.bench/2"] = Field(default=SCHEMA, alias="schema")
    created: str
    host: Host
    runs: int = Field(ge=1)
    warmup: int = Field(ge=0)
    params: BenchParams
    configurations: list[Configuration] = Field(min_length=1)
    #: the first engines directory in image-to-image mode (when it has a VAE encoder).
    img2img: Configuration | None = None
    #: the first engines directory at each first-block cache threshold, 0 first (when built with the cache).
    cache: list[Configuration] = Field(default_factory=list)
    overhead: Overhead | None
    files: BenchFiles


def read_bench(path: str | Path) -> BenchReport:
    """Read ``bench.json``; ReportError when missing, not JSON, or a field is off the schema (named)."""
    return read_report(path, BenchReport)


def merge_bench(reports: Sequence[BenchReport]) -> BenchReport:
    """One report holding the configurations of several (labels get their device when they differ);
    host, parameters and overhead are the first report's."""
    if len(reports) == 1:
        return reports[0]
    devices = {r.host.device for r in reports}
    configurations = []
    for r in reports:
        for c in r.configurations:
            if len(devices) > 1:
                c = c.model_copy(update={"label": f"{c.label} [{r.host.gpu or r.host.device}]"})
            configurations.append(c)
    first = reports[0]
    host = first.host.model_copy(update={"device": " + ".join(sorted(devices))})
    return first.model_copy(update={"configurations": configurations, "host": host})


def format_bench(report: BenchReport) -> str:
    """The report as a readable table (medians and p90 in ms, images/s, peak memory, overhead)."""
    shown = [*STAGES[:-1], "host_loop", STAGES[-1]]  # the loop's share next to the whole
    rows = [("configuration", *[STAGE_LABELS[s] for s in shown], "img/s", "peak MiB")]
    for c in report.configurations:
        cells = [c.label]
        for s in shown:
            st = c.stages.get(s)
            cells.append(f"{_fmt(st.median)} / {_fmt(st.p90)}")
        cells.append(_fmt(c.images_per_second))
        cells.append(f"{c.memory.peak_bytes / 2**20:.0f}")
        rows.append(tuple(cells))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        f"device {report.host.device} ({report.host.timer}), {report.runs} timed runs after "
        f"{report.warmup} warm-up; stage times: median / p90 in ms",
        *["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in rows],
    ]
    i2i = report.img2img
    if i2i is not None:
        cells = ", ".join(
            f"{STAGE_LABELS[s]} {_fmt(i2i.stages.get(s).median)} / {_fmt(i2i.stages.get(s).p90)}"
            for s in IMG2IMG_STAGES
        )
        lines.append(
            f"image-to-image, {i2i.label} (strength {i2i.strength:g}, {i2i.steps_run} of "
            f"{report.params.num_inference_steps} steps): {cells} ms; {_fmt(i2i.images_per_second)} img/s"
        )
    if report.cache:
        base = report.cache[0].stages.transformer_step.median
        lines.append(
            f"first-block cache, {report.cache[0].label}: transformer / step (median ms), calls skipped"
        )
        for c in report.cache:
            step = c.stages.transformer_step.median
            saved = (
                f", {100 * (1 - step / base):.0f}% less transformer time" if base and step is not None else ""
            )
            lines.append(
                f"  threshold {c.cache_threshold:g}: {_fmt(step)} ms, {c.transformer_skipped} of "
                f"{c.transformer_calls} calls skipped{saved}; {_fmt(c.images_per_second)} img/s"
            )
    o = report.overhead
    if o is not None:
        ours = o.sd35trt.per_step
        line = f"runtime overhead per step: sd35trt {_fmt(ours.median, 1)} us (p90 {_fmt(ours.p90, 1)})"
        if o.diffusers is not None:
            theirs = o.diffusers.per_step
            verdict = "meets" if o.meets_target else "misses"
            line += (
                f", diffusers {_fmt(theirs.median, 1)} us (p90 {_fmt(theirs.p90, 1)}); "
                f"ratio {_fmt(o.ratio, 3)} ({verdict} the target <= {o.target_ratio})"
            )
        lines.append(line)
    return "\n".join(lines)
