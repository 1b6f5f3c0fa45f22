"""The ``sd35trt`` command line: one command per verb, each body loads, calls one function, prints.

Heavy libraries (torch, diffusers, modelopt, tensorrt) are imported inside the commands that use
them, so ``sd35trt --help`` and config checks start fast and need no GPU stack.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from sd35trt.errors import Sd35TrtError

app = typer.Typer(
    help="Stable Diffusion 3.5 to FP8 TensorRT engines: calibrate, export, build, run.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="YAML config (see configs/).")]
RunDirOpt = Annotated[
    Path | None, typer.Option("--run-dir", help="Run directory (default: runs/<config name>).")
]


def _load(config: Path, run_dir: Path | None):
    from sd35trt.config import load_config

    cfg = load_config(config)
    return cfg, (run_dir or Path("runs") / cfg.name)


@app.command()
def info() -> None:
    """Versions of the toolchain and the CUDA devices (with FP8 support)."""
    from sd35trt.info import collect_info, format_info

    typer.echo(format_info(collect_info()))


@app.command()
def inspect(
    run_dir: Annotated[Path, typer.Argument(help="A run directory or an engines directory.")],
) -> None:
    """Print a run's (or an engines directory's) manifest in readable form."""
    from sd35trt.info import format_manifest

    typer.echo(format_manifest(run_dir))


@app.command()
def tiny(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write the pipeline to.")],
    seed: Annotated[int, typer.Option(min=0, help="Weight seed.")] = 0,
) -> None:
    """Write the built-in tiny SD3.5-shaped diffusers pipeline (deterministic, offline, ~2 MB)."""
    from sd35trt.tiny import write_tiny

    typer.echo(f"wrote {write_tiny(out, seed)}")


@app.command()
def reference(
    prompt: Annotated[str, typer.Argument(help="Text prompt.")],
    config: ConfigOpt = Path("configs/tiny.yaml"),
    run_dir: RunDirOpt = None,
    negative_prompt: Annotated[str | None, typer.Option(help="Negative prompt.")] = None,
    steps: Annotated[
        int | None, typer.Option(help="Denoising steps (default: config runtime.steps).")
    ] = None,
    guidance: Annotated[float | None, typer.Option(help="CFG scale (default: config).")] = None,
    height: Annotated[int | None, typer.Option(help="Image height in pixels.")] = None,
    width: Annotated[int | None, typer.Option(help="Image width in pixels.")] = None,
    seed: Annotated[int, typer.Option(help="Noise seed.")] = 0,
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write.")] = Path("reference.png"),
) -> None:
    """Generate with the diffusers PyTorch pipeline: the baseline the engines are compared with."""
    from sd35trt.reference import generate_reference

    cfg, rd = _load(config, run_dir)
    path = generate_reference(
        cfg,
        rd,
        prompt,
        out,
        negative_prompt=negative_prompt,
        steps=steps,
        guidance=guidance,
        height=height,
        width=width,
        seed=seed,
    )
    typer.echo(f"wrote {path}")


def main() -> None:
    """Console entry point: user errors print one line and exit 1 (tracebacks with SD35TRT_DEBUG=1)."""
    try:
        app()
    except Sd35TrtError as err:
        if os.environ.get("SD35TRT_DEBUG") == "1":
            raise
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
