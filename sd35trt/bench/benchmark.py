"""``sd35trt bench``: stage latencies, throughput, peak memory and the runtime's per-step overhead.

Stage times are taken around each engine call (each diffusers module call for the reference):
CUDA events on a GPU, ``perf_counter`` on the CPU. A text encoder's time per run is the sum of its
calls (diffusers encodes the prompt and the negative prompt in two calls, the runtime in one
batch); the transformer's is per denoising step and per call. Schema: :mod:`sd35trt.bench.report`.
"""

from __future__ import annotations

import gc
import os
import platform
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    Overhead,
)
from sd35trt.bench.reports import write_report
from sd35trt.bench.stats import stage_stats
from sd35trt.bench.subjects import DiffusersSubject, RuntimeSubject, Subject
from sd35trt.errors import ConfigError

DEFAULT_PROMPT = "a photo of a cat sitting on a windowsill at sunset"


@dataclass(frozen=True)
class BenchOptions:
    """How ``sd35trt bench`` measures (the ``bench`` command's options).

    Attributes:
        runs: timed generations per configuration (>= 1), after ``warmup`` untimed ones (>= 0).
        overhead_runs: timed generations per side of the overhead measurement (0 skips it).
        out_dir: where to write; default ``<first engines dir>/../bench``.
        device: ``cpu`` or ``cuda[:N]`` for the engines (default: the runtime's) and the diffusers
            pipeline (default: CUDA when present).
        plot: also write ``bench.png``.
        img2img_strength: image-to-image strength when the first engines directory has a VAE
            encoder (``None`` or 0: skip).
        generation: generation parameters by name or alias replacing the engines' recorded
            defaults; the prompt defaults to :data:`DEFAULT_PROMPT`, the seed to 0.

    Raises:
        ConfigError: runs < 1, warmup < 0 or overhead_runs < 0.
    """

    runs: int = 3
    warmup: int = 1
    overhead_runs: int = 5
    out_dir: str | Path | None = None
    device: str | None = None
    plot: bool = True
    img2img_strength: float | None = 0.6
    generation: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.runs < 1 or self.warmup < 0 or self.overhead_runs < 0:
            raise ConfigError(
                f"bench needs --runs >= 1, --warmup >= 0, --overhead-runs >= 0 (got runs {self.runs}, "
                f"warmup {self.warmup}, overhead runs {self.overhead_runs})"
            )


def run_params(engines_dir: Path, generation: Mapping[str, Any] | None = None) -> tuple[BenchParams, int]:
    """What every configuration generates (the engines' recorded defaults, replaced by
    ``generation``, checked as a request is), and T5's length.

    Raises:
        RequestError: a generation parameter the engines do not accept (named).
    """
    from sd35trt.artifacts.engine_manifest import read_engine_manifest
    from sd35trt.parameters import canonical_fields
    from sd35trt.runtime.request import GenerationRequest, RequestLimits, resolve_request

    manifest = read_engine_manifest(engines_dir)
    fields = {"prompt": DEFAULT_PROMPT, "seed": 0, **canonical_fields(generation or {}, wire=False)}
    used = resolve_request(
        GenerationRequest(**fields), RequestLimits.from_manifest(manifest), manifest.runtime_defaults
    )
    params = BenchParams(**{name: getattr(used, name) for name in BenchParams.model_fields})
    return params, manifest.runtime_defaults.max_sequence_length


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


#: Makes one benchmarked configuration, timing on the clock and sampling memory with the probe given.
MakeSubject = Callable[[StageClock, MemoryProbe], Subject]


def _measure(make: MakeSubject, params: BenchParams, o: BenchOptions) -> tuple[Configuration, Any]:
    """Load a subject, time ``o.runs`` generations after ``o.warmup``, and free it (closed and
    collected, so the next subject's peak memory is its own). Returns the configuration and the last
    generation's result (``RuntimeSubject.last``; ``None`` for the diffusers pipeline)."""
    clock, memory = StageClock(), MemoryProbe()
    subject = make(clock, memory)
    try:
        load_before = _load_average()
        for _ in range(o.warmup):
            subject.generate(params)
        clock.collect()
        memory.reset()
        timed = []
        for _ in range(o.runs):
            subject.generate(params)
            timed.append(clock.collect())
        stages = stage_stats(timed, params.steps_run)
        total = stages.total.median
        measured = Configuration(
            label=subject.label,
            kind=subject.kind,
            **subject.info,
            stages=stages,
            images_per_second=params.num_images / (total / 1e3) if total else None,
            memory=memory.read(),
            load_average_1m=(load_before, _load_average()),
        )
        last = getattr(subject, "last", None)
    finally:
        subject.close()
        del subject
        gc.collect()
    return measured, last


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


def _measure_img2img(engines_dir: Path, params: BenchParams, o: BenchOptions) -> Configuration | None:
    """The engines in image-to-image mode, or ``None`` (no VAE encoder, or not asked for);
    ConfigError for a strength outside (0, 1]."""
    from sd35trt.artifacts.engine_manifest import read_engine_manifest
    from sd35trt.components import Component

    strength = o.img2img_strength
    if not strength or Component.VAE_ENCODER not in read_engine_manifest(engines_dir).engines:
        return None
    if not 0.0 < strength <= 1.0:
        raise ConfigError(f"--img2img-strength {strength:g} is outside (0, 1]")
    # diffusers' image-to-image pipeline has no skip-layer guidance, so neither has the runtime's.
    i2i = params.model_copy(update={"strength": strength, "skip_layer_guidance": None})
    measured, _ = _measure(_engines_subject(engines_dir, o.device), i2i, o)
    update = {"label": f"{measured.label} img2img", "strength": strength, "steps_run": i2i.steps_run}
    return measured.model_copy(update=update)


