"""``sd35trt bench``: stage latencies, throughput, peak memory and the runtime's per-step overhead.

Each configuration (an engines directory, or the diffusers PyTorch pipeline given with
``--reference``) runs ``warmup`` untimed generations, then ``runs`` timed ones with the engines'
runtime defaults (size, steps, guidance, skip-layer guidance). Stage times are taken around each
engine call (each diffusers module call for the reference): CUDA events on a GPU, ``perf_counter``
on the CPU. Per stage the median and 90th percentile over the timed runs are reported; a text
encoder's time per run is the sum of its calls (diffusers encodes the prompt and the negative
prompt in two calls, the runtime in one batch), the transformer's is per denoising step (its
time per run divided by the steps) and per call. The overhead measurement is described in
:mod:`sd35trt.bench.overhead`; the result's schema in :mod:`sd35trt.bench.report`.

Image-to-image: when the first engines directory has a VAE encoder, it is also benchmarked in
image-to-image mode (:func:`~sd35trt.bench.subjects.bench_image` at the default size,
``img2img_strength``), with the VAE encoder as one more stage; the report keeps it apart as
``img2img`` (its transformer time per step divides by the steps the strength keeps).
"""

from __future__ import annotations

import gc
import os
import platform
from collections.abc import Callable, Sequence
from pathlib import Path

from sd35trt.artifacts.manifest import now_utc
from sd35trt.bench.probes import MemoryProbe, StageClock
from sd35trt.bench.report import (
    BENCH_JSON,
    BENCH_PNG,
    BenchFiles,
    BenchParams,
    BenchReport,
    Configuration,
    Host,
)
from sd35trt.bench.reports import write_report
from sd35trt.bench.stats import stage_stats
from sd35trt.bench.subjects import DiffusersSubject, RuntimeSubject, Subject
from sd35trt.errors import ConfigError

DEFAULT_PROMPT = "a photo of a cat sitting on a windowsill at sunset"


def run_params(engines_dir: Path, prompt: str, num_images: int, seed: int) -> tuple[BenchParams, int]:
    """The runtime defaults recorded with ``engines_dir`` as :class:`BenchParams`, and T5's length."""
    from sd35trt.artifacts.engine_manifest import read_engine_manifest
    from sd35trt.config import RuntimeSettings
    from sd35trt.guidance import applied_skip_layer_guidance

    manifest = read_engine_manifest(engines_dir)
    rt = RuntimeSettings.model_validate(manifest.runtime_defaults)
    params = BenchParams(
        prompt=prompt,
        negative_prompt=rt.negative_prompt,
        num_inference_steps=rt.num_inference_steps,
        guidance_scale=rt.guidance_scale,
        height=rt.height,
        width=rt.width,
        num_images=num_images,
        seed=seed,
        skip_layer_guidance=applied_skip_layer_guidance(rt.skip_layer_guidance, rt.guidance_scale),
    )
    return params, rt.max_sequence_length


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _measure(
    subject: Subject, params: BenchParams, clock: StageClock, memory: MemoryProbe, runs: int, warmup: int
) -> Configuration:
    load_before = _load_average()
    for _ in range(warmup):
        subject.generate(params)
    clock.collect()
    memory.reset()
    timed = []
    for _ in range(runs):
        subject.generate(params)
        timed.append(clock.collect())
    mem = memory.read()
    stages = stage_stats(timed, params.steps_run)
    total = stages.total.median
    return Configuration(
        label=subject.label,
        kind=subject.kind,
        **subject.info,
        stages=stages,
        images_per_second=params.num_images / (total / 1e3) if total else None,
        memory=mem,
        load_average_1m=(load_before, _load_average()),
    )


def host_info(device: str) -> Host:
    import torch

    return Host(
        platform=platform.platform(),
        python=platform.python_version(),
        torch=torch.__version__,
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        device=device,
        timer="CUDA events" if device.startswith("cuda") else "time.perf_counter",
        gpu=torch.cuda.get_device_name(device) if device.startswith("cuda") else None,
        load_average_1m=_load_average(),
    )


