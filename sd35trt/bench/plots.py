"""Figures for ``bench`` and ``eval``: matplotlib (Agg backend), written as PNG.

Each takes only the typed report the command wrote (and, for the grid, the images beside it), so
``scripts/plot_bench.py`` and ``scripts/eval_grid.py`` can redraw them without re-running anything.
"""

from __future__ import annotations

import textwrap
from functools import partial
from pathlib import Path

from sd35trt.bench.eval_report import EvalReport, PromptScore
from sd35trt.bench.report import STAGE_LABELS, BenchReport
from sd35trt.bench.reports import fmt_number

_num = partial(fmt_number, none="inf")

_STAGES = ("clip_l", "clip_g", "t5", "transformer_step", "vae_decoder", "host", "host_loop")


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bench(report: BenchReport, out: str | Path) -> Path:
    """Draw ``bench.json`` (per-stage latency, images/s, peak memory, per-step runtime overhead)
    into the PNG ``out``; returns its path."""
    plt = pyplot()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    p = report.params
    host = report.host
    fig.suptitle(
        f"sd35trt bench: {p.height}x{p.width}, {p.num_inference_steps} steps, "
        f"guidance {p.guidance_scale}, "
        f"{p.num_images} image(s); {report.runs} timed runs after {report.warmup} warm-up\n"
        f"device: {host.gpu or host.device} (timer: {host.timer})",
        fontsize=11,
    )
    _stage_latency(axes[0][0], report, colors)
    _throughput(axes[0][1], report, colors)
    _peak_memory(axes[1][0], report, colors)
    _overhead(axes[1][1], report)
    return save_figure(fig, out)


def _upper_whiskers(med: list[float], p90: list[float]) -> list[list[float]]:
    """``yerr`` for bars at ``med`` with whiskers up to ``p90`` and none below."""
    return [[0.0] * len(med), [max(b - a, 0.0) for a, b in zip(med, p90, strict=True)]]


