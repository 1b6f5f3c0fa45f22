"""The ``sd35trt`` command line: one command per verb, each body loads, calls one function, prints.

Heavy libraries (torch, diffusers, modelopt, tensorrt) are imported inside the commands that use
them, so ``sd35trt --help`` and config checks start fast and need no GPU stack.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sd35trt.cli_options import generation_options, settings_options
from sd35trt.errors import Sd35TrtError
from sd35trt.parameters import PARAMS

if TYPE_CHECKING:
    from sd35trt.serve.settings import ServeSettings

#: What ``reference`` and ``bench`` take of the generation parameters (``run`` takes them all).
REFERENCE_PARAMS = (
    "prompt",
    "negative_prompt",
    "num_inference_steps",
    "guidance_scale",
    "height",
    "width",
    "seed",
)
BENCH_PARAMS = ("prompt", *REFERENCE_PARAMS[1:], "num_images", "skip_layer_guidance", "cache_threshold")

app = typer.Typer(
    help="Stable Diffusion 3.5 to FP8 TensorRT engines: calibrate, export, build, run.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help: rich's panels cut option names at 80 columns and print <bool> on flags.
    rich_markup_mode=None,
)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="YAML config (see configs/).")]
RunDirOpt = Annotated[
    Path | None, typer.Option("--run-dir", help="Run directory (default: runs/<config name>).")
]


def _version(value: bool) -> None:
    if value:
        from importlib import metadata

        try:
            version = metadata.version("sd35trt")
        except metadata.PackageNotFoundError:  # a source tree that was never installed
            version = "unknown (not installed)"
        typer.echo(f"sd35trt {version}")
        raise typer.Exit()


VERBOSE_FLAGS = ("-v", "--verbose")


@app.callback()
def _options(
    verbose: Annotated[
        bool,
        typer.Option(
            *VERBOSE_FLAGS, help="Show third-party warnings and progress bars too (before or after the verb)."
        ),
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Stable Diffusion 3.5 to FP8 TensorRT engines: calibrate, export, build, run."""
    from sd35trt.console import quiet_third_party

    quiet_third_party(verbose)


ForceOpt = Annotated[bool, typer.Option("--force", help="Redo the stage even if its output is up to date.")]


def _load(config: Path, run_dir: Path | None):
    from sd35trt.config import load_config

    cfg = load_config(config)
    return cfg, (run_dir or Path("runs") / cfg.name)


UpstreamOpt = Annotated[
    bool,
    typer.Option(
        "--upstream",
        help="First bring the stages before this one up to date (each redone only if missing or stale).",
    ),
]


def _run_stage(stage_name: str, config: Path, run_dir: Path | None, fn, upstream: bool = False) -> None:
    """Shared body of the stage verbs: the stage (after its upstream stages with ``--upstream``).

    Each stage checks its own freshness against the manifest (config fingerprint, upstream
    records, input hashes such as the prompt set, the machine for engines) and returns its
    existing record when nothing changed, so ``make`` and ``--upstream`` chain them cheaply.
    """
    from sd35trt.artifacts.manifest import Stage
    from sd35trt.console import stage_progress

    stage = Stage(stage_name)
    cfg, rd = _load(config, run_dir)
    hint = f"--config {config}" + (f" --run-dir {run_dir}" if run_dir else "")
    bodies = {Stage.CALIBRATE: _calibrate, Stage.EXPORT: _export, stage: fn}
    # Stages run in Stage order; calibrate is a no-op where nothing is quantized.
    for step in list(Stage)[: list(Stage).index(stage) + 1] if upstream else [stage]:
        with stage_progress(step.value) as progress:
            skipped = bodies[step](cfg, rd, hint, progress)
        typer.echo(skipped or f"{step.value}: {rd / step.directory} (sd35trt inspect {rd})")


def _calibrate(cfg, rd, hint, progress, force: bool = False) -> str | None:
    if not cfg.export.quantize:
        return "calibrate: nothing to do (export.quantize is false: no FP8 layers)"
    from sd35trt.stages.calibrate import calibrate as run

    run(cfg, rd, force=force, log=progress.log, status=progress.status)
    return None


def _export(cfg, rd, hint, progress, force: bool = False) -> None:
    from sd35trt.stages.export import export as run

    run(cfg, rd, force=force, hint=hint, progress=progress.log)


@app.command()
def calibrate(
    config: ConfigOpt = Path("configs/tiny.yaml"), run_dir: RunDirOpt = None, force: ForceOpt = False
):
    """FP8 post-training quantization of the transformer (ModelOpt), calibrated on the prompts."""
    _run_stage("calibrate", config, run_dir, functools.partial(_calibrate, force=force))


