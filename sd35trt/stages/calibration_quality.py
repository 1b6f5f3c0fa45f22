"""Quality of a calibrated FP8 transformer against the unquantized one, on held-out prompts.

Both with the FP8 model in ModelOpt's fake-quant form:

- **Per-step transformer error.** While the unquantized pipeline denoises, every transformer call
  is repeated with the quantizers on, on the same inputs, and ``||fp8 - ref|| / ||ref||`` recorded
  against the step's sigma (grouped into buckets; early steps have sigma near 1). The shared
  reference trajectory isolates the transformer's own error from drift between trajectories.
- **Final images.** The FP8 pipeline denoises from the same seed; PSNR and SSIM against the
  reference images.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sd35trt.models.quantize import quantizers

if TYPE_CHECKING:
    from torch import nn

    from sd35trt.models.reference import PromptBatch

#: Sigma bucket edges: four equal quarters of the flow-match noise level range [0, 1].
SIGMA_EDGES = (0.0, 0.25, 0.5, 0.75, 1.0)
#: What ``overall_mean_error`` and the buckets measure.
METRIC = "relative error ||fp8 - ref|| / ||ref|| of the transformer output, same inputs"


@dataclass(frozen=True)
class BucketError:
    """Relative transformer error over the steps whose sigma falls in ``(low, high]`` (``mean`` and
    ``max`` None when none did)."""

    low: float
    high: float
    calls: int
    mean: float | None
    max: float | None

    def to_json(self) -> dict:
        return {
            "sigma_low": self.low,
            "sigma_high": self.high,
            "calls": self.calls,
            "mean": self.mean,
            "max": self.max,
        }


@dataclass(frozen=True)
class ImageScore:
    """FP8 image against the reference image of one held-out prompt."""

    prompt: str
    seed: int
    psnr_db: float | None  # None: the images are identical (infinite PSNR)
    ssim: float

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class CalibrationReport:
    """What :func:`quality_report` measured; ``to_json`` is ``calibration_report.json``."""

    steps: int
    buckets: tuple[BucketError, ...]
    images: tuple[ImageScore, ...]
    overall_mean_error: float

    @property
    def mean_psnr_db(self) -> float | None:
        finite = [s.psnr_db for s in self.images if s.psnr_db is not None]
        return sum(finite) / len(finite) if finite else None

    @property
    def mean_ssim(self) -> float:
        return sum(s.ssim for s in self.images) / len(self.images)

    def to_json(self) -> dict:
        return {
            "steps": self.steps,
            "metric": METRIC,
            "overall_mean_error": self.overall_mean_error,
            "buckets": [b.to_json() for b in self.buckets],
            "images": [s.to_json() for s in self.images],
            "mean_psnr_db": self.mean_psnr_db,
            "mean_ssim": self.mean_ssim,
        }

    def table(self) -> str:
        """The report as a printable text table."""

        def fmt(x: float | None) -> str:
            return "-" if x is None else f"{x:.4f}"

        rows = [
            f"FP8 vs unquantized transformer on {len(self.images)} held-out prompts: relative error "
            "||fp8 - ref|| / ||ref|| of each call's output, by the step's noise level sigma (1: first step)",
            f"{'sigma bucket':<13} {'calls':>5} {'mean rel err':>12} {'max rel err':>11}",
        ]
        for b in self.buckets:
            rows.append(f"{b.low:.2f}-{b.high:.2f}    {b.calls:>5} {fmt(b.mean):>12} {fmt(b.max):>11}")
        rows.append(
            f"{'all steps':<13} {sum(b.calls for b in self.buckets):>5} {self.overall_mean_error:>12.4f}"
        )
        psnr = "identical" if self.mean_psnr_db is None else f"{self.mean_psnr_db:.2f} dB"
        rows.append(
            f"final images ({len(self.images)}, FP8 vs unquantized pipeline, same seed): PSNR {psnr}, "
            f"SSIM {self.mean_ssim:.4f}"
        )
        return "\n".join(rows)


@contextlib.contextmanager
def quantizers_set(model: nn.Module, names: Sequence[str], enabled: bool) -> Iterator[None]:
    """Temporarily enable or disable the named quantizers of ``model``."""
    qs = [quantizers(model)[n] for n in names]
    for q in qs:
        q.enable() if enabled else q.disable()
    try:
        yield
    finally:
        for q in qs:
            q.disable() if enabled else q.enable()


class _StepErrors:
    """Forward hook: re-runs each reference transformer call with the FP8 quantizers on."""

    def __init__(self, fp8_names: Sequence[str], train_timesteps: int) -> None:
        self.fp8_names = fp8_names
        self.train_timesteps = train_timesteps
        self.records: list[tuple[float, float]] = []  # (sigma, relative error)
        self._inner = False

    def __call__(self, module, args, kwargs, output):
        import torch

        if self._inner:
            return output
        ref = output[0] if isinstance(output, tuple) else output.sample  # [2B, C, h, w]
        self._inner = True
        try:
            with quantizers_set(module, self.fp8_names, enabled=True):
                out = module(*args, **kwargs)
        finally:
            self._inner = False
        fp8 = out[0] if isinstance(out, tuple) else out.sample
        ref32 = ref.float()
        err = (
            torch.linalg.vector_norm(fp8.float() - ref32) / torch.linalg.vector_norm(ref32).clamp_min(1e-12)
        ).item()
        sigma = float(kwargs["timestep"].flatten()[0]) / self.train_timesteps
        self.records.append((sigma, err))
        return output


def bucketize(
    records: Sequence[tuple[float, float]], edges: Sequence[float] = SIGMA_EDGES
) -> tuple[BucketError, ...]:
    """Group ``(sigma, error)`` records into ``(low, high]`` sigma buckets (the first includes 0).

    Returns:
        One :class:`BucketError` per bucket, empty buckets included.
    """
    out = []
    for i, (low, high) in enumerate(itertools.pairwise(edges)):
        errs = [e for s, e in records if (low < s <= high) or (i == 0 and s == low)]
        out.append(
            BucketError(
                low, high, len(errs), sum(errs) / len(errs) if errs else None, max(errs, default=None)
            )
        )
    return tuple(out)


def quality_report(
    pipe, batches: Sequence[PromptBatch], steps: int, guidance_scale: float, height: int, width: int
) -> CalibrationReport:
    """Compare the calibrated FP8 transformer of ``pipe`` with its unquantized self.

    Args:
        pipe: a ``StableDiffusion3Pipeline`` whose transformer :func:`sd35trt.models.quantize.quantize`
            has calibrated (its text encoders may be gone: the batches carry embeddings).
        batches: held-out prompt batches, already encoded, each with its seed.
        height, width: image size in pixels.

    Raises:
        CalibrationError: the FP8 or the reference pipeline produced non-finite values.
    """
    import numpy as np

    from sd35trt.errors import CalibrationError
    from sd35trt.metrics import psnr, ssim, to_uint8
    from sd35trt.models.reference import denoise_batch

    transformer = pipe.transformer
    fp8_names = [n for n, q in quantizers(transformer).items() if q.is_enabled]
    hook = _StepErrors(fp8_names, pipe.scheduler.config.num_train_timesteps)
    scores: list[ImageScore] = []
    for batch in batches:
        handle = transformer.register_forward_hook(hook, with_kwargs=True)
        try:
            with quantizers_set(transformer, fp8_names, enabled=False):
                ref = denoise_batch(
                    pipe, batch, steps, guidance_scale, height, width, output_type="np"
                )  # [B, H, W, 3]
        finally:
            handle.remove()
        fp8 = denoise_batch(pipe, batch, steps, guidance_scale, height, width, output_type="np")
        for what, images in (("reference", ref), ("FP8", fp8)):
            if not np.isfinite(images).all():
                raise CalibrationError(
                    f"the {what} pipeline produced NaN/inf images for held-out prompt {batch.prompts[0]!r}"
                )
        for prompt, a, b in zip(batch.prompts, to_uint8(ref), to_uint8(fp8), strict=True):
            p = psnr(a, b)
            scores.append(ImageScore(prompt, batch.seed, None if math.isinf(p) else p, ssim(a, b)))
    errs = [e for _, e in hook.records]
    return CalibrationReport(
        steps=steps,
        buckets=bucketize(hook.records),
        images=tuple(scores),
        overall_mean_error=sum(errs) / len(errs),
    )