def dedupe_labels(configurations: Sequence[Configuration]) -> list[Configuration]:
    """Unique labels: the run directory's name added where labels repeat, then a number if still needed."""

    def repeated(configs: Sequence[Configuration]) -> set[str]:
        labels = [c.label for c in configs]
        return {label for label in labels if labels.count(label) > 1}

    twice = repeated(configurations)
    out = [
        c.model_copy(update={"label": f"{c.label} ({Path(c.engines_dir).parent.name})"})
        if c.label in twice and c.engines_dir
        else c
        for c in configurations
    ]
    twice = repeated(out)
    number: dict[str, int] = {}
    for i, c in enumerate(out):
        if c.label in twice:
            number[c.label] = number.get(c.label, 0) + 1
            out[i] = c.model_copy(update={"label": f"{c.label} #{number[c.label]}"})
    return out


def _measure_img2img(
    engines_dir: Path, params: BenchParams, strength: float | None, runs: int, warmup: int, device: str | None
) -> Configuration | None:
    """The engines in image-to-image mode, or ``None`` (no VAE encoder, or not asked for).

    Raises:
        ConfigError: ``strength`` outside (0, 1].
    """
    from sd35trt.artifacts.engine_manifest import read_engine_manifest
    from sd35trt.components import Component

    if not strength or Component.VAE_ENCODER not in read_engine_manifest(engines_dir).engines:
        return None
    if not 0.0 < strength <= 1.0:
        raise ConfigError(f"--img2img-strength {strength:g} is outside (0, 1]")
    # diffusers' image-to-image pipeline has no skip-layer guidance, so neither has the runtime's.
    i2i = params.model_copy(update={"strength": strength, "skip_layer_guidance": None})
    clock, memory = StageClock(), MemoryProbe()
    subject = RuntimeSubject.from_engines(engines_dir, clock, memory, device)
    try:
        measured = _measure(subject, i2i, clock, memory, runs, warmup)
    finally:
        subject.close()
        gc.collect()
    update = {"label": f"{measured.label} img2img", "strength": strength, "steps_run": i2i.steps_run}
    return measured.model_copy(update=update)


def _measure_cache(
    engines_dir: Path,
    params: BenchParams,
    thresholds: Sequence[float],
    runs: int,
    warmup: int,
    device: str | None,
) -> list[Configuration]:
    """The engines at first-block cache threshold 0 (no step skipped) and each of ``thresholds``.

    Empty when the engines were built without the cache (no ``transformer_first_block`` engine).
    The transformer's time is both parts' engine calls together; ``transformer_calls`` and
    ``transformer_skipped`` are the last timed generation's.
    """
    from sd35trt.artifacts.engine_manifest import read_engine_manifest
    from sd35trt.components import TRANSFORMER_PARTS
    from sd35trt.config import RuntimeSettings

    manifest = read_engine_manifest(engines_dir)
    if not all(c in manifest.engines for c in TRANSFORMER_PARTS):
        return []
    if not thresholds:
        cache = RuntimeSettings.model_validate(manifest.runtime_defaults).cache
        thresholds = [cache.threshold] if cache is not None else []
    out = []
    for threshold in [0.0, *thresholds]:
        clock, memory = StageClock(), MemoryProbe()
        subject = RuntimeSubject.from_engines(engines_dir, clock, memory, device)
        try:
            measured = _measure(
                subject, params.model_copy(update={"cache_threshold": threshold}), clock, memory, runs, warmup
            )
            t = subject.last.timings
        finally:
            subject.close()
            gc.collect()
        update = {
            "label": f"{measured.label} cache {threshold:g}",
            "cache_threshold": threshold,
            "transformer_calls": t.transformer_calls,
            "transformer_skipped": t.transformer_skipped,
        }
        out.append(measured.model_copy(update=update))
    return out