@app.command()
def export(
    config: ConfigOpt = Path("configs/tiny.yaml"),
    run_dir: RunDirOpt = None,
    force: ForceOpt = False,
    upstream: UpstreamOpt = False,
):
    """ONNX of each component (CLIP-L, CLIP-G, T5, the FP8 Q/DQ transformer, VAE decoder and
    encoder, the ControlNets), each validated against PyTorch."""
    _run_stage("export", config, run_dir, functools.partial(_export, force=force), upstream)


@app.command()
def build(
    config: ConfigOpt = Path("configs/tiny.yaml"),
    run_dir: RunDirOpt = None,
    backend: Annotated[
        str | None,
        typer.Option(
            help="auto | tensorrt | tensorrt-rtx | onnxruntime (default: the config's build.backend)."
        ),
    ] = None,
    force: ForceOpt = False,
    upstream: UpstreamOpt = False,
    allow_partial_fp8: Annotated[
        bool,
        typer.Option(
            "--allow-partial-fp8",
            help="Build an FP8 engine even if some quantized layers run in higher precision (a warning).",
        ),
    ] = False,
):
    """Engines from the ONNX export (TensorRT, or ONNX Runtime where TensorRT is absent)."""
    from sd35trt.config import Backend
    from sd35trt.errors import ConfigError

    try:
        chosen = Backend(backend) if backend is not None else None
    except ValueError:
        allowed = ", ".join(b.value for b in Backend)
        raise ConfigError(f"--backend {backend!r} is not one of: {allowed}") from None

    def body(cfg, rd, hint, progress):
        from sd35trt.stages.build import build as run

        run(
            cfg,
            rd,
            chosen,
            force=force,
            hint=hint,
            progress=progress.log,
            allow_partial_fp8=allow_partial_fp8,
        )

    _run_stage("build", config, run_dir, body, upstream)


@app.command()
def info() -> None:
    """Versions of the toolchain and the CUDA devices (with FP8 support)."""
    from sd35trt.info import collect_info, format_info

    typer.echo(format_info(collect_info()))


@app.command()
def inspect(
    run_dir: Annotated[Path, typer.Argument(help="A run directory or an engines directory.")],
) -> None:
    """Print a run's (or an engines directory's) manifest readably, with its engines' layer precisions."""
    from sd35trt.info import format_manifest

    typer.echo(format_manifest(run_dir))


@app.command()
def tiny(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write the pipeline to.")],
    seed: Annotated[int, typer.Option(min=0, help="Weight seed.")] = 0,
) -> None:
    """Write the built-in tiny SD3.5-shaped diffusers pipeline (deterministic, offline, ~2 MB)."""
    from sd35trt.models.tiny import write_tiny
    from sd35trt.user_files import output_directory

    output_directory(out, "--out", empty=True)
    typer.echo(f"wrote {write_tiny(out, seed)}")


@app.command()
@generation_options(*REFERENCE_PARAMS, defaults={"seed": 0}, defaults_from="the config's runtime section")
def reference(
    generation: dict,
    config: ConfigOpt = Path("configs/tiny.yaml"),
    run_dir: RunDirOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write.")] = Path("reference.png"),
) -> None:
    """Generate with the diffusers PyTorch pipeline: the baseline the engines are compared with."""
    from sd35trt.artifacts.runlock import check_run_dir
    from sd35trt.config import SIZE_MULTIPLE
    from sd35trt.errors import ConfigError
    from sd35trt.models.reference import generate_reference
    from sd35trt.parameters import check_value

    generation = {k: check_value(k, v) for k, v in generation.items() if v is not None}  # as `run`
    for side in ("height", "width"):
        if generation.get(side, 0) % SIZE_MULTIPLE:
            raise ConfigError(f"--{side} {generation[side]} is not a multiple of {SIZE_MULTIPLE}")
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out {out}: a .png file name is needed")
    cfg, rd = _load(config, run_dir)
    check_run_dir(rd)  # the built-in model is written into it: never into a user's folder
    typer.echo(f"wrote {generate_reference(cfg, rd, out=out, **generation)}")


@app.command("run")
@generation_options(*PARAMS)
def run_(
    generation: dict,
    engines: Annotated[
        Path,
        typer.Option("--engines", help="Engines directory (runs/<name>/engines) or an unpacked artefact."),
    ],
    low_vram: Annotated[
        bool, typer.Option("--low-vram", help="Load each engine only for its stage.")
    ] = False,
    timings: Annotated[bool, typer.Option("--timings", help="Print stage timings and peak memory.")] = False,
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", help="PNG file to write (not a directory); several images get -0, -1, ..."
        ),
    ] = Path("sd35trt.png"),
) -> None:
    """Generate PNGs with the engines in an engines directory (defaults recorded with them)."""
    from sd35trt.run import run
    from sd35trt.stages.package import engines_dir_of

    output = run(engines_dir_of(engines), low_vram=low_vram, out=out, **generation)
    for line in output.warning_lines():
        typer.echo(line, err=True)
    typer.echo(output.report(timings=timings))


