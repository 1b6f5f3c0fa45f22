"""``sd35trt eval`` for engines built with the first-block cache: what each threshold costs in quality
(PSNR and SSIM of each cached image against the threshold-0 one, and the steps skipped)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sd35trt.bench.eval_report import CacheQuality, Stats
from sd35trt.errors import ConfigError

#: The default sweep: from barely skipping on a trained SD3.5 (0.05) to most steps on the tiny model.
DEFAULT_THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.6)
EVAL_CACHE_PLOT = "eval_cache.png"


def cache_sweep(
    runtime, prompts: Sequence[str], seeds: Sequence[int], thresholds: Sequence[float]
) -> list[CacheQuality]:
    """Generate every prompt (one seed each) uncached and at each threshold (0..10) with ``runtime``
    (an ``Sd35Runtime``); one :class:`CacheQuality` per threshold scores them against the uncached.

    Raises:
        ConfigError: the engines have no first-block cache engines.
    """
    import numpy as np

    from sd35trt.metrics import psnr, ssim
    from sd35trt.runtime.request import GenerationRequest

    if not runtime.info.limits.cache:
        raise ConfigError(
            "the cache sweep needs engines built with runtime.cache (the two transformer engines)"
        )

    def images(threshold: float):
        out = []
        for prompt, seed in zip(prompts, seeds, strict=True):
            result = runtime.generate(GenerationRequest(prompt=prompt, seed=seed, cache_threshold=threshold))
            out.append((np.asarray(result.images[0].convert("RGB"), dtype=np.uint8), result.params))
        return out

    uncached = images(0.0)
    rows = []
    for threshold in thresholds:
        cached = images(threshold)
        pairs = [(ref, img) for (ref, _), (img, _) in zip(uncached, cached, strict=True)]
        finite = [p for p in (psnr(a, b) for a, b in pairs) if p != float("inf")]
        rows.append(
            CacheQuality(
                threshold=threshold,
                steps=cached[0][1].denoising_steps,
                skipped_steps=Stats.of([p.cache_skipped_steps for _, p in cached]),
                identical=len(pairs) - len(finite),
                psnr_db=Stats.of(finite),
                ssim=Stats.of([ssim(a, b) for a, b in pairs]),
            )
        )
    return rows


def plot_cache_quality(rows: Sequence[CacheQuality], out: str | Path) -> Path:
    """PSNR and SSIM (means over prompts) against the share of steps skipped, one point per threshold."""
    from sd35trt.bench.plots import pyplot, save_figure

    share = [100 * (r.skipped_steps.mean or 0) / r.steps for r in rows]
    fig, (ax1, ax2) = pyplot().subplots(1, 2, figsize=(10, 4))
    for ax, values, label in (
        (ax1, [r.psnr_db.mean for r in rows], "PSNR vs uncached (dB; identical not plotted)"),
        (ax2, [r.ssim.mean for r in rows], "SSIM vs uncached"),
    ):
        points = [(x, y, r.threshold) for x, y, r in zip(share, values, rows, strict=True) if y is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        for x, y, t in points:
            ax.annotate(f"{t:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("steps skipped (%)")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle("first-block cache: quality against steps skipped (labels: threshold)")
    return save_figure(fig, out)
