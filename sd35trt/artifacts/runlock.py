"""One writer per run directory.

Every stage that writes ``runs/<name>/`` (``calibrate``, ``export``, ``build``) and ``package``,
which reads what they publish, hold an OS file lock (through ``filelock``; the kernel releases it
when the holder dies, even by SIGKILL). The lock file sits beside the run directory,
``runs/.<name>.sd35trt-lock``, so a refused or failed command leaves nothing inside it. Beside the
lock, ``runs/.<name>.sd35trt-lock.holder`` names the holder's pid, command and start time, so a
second writer that cannot get the lock within ``wait_s`` is refused with a line naming who holds it.

Inside the lock a stage first removes the leftovers of an interrupted run of itself (staging
directories, temporary manifest files), whatever it then decides to do: without the lock, that
clean-up would delete a running writer's staging directory.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import shlex
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ParamSpec, TypeVar

from sd35trt.artifacts.manifest import Stage, atomic_write_json, clean_leftovers, now_utc
from sd35trt.errors import RunDirBusyError

LOCK_SUFFIX = ".sd35trt-lock"
#: How long a second writer waits before it is refused (seconds): long enough for a stage that is
#: just finishing, short enough that a user is not left waiting on an hours-long build.
DEFAULT_WAIT_S = 5.0


def lock_paths(run_dir: str | Path) -> tuple[Path, Path]:
    """The lock file of ``run_dir`` and the file naming its holder (both beside ``run_dir``)."""
    run_dir = Path(run_dir).absolute()
    lock = run_dir.parent / f".{run_dir.name}{LOCK_SUFFIX}"
    return lock, lock.with_name(lock.name + ".holder")


def _holder(path: Path) -> str:
    try:
        data = json.loads(path.read_text())
        return f"pid {int(data['pid'])} (`{data['command']}`, since {data['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it did not record its pid)"


@contextlib.contextmanager
def run_dir_lock(run_dir: str | Path, what: str, wait_s: float = DEFAULT_WAIT_S) -> Iterator[None]:
    """Hold ``run_dir``'s writer lock for the ``with`` block.

    Args:
        run_dir: the run directory (not created here; its parent is).
        what: what the holder does (``"build"``), recorded for the message others get.
        wait_s: seconds to wait for another holder to finish before refusing.

    Raises:
        RunDirBusyError: another process held the lock for ``wait_s`` seconds (its pid and
            command are named).
    """
    from filelock import FileLock, Timeout

    lock_file, holder = lock_paths(run_dir)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_file)
    try:
        lock.acquire(timeout=wait_s)
    except Timeout:
        raise RunDirBusyError(
            f"{run_dir} is being written by {_holder(holder)}; waited {wait_s:g} s for it: let it finish "
            f"(or stop it), then re-run `sd35trt {what}`"
        ) from None
    try:
        atomic_write_json(
            holder, {"pid": os.getpid(), "command": shlex.join(sys.argv), "what": what, "since": now_utc()}
        )
        yield
    finally:
        holder.unlink(missing_ok=True)
        lock.release()


@contextlib.contextmanager
def stage_session(run_dir: str | Path, stage: Stage, wait_s: float = DEFAULT_WAIT_S) -> Iterator[None]:
    """Hold the run directory's lock and remove the leftovers of an interrupted ``stage`` first.

    Raises:
        RunDirBusyError: another process writes the run directory.
    """
    with run_dir_lock(run_dir, stage.value, wait_s):
        clean_leftovers(run_dir, stage.directory)
        yield


P = ParamSpec("P")
R = TypeVar("R")


def locked_stage(stage: Stage) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Run a stage function (one with a ``run_dir`` parameter) inside :func:`stage_session`."""

    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def locked(*args: P.args, **kwargs: P.kwargs) -> R:
            run_dir = signature.bind(*args, **kwargs).arguments["run_dir"]
            with stage_session(run_dir, stage):
                return fn(*args, **kwargs)

        return locked

    return wrap
