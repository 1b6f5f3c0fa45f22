"""``sd35trt eval``: image quality of engines against the non-quantized diffusers pipeline.

PSNR, SSIM (:mod:`sd35trt.metrics`) and, when the ``lpips`` package and its network weights are on
this machine, LPIPS. Nothing is downloaded: without them LPIPS is skipped and the result says so.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sd35trt.artifacts.manifest import now_utc
from sd35trt.bench.eval_report import (
    EVAL_GRID,
    EVAL_JSON,
    EVAL_TABLE,
    Aggregate,
    EvalDevices,
    EvalEngines,
    EvalFiles,
    EvalParams,
    EvalReference,
    EvalReport,
    LpipsStatus,
    PromptScore,
    format_eval,
)
from sd35trt.bench.reports import write_report
from sd35trt.errors import ConfigError
from sd35trt.user_files import read_text_file

DEFAULT_PROMPTS = Path("calibration_prompts/heldout.txt")
LPIPS_SKIPPED = "LPIPS skipped: weights not available offline"
#: torchvision's AlexNet weights, the backbone of LPIPS(net="alex") (lpips ships only its linear layers).
_ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"


def load_prompts(path: str | Path, limit: int | None = None) -> list[str]:
    """Prompts of a file (one per line, ``#`` comments and blank lines skipped), the first ``limit``;
    ConfigError when the file is missing, not UTF-8 text, or holds no prompt, or ``limit`` < 1."""
    path = Path(path)
    if limit is not None and limit < 1:
        raise ConfigError(f"--num-prompts must be >= 1, got {limit}")
    lines = read_text_file(path, "prompts file").splitlines()
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ConfigError(f"prompts file {path} holds no prompt (one per line; # starts a comment)")
    return prompts[:limit] if limit is not None else prompts


def lpips_status() -> LpipsStatus:
    """Whether LPIPS can run offline: the ``lpips`` package and the AlexNet weights in torch's hub cache."""
    if importlib.util.find_spec("lpips") is None:
        return LpipsStatus(available=False, reason=f"{LPIPS_SKIPPED} (the lpips package is not installed)")
    import torch

    weights = Path(torch.hub.get_dir()) / "checkpoints" / _ALEXNET_WEIGHTS
    if not weights.is_file():
        return LpipsStatus(available=False, reason=f"{LPIPS_SKIPPED} ({weights} is missing)")
    return LpipsStatus(available=True, reason=None)


class _Lpips:
    """LPIPS (AlexNet), loaded only from local files."""

    def __init__(self) -> None:
        import lpips

        self.model = lpips.LPIPS(net="alex", verbose=False).eval()

    def __call__(self, a, b) -> float:
        import torch

        def t(x):
            return torch.from_numpy(x).permute(2, 0, 1)[None].float() / 127.5 - 1.0  # [1, 3, H, W] in [-1, 1]

        with torch.inference_mode():
            return float(self.model(t(a), t(b)).item())


def as_uint8(image: Any):
    """A PIL image (both sides' output) or a uint8 ``[H, W, 3]`` array, as uint8 ``[H, W, 3]``."""
    import numpy as np

    if hasattr(image, "convert"):  # PIL
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    return np.asarray(image)


def compare(reference, image, lpips_fn=None) -> dict:
    """PSNR (``None`` = identical, infinite), SSIM and optional LPIPS of ``image`` against ``reference``."""
    from sd35trt.metrics import psnr, ssim

    a, b = as_uint8(reference), as_uint8(image)
    p = psnr(a, b)
    return {
        "psnr_db": None if math.isinf(p) else p,
        "ssim": ssim(a, b),
        "lpips": lpips_fn(a, b) if lpips_fn is not None else None,
    }


def evaluate(
    engines_dir: str | Path,
    reference_dir: str | Path,
    prompts_file: str | Path | None = None,
    out_dir: str | Path | None = None,
    *,
    num_prompts: int = 4,
    seed: int = 0,
    device: str | None = None,
    plot: bool = True,
    cache_thresholds: Sequence[float] | None = None,
) -> EvalReport:
    """Compare the engines' images with the diffusers pipeline's over held-out prompts (never used
    for calibration), both with the engines' runtime defaults. Writes ``eval.json``, ``eval.md``,
    ``eval_grid.png`` (reference, engine image, amplified difference) and the images.

    Args:
        reference_dir: the diffusers directory the engines were made from (non-quantized).
        prompts_file: held-out prompts (default ``calibration_prompts/heldout.txt``), the first
            ``num_prompts`` used; prompt ``i`` uses seed ``seed + i`` on both sides.
        out_dir: where to write; default ``<engines dir>/../eval``.
        device: ``cpu`` or ``cuda[:N]`` for the engines (default: the runtime's) and the FP32
            reference (default: CUDA when present).
        cache_thresholds: engines built with the first-block cache: the thresholds whose images
            are scored against the uncached ones (default
            :data:`~sd35trt.bench.cache_quality.DEFAULT_THRESHOLDS`, ``()`` skips the sweep).

    Returns the ``eval.json`` content.

    Raises:
        ConfigError: no prompts, or a bad count.
        ManifestError, VerificationError, IncompatibleEngineError: unusable engines.
        ModelError: unusable reference directory.
    """
    from sd35trt.artifacts.engine_manifest import read_engine_manifest
    from sd35trt.bench.subjects import engines_label
    from sd35trt.models.reference import check_reference_dir

    engines_dir, reference_dir = Path(engines_dir), Path(reference_dir)
    prompts_file = Path(prompts_file) if prompts_file is not None else DEFAULT_PROMPTS
    out = Path(out_dir) if out_dir is not None else engines_dir.parent / "eval"
    prompts = load_prompts(prompts_file, num_prompts)
    check_reference_dir(reference_dir)
    manifest = read_engine_manifest(engines_dir)
    rt = manifest.runtime_defaults
    status = lpips_status()
    seeds = [seed + i for i in range(len(prompts))]
    engines_device, engine_images, warnings, cache = _engine_images(
        engines_dir, prompts, seeds, device, cache_thresholds
    )
    reference_info, pipe_device, reference = _reference_images(reference_dir, rt, prompts, seeds, device)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = _scores(out, prompts, seeds, reference, engine_images, _Lpips() if status.available else None)
    report = EvalReport(
        created=now_utc(),
        device=EvalDevices(engines=engines_device, reference=pipe_device),
        engines=EvalEngines(
            dir=str(engines_dir), label=engines_label(manifest), backend=manifest.backend.value
        ),
        reference=reference_info,
        prompts_file=str(prompts_file),
        params=_eval_params(rt, seed),
        per_prompt=rows,
        aggregate=Aggregate.of(rows),
        lpips=status,
        warnings=warnings,
        cache=cache,
        files=EvalFiles(
            json=str(out / EVAL_JSON),
            table=str(out / EVAL_TABLE),
            grid=str(out / EVAL_GRID) if plot else None,
        ),
    )
    _write(report, out, plot)
    return report


def _write(report: EvalReport, out: Path, plot: bool) -> None:
    """``eval.json``, ``eval.md`` and, with ``plot``, the grid and the cache sweep's figure."""
    write_report(out / EVAL_JSON, report)
    (out / EVAL_TABLE).write_text(format_eval(report) + "\n")
    if plot:
        from sd35trt.bench.plots import plot_eval_grid

        plot_eval_grid(report, out, out / EVAL_GRID)
        if report.cache:
            from sd35trt.bench.cache_quality import EVAL_CACHE_PLOT, plot_cache_quality

            plot_cache_quality(report.cache, out / EVAL_CACHE_PLOT)


def _eval_params(rt: Any, seed: int) -> EvalParams:
    """The parameters both sides used: the engines' runtime defaults ``rt``, seeds from ``seed``."""
    from sd35trt.guidance import applied_skip_layer_guidance

    return EvalParams(
        **rt.model_dump(include=set(EvalParams.model_fields) - {"skip_layer_guidance", "seeds"}),
        skip_layer_guidance=applied_skip_layer_guidance(rt.skip_layer_guidance, rt.guidance_scale),
        seeds=f"{seed} + prompt index",
    )


def _engine_images(
    engines_dir: Path,
    prompts: list[str],
    seeds: list[int],
    device: str | None,
    cache_thresholds: Sequence[float] | None,
) -> tuple[str, list[Any], list[str], list[Any]]:
    """The engines' device, image per prompt, warnings, and first-block cache sweep (or ``[]``);
    ConfigError for ``cache_thresholds`` given for engines built without the cache."""
    from sd35trt.runtime.pipeline import Sd35Runtime
    from sd35trt.runtime.request import GenerationRequest

    images, warnings, cache = [], [], []
    with Sd35Runtime.load(engines_dir, device=device) as runtime:
        for i, (prompt, s) in enumerate(zip(prompts, seeds, strict=True)):
            result = runtime.generate(GenerationRequest(prompt=prompt, seed=s))
            images.append(result.images[0])
            warnings.extend(f"prompt {i}: {w}" for w in result.warnings)
        if runtime.info.limits.cache:
            from sd35trt.bench.cache_quality import DEFAULT_THRESHOLDS, cache_sweep

            sweep = DEFAULT_THRESHOLDS if cache_thresholds is None else cache_thresholds
            cache = cache_sweep(runtime, prompts, seeds, sweep) if sweep else []
        elif cache_thresholds:
            raise ConfigError(
                f"--cache-threshold needs engines built with runtime.cache; {engines_dir} has none"
            )
        return str(runtime.device), images, warnings, cache


def _reference_images(
    reference_dir: Path, rt: Any, prompts: list[str], seeds: list[int], device: str | None
) -> tuple[EvalReference, str, list[Any]]:
    """The diffusers pipeline's image per prompt, in FP32, with the engines' defaults ``rt``."""
    import torch

    from sd35trt.models.loading import default_device
    from sd35trt.models.reference import load_diffusers, pipeline_dtype, pipeline_label, reference_images

    # FP32 on any device: the error measured is the engines', not a BF16 reference's.
    pipe = load_diffusers(reference_dir, device or default_device(), torch.float32)
    images = [reference_images(pipe, rt, [p], seed=s)[0] for p, s in zip(prompts, seeds, strict=True)]
    info = EvalReference(dir=str(reference_dir), label=pipeline_label(pipe), dtype=pipeline_dtype(pipe))
    return info, str(pipe.device), images


def _scores(
    out: Path, prompts: list[str], seeds: list[int], reference: list[Any], engine: list[Any], lpips_fn: Any
) -> list[PromptScore]:
    """Per prompt: both images written under ``out/images`` and their scores."""
    from PIL import Image

    rows = []
    for i, (prompt, s, ref, eng) in enumerate(zip(prompts, seeds, reference, engine, strict=True)):
        ref_u8, eng_u8 = as_uint8(ref), as_uint8(eng)
        ref_name, eng_name = f"images/{i:02d}_reference.png", f"images/{i:02d}_engines.png"
        Image.fromarray(ref_u8).save(out / ref_name)
        Image.fromarray(eng_u8).save(out / eng_name)
        scores = compare(ref_u8, eng_u8, lpips_fn)
        rows.append(
            PromptScore(
                index=i, prompt=prompt, seed=s, **scores, reference_image=ref_name, engine_image=eng_name
            )
        )
    return rows