def _stage_latency(ax, report: BenchReport, colors: list[str]) -> None:
    """Per-stage latency, configurations side by side; whiskers up to p90; log scale past 50x."""
    import numpy as np

    configs = report.configurations
    x = np.arange(len(_STAGES))
    width = 0.8 / max(len(configs), 1)
    positive = []
    for i, c in enumerate(configs):
        med = [c.stages.get(s).median or 0.0 for s in _STAGES]
        p90 = [c.stages.get(s).p90 or 0.0 for s in _STAGES]
        ax.bar(
            x + (i - (len(configs) - 1) / 2) * width,
            med,
            width,
            yerr=_upper_whiskers(med, p90),
            capsize=3,
            label=c.label,
            color=colors[i % len(colors)],
        )
        positive += [m for m in med if m > 0]
    ax.set_xticks(x, [textwrap.fill(STAGE_LABELS[s], 11) for s in _STAGES], fontsize=9)
    ax.set_ylabel("time (ms)")
    ax.set_title("Per-stage latency per generation (bar: median, whisker: p90)")
    if positive and max(positive) / min(positive) > 50:
        ax.set_yscale("log")
        ax.set_ylabel("time (ms, log scale)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def _configuration_bars(ax, report: BenchReport, colors: list[str], values, texts, ylabel, title, headroom):
    """One labelled bar per configuration (``values``, annotated with ``texts``)."""
    configs = report.configurations
    bars = ax.bar(range(len(configs)), values, color=[colors[i % len(colors)] for i in range(len(configs))])
    ax.bar_label(bars, texts, fontsize=8)
    ax.set_xticks(range(len(configs)), [textwrap.fill(c.label, 22) for c in configs], fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_ylim(0, max([*values, 1e-9]) * headroom)
    ax.grid(axis="y", alpha=0.3)


def _throughput(ax, report: BenchReport, colors: list[str]) -> None:
    """End to end: images/s from the median total, labelled with the total's median and p90."""
    configs = report.configurations
    ips = [c.images_per_second or 0.0 for c in configs]
    texts = [
        f"{v:.2f} img/s\n(total {c.stages.total.median or 0:.0f} ms, p90 {c.stages.total.p90 or 0:.0f} ms)"
        for v, c in zip(ips, configs, strict=True)
    ]
    title = "Throughput (from the median end-to-end time)"
    _configuration_bars(ax, report, colors, ips, texts, "throughput (images / s)", title, 1.3)


def _peak_memory(ax, report: BenchReport, colors: list[str]) -> None:
    """Peak memory per configuration in MiB (host RSS or device memory, as measured)."""
    configs = report.configurations
    mem = [c.memory.peak_bytes / 2**20 for c in configs]
    kinds = {c.memory.kind for c in configs}
    what = "peak RSS (host)" if kinds == {"peak_rss"} else "peak device memory in use"
    texts = [f"{v:.0f} MiB" for v in mem]
    title = f"Memory: {what} during the timed runs"
    _configuration_bars(ax, report, colors, mem, texts, f"{what} (MiB)", title, 1.2)


def _overhead(ax, report: BenchReport) -> None:
    """Host time per denoising step outside the transformer, sd35trt vs diffusers, with the target line."""
    o = report.overhead
    if o is None:
        ax.text(0.5, 0.5, "overhead not measured", ha="center", va="center")
        ax.set_axis_off()
        return
    names, med, p90 = [], [], []
    for side, name in (("sd35trt", "sd35trt runtime"), ("diffusers", "diffusers pipeline")):
        measured = getattr(o, side)
        if measured is not None:
            names.append(name)
            med.append(measured.per_step.median or 0.0)
            p90.append(measured.per_step.p90 or 0.0)
    err = _upper_whiskers(med, p90)
    bars = ax.bar(names, med, yerr=err, capsize=4, color=["tab:green", "tab:gray"][: len(names)])
    for b in bars:
        ax.annotate(
            f"{b.get_height():.0f} µs",
            (b.get_x() + b.get_width() / 2, b.get_height()),
            ha="left",
            va="bottom",
            fontsize=8,
            xytext=(4, 0),
            textcoords="offset points",
        )
    if o.diffusers is not None and o.diffusers.per_step.median:
        target = o.diffusers.per_step.median * o.target_ratio
        ax.axhline(
            target,
            color="tab:red",
            linestyle="--",
            label=f"target: {o.target_ratio:g} x diffusers = {target:.0f} µs",
        )
        ax.legend(fontsize=8, loc="upper left")
    ratio = f"ratio {o.ratio:.2f}" if o.ratio is not None else "no diffusers comparison"
    ax.set_title(f"Host overhead per denoising step, instant transformer ({ratio})")
    ax.set_ylabel("host time outside the transformer per step (µs)")
    ax.set_ylim(0, max([*p90, *med, 1e-9]) * 1.25)
    ax.grid(axis="y", alpha=0.3)


def _metric_line(row: PromptScore) -> str:
    psnr = row.psnr_db
    psnr_s = "inf (identical)" if psnr is None else f"{psnr:.2f} dB"
    parts = [f"PSNR {psnr_s}", f"SSIM {row.ssim:.4f}"]
    if row.lpips is not None:
        parts.append(f"LPIPS {row.lpips:.4f}")
    return ", ".join(parts)


def plot_eval_grid(
    report: EvalReport, root: str | Path, out: str | Path, diff_max: float | None = None
) -> Path:
    """Grid: one row per prompt; reference, engine image and a heat map of their difference.

    ``root`` is the directory ``eval.json`` is in (image paths are relative to it); ``diff_max`` the
    difference (8-bit levels) shown at full colour, default the largest over all prompts (one scale).
    Returns the PNG path ``out``.
    """
    plt = pyplot()
    import numpy as np
    from PIL import Image

    root = Path(root)
    rows = report.per_prompt
    n = len(rows)
    pairs, diffs = [], []
    for row in rows:
        ref = np.asarray(Image.open(root / row.reference_image).convert("RGB"))
        eng = np.asarray(Image.open(root / row.engine_image).convert("RGB"))
        pairs.append((ref, eng))
        diffs.append(np.abs(ref.astype(np.int16) - eng.astype(np.int16)).max(axis=-1))  # [H, W], 0..255
    vmax = diff_max if diff_max is not None else max(1, max(int(d.max()) for d in diffs))
    fig, axes = plt.subplots(n, 3, figsize=(11, 3.6 * n + 1.2), squeeze=False)
    for r, (row, (ref, eng), diff) in enumerate(zip(rows, pairs, diffs, strict=True)):
        prompt = textwrap.shorten(row.prompt, 70, placeholder=" …")
        axes[r][0].imshow(ref)
        axes[r][0].set_title(f"reference: {report.reference.label}", fontsize=8)
        axes[r][1].imshow(eng)
        axes[r][1].set_title(f"engines: {report.engines.label}\n{_metric_line(row)}", fontsize=8)
        im = axes[r][2].imshow(diff, cmap="inferno", vmin=0, vmax=vmax)
        axes[r][2].set_title(f"|reference - engines|, max over RGB (mean {diff.mean():.2f})", fontsize=8)
        cbar = fig.colorbar(im, ax=axes[r][2], fraction=0.046, pad=0.04)
        cbar.set_label("8-bit levels", fontsize=7)
        cbar.ax.tick_params(labelsize=7)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(textwrap.fill(f"#{row.index} seed {row.seed}: {prompt}", 28), fontsize=8)
    agg = report.aggregate
    psnr = agg.psnr_db
    lp_s = f"LPIPS mean {_num(agg.lpips.mean, 4)}" if agg.lpips is not None else report.lpips.reason
    p = report.params
    fig.suptitle(
        f"sd35trt eval: {n} held-out prompts, {p.height}x{p.width}, {p.num_inference_steps} steps, "
        f"guidance {p.guidance_scale}, seed {p.seeds}\n"
        f"PSNR mean {_num(psnr.mean)} dB (min {_num(psnr.min)} dB), identical {agg.identical}/{n}; "
        f"SSIM mean {_num(agg.ssim.mean, 4)} (min {_num(agg.ssim.min, 4)})\n{lp_s}",
        fontsize=9,
    )
    return save_figure(fig, out)


def save_figure(fig, out: str | Path) -> Path:
    """Lay out, write as PNG (creating the directory) and free ``fig``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