def bench(
    engines_dirs: Sequence[str | Path],
    reference_dir: str | Path | None,
    runs: int = 3,
    warmup: int = 1,
    out_dir: str | Path | None = None,
    *,
    overhead_runs: int = 5,
    prompt: str = DEFAULT_PROMPT,
    num_images: int = 1,
    seed: int = 0,
    device: str | None = None,
    plot: bool = True,
    img2img_strength: float | None = 0.6,
    cache_thresholds: Sequence[float] = (),
) -> BenchReport:
    """Benchmark engines directories (and the diffusers pipeline) and measure the runtime overhead.

    Every configuration generates with the first engines directory's runtime defaults. Writes
    ``bench.json`` and ``bench.png`` (stages side by side, images/s, peak memory, overhead) to
    ``out_dir``.

    Args:
        engines_dirs: one or more ``engines/`` directories (e.g. FP8 and BF16 builds).
        reference_dir: a diffusers directory: benchmarked as the PyTorch baseline and used for the
            overhead comparison; ``None`` skips both.
        runs: timed generations per configuration.
        warmup: untimed generations before them.
        out_dir: where to write; default ``<first engines dir>/../bench``.
        overhead_runs: timed generations per side of the overhead measurement (0 skips it).
        prompt: the prompt of every generation.
        num_images: images per generation.
        seed: noise seed.
        device: ``cpu`` or ``cuda[:N]`` for the engines (default: the runtime's, CUDA for TensorRT
            engines, CPU for ONNX Runtime ones); the diffusers pipeline runs there too (default:
            CUDA when present).
        plot: also write ``bench.png``.
        img2img_strength: also benchmark image-to-image at this strength when the first engines
            directory has a VAE encoder (``None`` or 0: skip).
        cache_thresholds: when the first engines directory was built with the first-block cache,
            benchmark it at threshold 0 and at each of these (default: its recorded threshold).

    Returns:
        The ``bench.json`` content.

    Raises:
        ConfigError: no engines directory, or runs < 1 / warmup < 0.
        ManifestError, VerificationError, IncompatibleEngineError: an engines directory is unusable.
        ModelError: the reference directory is unusable.
    """
    from sd35trt.models.loading import default_device
    from sd35trt.models.reference import check_reference_dir

    if not engines_dirs:
        raise ConfigError("bench needs at least one --engines directory")
    if runs < 1 or warmup < 0 or overhead_runs < 0:
        raise ConfigError(f"bench needs --runs >= 1, --warmup >= 0 (got runs {runs}, warmup {warmup})")
    if num_images < 1:
        raise ConfigError(f"num_images must be >= 1, got {num_images}")
    engines_dirs = [Path(d) for d in engines_dirs]
    reference_dir = check_reference_dir(reference_dir) if reference_dir is not None else None
    out = Path(out_dir) if out_dir is not None else engines_dirs[0].parent / "bench"
    params, max_len = run_params(engines_dirs[0], prompt, num_images, seed)

    configurations = []
    subjects: list[Callable[[StageClock, MemoryProbe], Subject]] = [
        (lambda c, m, d=d: RuntimeSubject.from_engines(d, c, m, device)) for d in engines_dirs
    ]
    if reference_dir is not None:
        ref_device = device or default_device()
        subjects.append(lambda c, m: DiffusersSubject(reference_dir, c, m, ref_device, max_len))
    for make in subjects:
        clock, memory = StageClock(), MemoryProbe()
        subject = make(clock, memory)
        try:
            configurations.append(_measure(subject, params, clock, memory, runs, warmup))
        finally:
            subject.close()
            del subject
            gc.collect()

    img2img = _measure_img2img(engines_dirs[0], params, img2img_strength, runs, warmup, device)
    cache = _measure_cache(engines_dirs[0], params, cache_thresholds, runs, warmup, device)

    overhead = None
    # the overhead stand-in replaces the whole transformer engine; cache-only engines have none
    if overhead_runs and not cache:
        from sd35trt.bench.overhead import measure_overhead
        from sd35trt.models.reference import load_diffusers
        from sd35trt.runtime.pipeline import Sd35Runtime

        runtime = Sd35Runtime.load(engines_dirs[0], device=device)
        pipe = load_diffusers(reference_dir, str(runtime.device)) if reference_dir is not None else None
        try:
            overhead = measure_overhead(runtime, pipe, params, max_len, overhead_runs)
            ours = overhead.sd35trt.model_copy(update={"engines_dir": str(engines_dirs[0])})
            theirs = overhead.diffusers
            if theirs is not None:
                theirs = theirs.model_copy(update={"model_dir": str(reference_dir)})
            overhead = overhead.model_copy(update={"sd35trt": ours, "diffusers": theirs})
        finally:
            runtime.close()
            del pipe
            gc.collect()

    report = BenchReport(
        created=now_utc(),
        host=host_info(configurations[0].device),
        runs=runs,
        warmup=warmup,
        params=params,
        configurations=dedupe_labels(configurations),
        img2img=img2img,
        cache=cache,
        overhead=overhead,
        files=BenchFiles(json=str(out / BENCH_JSON), png=str(out / BENCH_PNG) if plot else None),
    )
    out.mkdir(parents=True, exist_ok=True)
    write_report(out / BENCH_JSON, report)
    if plot:
        from sd35trt.bench.plots import plot_bench

        plot_bench(report, out / BENCH_PNG)
    return report
