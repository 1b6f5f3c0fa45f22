"""``sd35trt triton``: write a Triton model repository, and serve one with the local tritonserver."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import click
import typer
from typer.core import TyperGroup

from sd35trt.cli_options import settings_options

if TYPE_CHECKING:
    from sd35trt.triton.repository import TritonRepoSettings

DEFAULT_COMMAND = "repository"


class _DefaultCommandGroup(TyperGroup):
    """A group whose ``repository`` command runs when the first argument names no command."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = [DEFAULT_COMMAND, *args]
        return super().parse_args(ctx, args)


triton_app = typer.Typer(
    cls=_DefaultCommandGroup,
    help="Triton Inference Server: `sd35trt triton ENGINES --out REPO` writes a model repository, "
    "`sd35trt triton serve REPO` serves it.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


def _repository_settings() -> type[TritonRepoSettings]:
    from sd35trt.triton.repository import TritonRepoSettings

    return TritonRepoSettings


@triton_app.command("repository")
@settings_options(_repository_settings, skip=("gpus", "engines"))
def repository(
    engines: Annotated[
        Path, typer.Argument(help="Engines directory (runs/<name>/engines) or unpacked artefact.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Model repository directory to write into.")],
    settings: TritonRepoSettings,
    gpus: Annotated[
        str | None,
        typer.Option(help="TensorRT engines: GPU ids for KIND_GPU instances, e.g. 0,1 (default: every GPU)."),
    ] = None,
    reference: Annotated[
        bool,
        typer.Option("--reference", help="Name the engines by absolute path instead of copying them in."),
    ] = False,
) -> None:
    """Write a Triton Inference Server model repository (Python backend) serving the engines.

    ``sd35trt triton ENGINES --out REPO`` is this command (its name may be left out).
    """
    from sd35trt.errors import ConfigError
    from sd35trt.stages.package import engines_dir_of
    from sd35trt.triton.repository import EngineMode, write_repository
    from sd35trt.user_files import output_directory

    try:
        gpu_ids = tuple(int(g) for g in gpus.split(",")) if gpus else None
    except ValueError:
        raise ConfigError(f"--gpus {gpus!r} is not a comma-separated list of GPU ids, e.g. 0,1") from None
    if gpu_ids is not None and any(g < 0 for g in gpu_ids):
        raise ConfigError(f"--gpus {gpus!r}: GPU ids are 0 or more")
    mode = EngineMode.REFERENCE if reference else EngineMode.COPY
    settings = settings.model_copy(update={"gpus": gpu_ids, "engines": mode})
    engines_dir = engines_dir_of(engines)
    output_directory(out, "--out", outside=engines_dir)
    model = write_repository(engines_dir, out, settings)
    typer.echo(
        f"wrote {model.model_dir} ({model.backend.value} engines, {model.instance_kind}, "
        f"max_batch_size {model.max_batch_size}):"
    )
    for name in model.layout():
        typer.echo(f"  {name}")
    typer.echo(f"serve it with: sd35trt triton serve {model.model_dir.parent}")


def _check_repository(repository: Path) -> None:
    """ConfigError, before tritonserver starts, for what is not a model repository: not a directory,
    an engines directory, no ``*/config.pbtxt`` (tritonserver would report an empty folder ready and
    an engines directory in a page of its log)."""
    from sd35trt.artifacts.runlock import engines_instead_of_run
    from sd35trt.errors import ConfigError

    write = f"write one with `sd35trt triton ENGINES --out {repository}`"
    if not repository.is_dir():
        raise ConfigError(f"repository {repository} is not a directory; {write}")
    engines = engines_instead_of_run(repository)
    if engines is not None:
        raise ConfigError(
            f"repository {repository} is an engines directory, not a Triton model repository; write "
            f"one from it with `sd35trt triton {engines} --out REPO`, then `sd35trt triton serve REPO`"
        )
    if not any(repository.glob("*/config.pbtxt")):
        raise ConfigError(f"repository {repository} holds no model (no */config.pbtxt); {write}")


@triton_app.command("serve")
def serve(
    repository: Annotated[
        Path, typer.Argument(help="A model repository (sd35trt triton ENGINES --out REPO).")
    ],
    host: Annotated[
        str, typer.Option(help="Address HTTP, gRPC and metrics listen on (0.0.0.0: every interface).")
    ] = "127.0.0.1",
    http_port: Annotated[int, typer.Option(min=1, max=65535, help="KServe v2 HTTP port.")] = 8000,
    grpc_port: Annotated[int, typer.Option(min=1, max=65535, help="gRPC port.")] = 8001,
    metrics_port: Annotated[int, typer.Option(min=1, max=65535, help="Prometheus metrics port.")] = 8002,
    exit_timeout: Annotated[
        int, typer.Option(min=0, help="On Ctrl-C / SIGTERM, seconds running requests may take to finish.")
    ] = 30,
    load_timeout: Annotated[
        float, typer.Option(min=1, help="Seconds the models may take to load and warm up.")
    ] = 600.0,
    log: Annotated[
        Path | None, typer.Option(help="tritonserver's log file (default: a temporary file, printed).")
    ] = None,
) -> None:
    """Serve a model repository with the local tritonserver until Ctrl-C (SIGINT / SIGTERM)."""
    from sd35trt.errors import ConfigError
    from sd35trt.triton.local import LocalTritonServer, TritonPorts, serve_foreground

    _check_repository(repository)
    ports = TritonPorts(http=http_port, grpc=grpc_port, metrics=metrics_port)
    if len({http_port, grpc_port, metrics_port}) < 3:
        raise ConfigError(
            f"--http-port, --grpc-port and --metrics-port must differ, got {http_port}, {grpc_port} and "
            f"{metrics_port}"
        )
    server = LocalTritonServer(repository, log_path=log, exit_timeout_s=exit_timeout, host=host, ports=ports)
    code = serve_foreground(server, typer.echo, timeout_s=load_timeout)
    if code:
        raise typer.Exit(code)