def _measure_cache(engines_dir: Path, params: BenchParams, o: BenchOptions) -> list[Configuration]:
    """The engines at first-block cache threshold 0 (no step skipped) and at ``params``' threshold;
    empty when built without the cache. The transformer's time is both parts' calls together;
    ``transformer_calls`` and ``transformer_skipped`` are the last timed generation's."""
    from sd35trt.artifacts.engine_manifest import read_engine_manifest
    from sd35trt.components import TRANSFORMER_PARTS

    manifest = read_engine_manifest(engines_dir)
    if not all(c in manifest.engines for c in TRANSFORMER_PARTS) or params.cache_threshold is None:
        return []
    out = []
    for threshold in dict.fromkeys([0.0, params.cache_threshold]):
        at = params.model_copy(update={"cache_threshold": threshold})
        measured, last = _measure(_engines_subject(engines_dir, o.device), at, o)
        t = last.timings
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
    options: BenchOptions | None = None,
) -> BenchReport:
    """Benchmark engines directories (and the diffusers pipeline) and measure the runtime overhead.

    Every configuration runs ``warmup`` untimed then ``runs`` timed generations with the first
    engines directory's runtime defaults (replaced by ``options.generation``). With a VAE encoder
    the first directory is also timed in image-to-image mode (``report.img2img``); engines built
    with the first-block cache at cache threshold 0 and at the generation's ``cache_threshold``
    (``report.cache``; no overhead measurement then: its stand-in replaces the whole transformer
    engine). Writes ``bench.json`` and ``bench.png`` to ``options.out_dir``.

    Args:
        engines_dirs: one or more ``engines/`` directories (e.g. FP8 and BF16 builds).
        reference_dir: a diffusers directory: benchmarked as the PyTorch baseline and used for the
            overhead comparison; ``None`` skips both.

    Returns the ``bench.json`` content.

    Raises:
        ConfigError: no engines directory, or bad counts (:class:`BenchOptions`).
        RequestError: a generation parameter the engines do not accept.
        ManifestError, VerificationError, IncompatibleEngineError: an engines directory is unusable.
        ModelError: the reference directory is unusable.
    """
    from sd35trt.models.loading import default_device
    from sd35trt.models.reference import check_reference_dir

    o = options or BenchOptions()
    if not engines_dirs:
        raise ConfigError("bench needs at least one --engines directory")
    engines_dirs = [Path(d) for d in engines_dirs]
    reference_dir = check_reference_dir(reference_dir) if reference_dir is not None else None
    out = Path(o.out_dir) if o.out_dir is not None else engines_dirs[0].parent / "bench"
    params, max_len = run_params(engines_dirs[0], o.generation)

    subjects = [_engines_subject(d, o.device) for d in engines_dirs]
    if reference_dir is not None:
        ref_device = o.device or default_device()
        subjects.append(lambda c, m: DiffusersSubject(reference_dir, c, m, ref_device, max_len))
    configurations = [_measure(make, params, o)[0] for make in subjects]
    img2img = _measure_img2img(engines_dirs[0], params, o)
    cache = _measure_cache(engines_dirs[0], params, o)
    # the overhead stand-in replaces the whole transformer engine; cache-only engines have none
    overhead = (
        _overhead(engines_dirs[0], reference_dir, params, max_len, o)
        if o.overhead_runs and not cache
        else None
    )
    report = BenchReport(
        created=now_utc(),
        host=host_info(configurations[0].device),
        runs=o.runs,
        warmup=o.warmup,
        params=params,
        configurations=dedupe_labels(configurations),
        img2img=img2img,
        cache=cache,
        overhead=overhead,
        files=BenchFiles(json=str(out / BENCH_JSON), png=str(out / BENCH_PNG) if o.plot else None),
    )
    out.mkdir(parents=True, exist_ok=True)
    write_report(out / BENCH_JSON, report)
    if o.plot:
        from sd35trt.bench.plots import plot_bench

        plot_bench(report, out / BENCH_PNG)
    return report


def _engines_subject(engines_dir: Path, device: str | None) -> MakeSubject:
    """Makes the runtime of ``engines_dir`` on ``device`` as a subject."""
    return lambda clock, memory: RuntimeSubject.from_engines(engines_dir, clock, memory, device)


def _overhead(
    engines_dir: Path, reference_dir: Path | None, params: BenchParams, max_len: int, o: BenchOptions
) -> Overhead:
    """The runtime's per-step host overhead, and diffusers' when a reference is given."""
    from sd35trt.bench.overhead import measure_overhead
    from sd35trt.models.reference import load_diffusers
    from sd35trt.runtime.pipeline import Sd35Runtime

    runtime = Sd35Runtime.load(engines_dir, device=o.device)
    pipe = load_diffusers(reference_dir, str(runtime.device)) if reference_dir is not None else None
    try:
        overhead = measure_overhead(runtime, pipe, params, max_len, o.overhead_runs)
    finally:
        runtime.close()
        del pipe
        gc.collect()
    ours = overhead.sd35trt.model_copy(update={"engines_dir": str(engines_dir)})
    theirs = overhead.diffusers
    if theirs is not None:
        theirs = theirs.model_copy(update={"model_dir": str(reference_dir)})
    return overhead.model_copy(update={"sd35trt": ours, "diffusers": theirs})