@app.command()
@generation_options(*BENCH_PARAMS, defaults={"prompt": None, "seed": 0})
def bench(
    generation: dict,
    engines: Annotated[
        list[Path], typer.Option("--engines", help="An engines directory; repeat to compare several.")
    ],
    reference: Annotated[
        Path | None,
        typer.Option(help="diffusers model directory: PyTorch baseline and the overhead comparison."),
    ] = None,
    runs: Annotated[int, typer.Option(min=1, help="Timed generations per configuration.")] = 3,
    warmup: Annotated[int, typer.Option(min=0, help="Untimed generations before them.")] = 1,
    overhead_runs: Annotated[
        int, typer.Option(min=0, help="Timed generations per side of the overhead measurement (0: skip).")
    ] = 5,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Output directory (default: <engines>/../bench).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda[:N] (default: the engines' own).")] = None,
    img2img_strength: Annotated[
        float,
        typer.Option(
            help="Also time image-to-image at this strength when the engines have a VAE encoder (0: skip)."
        ),
    ] = 0.6,
) -> None:
    """Per-stage latency (median, p90), images/s, peak memory, and per-step overhead vs diffusers.

    Every configuration generates with the first engines directory's recorded defaults, except
    where the generation options above override them.
    """
    from sd35trt.bench.benchmark import BenchOptions
    from sd35trt.bench.benchmark import bench as run
    from sd35trt.bench.report import format_bench

    engines = _checked_engines(engines, out, device, "bench")
    options = BenchOptions(
        runs=runs,
        warmup=warmup,
        overhead_runs=overhead_runs,
        out_dir=out,
        device=device,
        img2img_strength=img2img_strength,
        generation={k: v for k, v in generation.items() if v is not None},
    )
    report = run(engines, reference, options)
    typer.echo(format_bench(report))
    typer.echo(f"wrote {report.files.json_path} and {report.files.png}")


def _checked_engines(engines: list[Path], out: Path | None, device: str | None, verb: str) -> list[Path]:
    """bench's and eval's engines directories (an unpacked artefact's ``engines/`` for the
    artefact), checked with their ``--out`` (not a file; given when the default, ``<engines>/../
    <verb>``, would land inside an artefact) and ``--device`` (``cpu`` or ``cuda[:N]``).

    Raises:
        ConfigError: naming the option and the value.
    """
    import re

    from sd35trt.errors import ConfigError
    from sd35trt.stages.package import CHECKSUMS, engines_dir_of
    from sd35trt.user_files import output_directory

    dirs = [engines_dir_of(e) for e in engines]
    if out is not None:
        output_directory(out, "--out")
    elif (dirs[0].parent / CHECKSUMS).is_file():
        raise ConfigError(
            f"--out is needed: the default, {dirs[0].parent / verb}, is inside the unpacked artefact "
            f"{dirs[0].parent} (whose verify would then fail)"
        )
    if device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ConfigError(f"--device {device!r}: give cpu, cuda or cuda:N")
    return dirs


@app.command(name="eval")
def eval_(
    engines: Annotated[Path, typer.Option("--engines", help="The engines directory to evaluate.")],
    reference: Annotated[
        Path | None,
        typer.Option(
            help="diffusers model directory: the non-quantized reference (default: the model of the run "
            "the engines belong to)."
        ),
    ] = None,
    prompts: Annotated[Path, typer.Option(help="Held-out prompts, one per line (# comments).")] = Path(
        "calibration_prompts/heldout.txt"
    ),
    num_prompts: Annotated[int, typer.Option(min=1, help="Evaluate the first N prompts.")] = 4,
    seed: Annotated[int, typer.Option(min=0, help="Prompt i uses seed + i on both sides.")] = 0,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Output directory (default: <engines>/../eval).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda[:N] (default: the engines' own).")] = None,
    cache_threshold: Annotated[
        list[float] | None,
        typer.Option(
            help="Engines built with runtime.cache: score cached vs uncached images at these thresholds "
            "(repeatable; default 0.05, 0.1, 0.2, 0.3, 0.4, 0.6)."
        ),
    ] = None,
) -> None:
    """PSNR / SSIM (LPIPS when its weights are local) of engine images against the diffusers reference."""
    from sd35trt.bench.eval_report import format_eval
    from sd35trt.bench.evaluate import evaluate

    (engines,) = _checked_engines([engines], out, device, "eval")
    if reference is None:
        from sd35trt.models.reference import run_model_dir

        reference = run_model_dir(engines)
    report = evaluate(
        engines,
        reference,
        prompts,
        out,
        num_prompts=num_prompts,
        seed=seed,
        device=device,
        cache_thresholds=cache_threshold,
    )
    typer.echo(format_eval(report))
    from sd35trt.bench.cache_quality import EVAL_CACHE_PLOT

    files = report.files
    written = [files.json_path, files.table, *([files.grid] if files.grid else [])]
    if files.grid and report.cache:
        written.append(str(Path(files.json_path).parent / EVAL_CACHE_PLOT))
    typer.echo(f"wrote {', '.join(written)}")


def _serve_settings() -> type[ServeSettings]:
    from sd35trt.serve.settings import ServeSettings

    return ServeSettings


@app.command()
@settings_options(_serve_settings, skip=("warmup",))
def serve(
    engines: Annotated[
        Path,
        typer.Option("--engines", "-e", help="Engines directory (runs/<name>/engines) or unpacked artefact."),
    ],
    settings: ServeSettings,
) -> None:
    """Serve engines over HTTP: /generate, /v1/images/generations (OpenAI), /metrics, /health, /ready."""
    from sd35trt.serve import serve as run_server
    from sd35trt.stages.package import engines_dir_of

    run_server(engines_dir_of(engines), settings)


from sd35trt.triton.cli import triton_app  # noqa: E402  (imports no Triton, no torch)

app.add_typer(triton_app, name="triton")


@app.command()
def package(
    run_dir: Annotated[Path, typer.Argument(help="A built run directory (runs/<name>).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Artefact to write (.tar.gz).")],
) -> None:
    """Pack engines, manifest, tokenizers, scheduler and config into a checksummed artefact."""
    from sd35trt.stages.package import package as run

    path = run(run_dir, out)
    typer.echo(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")


@app.command()
def verify(
    path: Annotated[Path, typer.Argument(help="Artefact (.tar.gz), its unpacked directory, or engines dir.")],
    compare: Annotated[
        bool,
        typer.Option(
            "--compare",
            help="Also run each engine and its ONNX source (ONNX Runtime) on the same inputs and check "
            "every output against the component's tolerance (needs the run directory's ONNX).",
        ),
    ] = False,
) -> None:
    """Check every file's size and sha256 and whether this machine can load the engines."""
    from sd35trt.errors import VerificationError
    from sd35trt.stages.package import engines_dir_of
    from sd35trt.stages.package import verify as run

    if compare and path.is_file():
        raise VerificationError(
            f"--compare needs the ONNX the engines were built from; {path} is an artefact, which ships no "
            "ONNX: run it on the engines directory of the run, runs/<name>/engines"
        )
    report = run(path)
    if not report.ok:
        for problem in report.problems:
            typer.echo(f"  - {problem}", err=True)
        raise VerificationError(f"{path}: {len(report.problems)} problem(s) found")
    if report.notes:
        typer.echo(f"{path}: OK ({report.files_checked} files checked)")
        for note in report.notes:
            typer.echo(f"  {note}")
    else:
        typer.echo(f"{path}: OK ({report.files_checked} files checked, engines fit this machine)")
    if not compare:
        return
    from sd35trt.compare import compare_engines

    result = compare_engines(engines_dir_of(path))
    typer.echo(result.table())
    if not result.results:
        raise VerificationError(
            f"{path}: no engine could be compared on this machine (see the reasons above)"
        )
    if not result.ok:
        failures = result.failures
        raise VerificationError(
            f"{path}: {len(failures)} output(s) of the engines differ from their ONNX beyond the tolerance: "
            + "; ".join(f.describe() for f in failures)
        )
    typer.echo(
        f"compare: {len(result.results)} outputs within tolerance, {len(result.skipped)} engines skipped"
    )


def hoist_verbose(argv: list[str]) -> list[str]:
    """``-v`` / ``--verbose`` anywhere before ``--`` moved to the front, where the top-level option is.

    ``sd35trt run -v ...`` then means ``sd35trt -v run ...`` (no verb has a ``-v`` of its own).
    """
    end = argv.index("--") if "--" in argv else len(argv)
    flags = [a for a in argv[:end] if a in VERBOSE_FLAGS]
    return flags + [a for a in argv[:end] if a not in VERBOSE_FLAGS] + argv[end:]


def main() -> None:
    """Console entry point: user errors print one line and exit 1 (tracebacks with SD35TRT_DEBUG=1)."""
    try:
        app(args=hoist_verbose(sys.argv[1:]))
    except Sd35TrtError as err:
        if os.environ.get("SD35TRT_DEBUG") == "1":
            raise
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
