"""What the command line shows: one progress display per stage, and third-party noise kept out
(at the command-line boundary only; ``-v`` or ``SD35TRT_DEBUG=1`` shows everything again)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

#: Environment read by the libraries when they are imported: their progress bars and advisory
#: logging off (tqdm >= 4.66 reads TQDM_* defaults; transformers and diffusers their *_VERBOSITY).
_QUIET_ENV = {
    "TQDM_DISABLE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}

#: Known-harmless third-party warnings: (message regex, category, module regex).
_HARMLESS_WARNINGS = (
    # ModelOpt checks transformers' version against the one it was tested with; sd35trt's own
    # parity tests cover the pair it runs with (requirements.lock).
    (r"transformers .* is not tested with current version of modelopt", UserWarning, r"modelopt"),
    # torch.onnx's TorchScript exporter announces its deprecation on every export call.
    (r".*torch\.onnx\.export.*dynamo", DeprecationWarning, r"torch\.onnx"),
)

console = Console(stderr=False, highlight=False)


def quiet_third_party(verbose: bool) -> None:
    """Silence known-harmless third-party output for this process, unless ``verbose`` (or
    ``SD35TRT_DEBUG=1``). Run it before the libraries are imported; values the user set are kept."""
    if verbose or os.environ.get("SD35TRT_DEBUG") == "1":
        return
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for message, category, module in _HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


class StageProgress:
    """A stage's progress display: its name, elapsed time and current item on one live line (none
    where output is not a terminal), the lines of :meth:`log` above it."""

    def __init__(self, progress: Progress | None = None, task: TaskID | None = None) -> None:
        self._progress = progress
        self._task = task

    def log(self, line: str) -> None:
        """Print ``line`` (above the live line)."""
        console.print(line, markup=False, highlight=False, soft_wrap=True)

    def status(self, item: str) -> None:
        """Show ``item`` as what the stage is working on now (not printed to logs)."""
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, item=item)


@contextmanager
def stage_progress(stage: str) -> Iterator[StageProgress]:
    """The one progress display of a stage (a spinner, ``stage``, elapsed time, current item)."""
    if not console.is_terminal:
        yield StageProgress()
        return
    columns = (
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[item]}"),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        yield StageProgress(progress, progress.add_task(stage, total=None, item=""))
