"""``sd35trt calibrate``: FP8 post-training quantization of the MMDiT over the real SD3.5 loop.

The pipeline (LoRAs fused first, so the FP8 scales fit the engines' weights) encodes every prompt
batch once and drops its text encoders; ModelOpt then calibrates the transformer over diffusers'
own denoising loop (CFG, the configured steps, one seed per batch), so the activation ranges are
those the engine will see. The FP8 model is measured against the unquantized one on held-out
prompts (:mod:`sd35trt.stages.calibration_quality`).

Memory, sd3.5-large in BF16 on one GPU (parameter counts of the published checkpoints):
transformer 8.1 B parameters = 16.3 GB, T5-XXL encoder 4.8 B = 9.5 GB, CLIP-G 0.7 B = 1.4 GB,
CLIP-L 0.12 B = 0.25 GB, VAE 0.08 B = 0.17 GB, so about 28 GB while prompts are encoded and
16.5 GB once the encoders are dropped. A 1024x1024 CFG step (transformer batch 2, 4096 image +
333 text tokens, width 2432) keeps a few hundred MB of activations alive under ``no_grad`` with
SDPA's memory-efficient attention; ModelOpt's max calibration adds one scalar per quantizer and
one fake-quantized weight copy at a time (at most 47 MB). The held-out report decodes 1024x1024
images with the VAE (a few GB). The whole stage therefore stays well under 40 GB on an 80 GB GPU.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sd35trt.artifacts.files import atomic_write_json
from sd35trt.artifacts.manifest import Stage
from sd35trt.artifacts.records import (
    CalibrateDetails,
    CalibrateRecord,
    CalibrationQuality,
    QuantizerCounts,
    StageRecord,
)
from sd35trt.components import Component, ModelDims
from sd35trt.config import CalibrateSettings, Config
from sd35trt.errors import ConfigError
from sd35trt.models.loading import (
    ResolvedModel,
    attach_transformer,
    default_device,
    load_pipeline,
    resolve_model,
    torch_dtype,
)
from sd35trt.models.quantize import CALIBRATION_FILE, quant_config, quantizer_table
from sd35trt.models.reference import PromptBatch, denoise_batch, drop_text_encoders, encode_batches
from sd35trt.stages.check import check_config
from sd35trt.stages.driver import StageRun, StageSpec, run_stage
from sd35trt.user_files import read_text_file

SUMMARY_FILE = "summary.json"
REPORT_FILE = "calibration_report.json"
QUANT_CONFIG_FILE = "quant_config.json"


def read_prompts(path: Path, count: int, field: str) -> list[str]:
    """The first ``count`` prompts of ``path`` (one per line; blanks and ``#`` comments skipped).

    Args:
        path: a prompt file.
        count: how many prompts are needed.
        field: the config key that named the file, for error messages.

    Returns:
        ``count`` prompts, in file order.

    Raises:
        ConfigError: the file is missing, not a UTF-8 text file, or has fewer than ``count`` prompts.
    """
    text = read_text_file(path, f"calibrate.{field}: prompt file")
    prompts = [s for line in text.splitlines() if (s := line.strip()) and not s.startswith("#")]
    if len(prompts) < count:
        raise ConfigError(
            f"calibrate.{field}: {path} has {len(prompts)} prompts, {count} are needed; "
            "add prompts or lower the count"
        )
    return prompts[:count]


def prompt_set_sha256(prompts: Sequence[str]) -> str:
    """sha256 of the prompts, one per line: names the calibration set in the manifest."""
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()


def report_truncations(
    pipe, prompts: Sequence[str], what: str, log: Callable[[str], None], max_sequence_length: int
) -> None:
    """Log, once per prompt and encoder, prompts cut by the pipeline's tokenizers (with an excerpt);
    ``max_sequence_length`` is T5's token limit. diffusers' own warning repeats on every encode."""
    from sd35trt.runtime.tokenize import PromptTokenizer

    tokenizers = {
        Component.CLIP_L: pipe.tokenizer,
        Component.CLIP_G: pipe.tokenizer_2,
        Component.T5: pipe.tokenizer_3,
    }
    for t in PromptTokenizer(tokenizers, max_sequence_length)(prompts).truncations:
        log(
            f"{what} prompt {t.index + 1} is {t.tokens} {t.encoder.value} tokens, over its limit of "
            f"{t.limit}: dropped {t.excerpt}"
        )


def _forward_loop(
    pipe,
    batches: Sequence[PromptBatch],
    s: CalibrateSettings,
    status: Callable[[str], None],
    controlled: Sequence[tuple[Any, list]] = (),
) -> Callable[[Any], None]:
    def loop(_transformer) -> None:
        for i, batch in enumerate(batches, 1):
            status(f"calibrating: batch {i}/{len(batches)}")
            denoise_batch(pipe, batch, s.steps, s.guidance_scale, s.height, s.width, output_type="latent")
            for cn_pipe, images in controlled:  # the same batch with each ControlNet's residuals
                args = (cn_pipe, batch, s.steps, s.guidance_scale, s.height, s.width)
                denoise_batch(*args, output_type="latent", control_image=images[i - 1])

    return loop


def control_images(
    pipe, batches: Sequence[PromptBatch], s: CalibrateSettings, control_types: Sequence
) -> dict:
    """Control images for FP8 calibration with ControlNets: each batch's own generated images
    (unquantized transformer, same seed, generated once), made into each of ``control_types``'
    control images as the runtime makes them (:func:`sd35trt.runtime.control.preprocess`); for
    ``depth`` the images' luminance stands in for a depth map (no depth model is run).

    Returns:
        Per control type, per batch, a list of RGB PIL images (one per prompt of the batch).
    """
    from sd35trt.config import ControlType
    from sd35trt.runtime.control import preprocess

    generated = [
        denoise_batch(pipe, batch, s.steps, s.guidance_scale, s.height, s.width, output_type="pil")
        for batch in batches
    ]

    def made(im, control_type):
        return (
            im.convert("L").convert("RGB")
            if control_type is ControlType.DEPTH
            else preprocess(im, control_type)
        )

    return {t: [[made(im, t) for im in images] for images in generated] for t in control_types}


def calibrate_transformer(
    pipe,
    batches: Sequence[PromptBatch],
    settings: CalibrateSettings,
    status: Callable[[str], None] = lambda _item: None,
    controlled: Sequence[tuple[Any, list]] = (),
) -> QuantizerCounts:
    """Quantize ``pipe.transformer`` to FP8 in place, calibrated over diffusers' loop on ``batches``.

    The pipeline needs only its transformer and scheduler (the batches carry their embeddings).

    Args:
        pipe: a ``StableDiffusion3Pipeline`` on the calibration device.
        batches: encoded prompt batches, each run for ``settings.steps`` steps at
            ``settings.height`` x ``settings.width`` with ``settings.guidance_scale``.
        settings: the ``calibrate`` config section.
        status: receives the batch being calibrated (``calibrating: batch 2/4``).
        controlled: per ControlNet, ``(StableDiffusion3ControlNetPipeline sharing pipe's
            transformer, control images per batch)``: every batch runs once more with each
            ControlNet, so the FP8 scales fit the transformer's activations with each one's
            residuals added: ``1 + len(controlled)`` denoising loops per batch.

    Returns:
        The quantizer counts of the calibrated transformer (:func:`~sd35trt.models.quantize.summarize`).

    Raises:
        ConfigError: bad exclusions, blocks or FP8-attention head dim.
        CalibrationError: a quantizer ended with an amax of 0, inf or NaN, or saw no data.
    """
    from sd35trt.models.quantize import quantize

    return quantize(pipe.transformer, settings, _forward_loop(pipe, batches, settings, status, controlled))


def _text_settings(config: Config) -> dict[str, Any]:
    """The runtime's text settings that calibration encodes with and records."""
    return {
        "negative_prompt": config.runtime.negative_prompt,
        "max_sequence_length": config.runtime.max_sequence_length,
    }


class _Calibrate(StageSpec):
    """The calibrate stage (:func:`calibrate`): no upstream; reusable for the same prompt set."""

    stage, details = Stage.CALIBRATE, CalibrateDetails
    prompts: list[str]
    heldout: list[str]
    resolved: ResolvedModel
    dims: ModelDims

    def __init__(self, device: str | None, status: Callable[[str], None]) -> None:
        self.device, self.status = device, status

    def prepare(self, run: StageRun) -> dict:
        """Read the prompt sets, resolve the model and refuse settings it can't take."""
        s = run.config.calibrate
        self.prompts = read_prompts(s.prompts, s.num_prompts, "prompts")
        self.heldout = read_prompts(s.heldout_prompts, s.report_prompts, "heldout_prompts")
        if shared := set(self.prompts) & set(self.heldout):
            raise ConfigError(
                f"calibrate.heldout_prompts shares {len(shared)} prompts with calibrate.prompts "
                f"(e.g. {sorted(shared)[0]!r}); held-out prompts must not be calibrated on"
            )
        self.resolved = resolve_model(run.config, run.run_dir)
        self.dims = ModelDims.from_model_dir(self.resolved.directory)
        check_config(run.config, self.dims, Stage.CALIBRATE, self.resolved.directory)  # here or later
        return self.resolved.identity()

    def reusable(self, run: StageRun, record: StageRecord) -> bool:
        return record.details.prompt_set_sha256 == prompt_set_sha256(self.prompts)

    def _controlled(self, config: Config, pipe, batches, dtype, device: str) -> list:
        """Per ``model.controlnet`` ControlNet: a ControlNet pipeline over ``pipe``'s modules and
        each batch's control images (made from the batch's own images), so calibration sees each
        one's conditioned activations too; empty without one."""
        nets = self.resolved.controlnets
        if not nets:
            return []
        from diffusers import StableDiffusion3ControlNetPipeline

        from sd35trt.models.loading import load_controlnet

        images = control_images(pipe, batches, config.calibrate, [net.control_type for net in nets])
        out = []
        for net in nets:
            controlnet = load_controlnet(net, config.model, self.resolved.directory, dtype, device=device)
            cn_pipe = StableDiffusion3ControlNetPipeline(**pipe.components, controlnet=controlnet)
            cn_pipe.set_progress_bar_config(disable=True)
            out.append((cn_pipe, images[net.control_type]))
        return out

    def _encoded(self, run: StageRun, device: str, dtype) -> tuple[Any, list[PromptBatch], list[PromptBatch]]:
        """The pipeline with the calibration and held-out prompts encoded, its text encoders then
        dropped and its transformer loaded: the two never share memory (text encoders ~11 GB in
        BF16, the sd3.5-large transformer 16.3 GB)."""
        from sd35trt.models.loading import trim_heap

        config, s, log = run.config, run.config.calibrate, run.progress
        pipe = load_pipeline(
            config, run.run_dir, device=device, dtype=dtype, loras=self.resolved.loras, transformer=False
        )
        pipe.set_progress_bar_config(disable=True)
        text = _text_settings(config)
        report_truncations(pipe, self.prompts, "calibration", log, text["max_sequence_length"])
        report_truncations(pipe, self.heldout, "held-out", log, text["max_sequence_length"])
        batches, report_batches = (
            encode_batches(pipe, p, s.batch_size, s.seed, s.guidance_scale, device, **text)
            for p in (self.prompts, self.heldout)
        )
        drop_text_encoders(pipe)
        trim_heap()
        attach_transformer(
            pipe, self.resolved.directory, device, dtype, model=config.model, loras=self.resolved.loras
        )
        return pipe, batches, report_batches

    def produce(self, run: StageRun, out: Path) -> CalibrateDetails:
        """Load, encode, quantize, measure, and write ``calibrate/`` into ``out``."""
        import torch

        from sd35trt.models.quantize import save_calibration
        from sd35trt.stages.calibration_quality import METRIC, quality_report

        config, s, log = run.config, run.config.calibrate, run.progress
        cfg = quant_config(s, self.dims.num_layers, self.dims.head_dim)
        start = time.perf_counter()
        device = self.device or default_device()
        dtype = torch_dtype(s.dtype, device)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        pipe, batches, report_batches = self._encoded(run, device, dtype)
        text = _text_settings(config)

        controlled = self._controlled(config, pipe, batches, dtype, device)
        summary = calibrate_transformer(pipe, batches, s, self.status, controlled)
        report = quality_report(
            pipe, report_batches, s.report_steps or s.steps, s.guidance_scale, s.height, s.width
        )
        elapsed = time.perf_counter() - start
        from sd35trt.runtime.steps import peak_memory

        peak, peak_kind = peak_memory(device)
        # The details are validated before the staged directory is published.
        details = CalibrateDetails(
            calibration_file=f"{Stage.CALIBRATE.directory}/{CALIBRATION_FILE}",
            prompts_file=run.relative(s.prompts).as_posix(),
            prompt_set_sha256=prompt_set_sha256(self.prompts),
            num_prompts=len(self.prompts),
            heldout_prompt_set_sha256=prompt_set_sha256(self.heldout),
            seeds=tuple(b.seed for b in batches),
            report_seeds=tuple(b.seed for b in report_batches),
            steps=s.steps,
            report_steps=report.steps,
            guidance_scale=s.guidance_scale,
            **text,
            batch_size=s.batch_size,
            height=s.height,
            width=s.width,
            device=device,
            dtype=str(dtype).removeprefix("torch."),
            summary=summary,
            report=CalibrationQuality(
                steps=report.steps,
                metric=METRIC,
                overall_mean_error=report.overall_mean_error,
                mean_psnr_db=report.mean_psnr_db,
                mean_ssim=report.mean_ssim,
            ),
            elapsed_s=round(elapsed, 3),
            peak_memory_bytes=peak,
            peak_memory_kind=peak_kind,
            model=run.model_input(self.resolved),
        )
        save_calibration(pipe.transformer, out / CALIBRATION_FILE)
        atomic_write_json(out / SUMMARY_FILE, summary.to_json())
        atomic_write_json(out / REPORT_FILE, report.to_json())
        atomic_write_json(out / QUANT_CONFIG_FILE, cfg)
        log(quantizer_table(summary))
        log(report.table())
        log(
            f"calibrate: {len(self.prompts)} prompts x {s.steps} steps in {elapsed:.1f} s, "
            f"peak memory {peak / 2**30:.2f} GiB ({peak_kind})"
        )
        return details


def calibrate(
    config: Config,
    run_dir: Path,
    force: bool = False,
    *,
    device: str | None = None,
    log: Callable[[str], None] = print,
    status: Callable[[str], None] = lambda _item: None,
) -> CalibrateRecord:
    """Calibrate the FP8 transformer of ``config``'s model and record it in ``run_dir``.

    Runs through :func:`~sd35trt.stages.driver.run_stage` (lock, freshness, staging, record).

    Args:
        config: the whole config (``model`` and ``calibrate`` sections are used).
        run_dir: the run directory; ``calibrate/`` and the manifest record are written there.
        force: recalibrate even when the existing output is intact and up to date.
        device: torch device (default: CUDA when present, else CPU).
        log: where the summary, the report table, time and peak memory are printed.
        status: receives what the stage is doing now (e.g. ``calibrating: batch 2/4``).

    Returns:
        The manifest record of the calibrate stage.

    Raises:
        RunDirError: ``run_dir`` is not a run directory, or cannot be written.
        ConfigError: prompt files too short, overlapping, or settings that don't fit the model.
        ModelError: the model directory is unusable (pickle weights, truncated shards...), a repo
            id is not cached, or a LoRA does not fit the model.
        CalibrationError: a quantizer ended without a finite amax > 0 (nothing is written).
    """
    return run_stage(_Calibrate(device, status), config, run_dir, force=force, progress=log)
