"""One writer per run directory, and the checks before a stage writes one.

Every stage that writes ``runs/<name>/``, and ``package``, holds an OS file lock (``filelock``;
released by the kernel when the holder dies, even by SIGKILL) beside the run directory,
``runs/.<name>.sd35trt-lock``, so a refused command leaves nothing inside it. Its ``.holder`` file
names the holder's pid, command and start time for the message a second writer gets. Inside the
lock a stage first removes the leftovers of an interrupted run of itself: without the lock, that
would delete a running writer's staging directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

from sd35trt.artifacts.files import atomic_write_json
from sd35trt.artifacts.manifest import MANIFEST_NAME, Stage, clean_leftovers, now_utc
from sd35trt.errors import WRITE_ERRNOS, RunDirBusyError, RunDirError
from sd35trt.user_files import read_json

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
    """Hold ``run_dir``'s writer lock for the ``with`` block (``run_dir`` is not created, its parent is).

    ``what`` (``"build"``) is recorded for the message others get; ``wait_s``: seconds to wait for
    another holder before refusing.

    Raises:
        RunDirBusyError: another process held the lock for ``wait_s`` seconds (its pid and
            command are named).
    """
    from filelock import FileLock, Timeout

    lock_file, holder = lock_paths(run_dir)
    lock = FileLock(lock_file)
    with unwritable_is_one_line(what):
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire(timeout=wait_s)
        except Timeout:
            raise RunDirBusyError(
                f"{run_dir} is being written by {_holder(holder)}; waited {wait_s:g} s for it: let it "
                f"finish (or stop it), then re-run `sd35trt {what}`"
            ) from None
    try:
        with unwritable_is_one_line(what):
            atomic_write_json(
                holder,
                {"pid": os.getpid(), "command": shlex.join(sys.argv), "what": what, "since": now_utc()},
            )
        yield
    finally:
        holder.unlink(missing_ok=True)
        lock.release()


@contextlib.contextmanager
def unwritable_is_one_line(what: str, root: str | Path | None = None) -> Iterator[None]:
    """Turn "cannot write here" (read-only, no permission, disk full) into one line naming the path
    and the command ``what``; with ``root``, only errors on paths inside it (or on none) are turned.

    Raises:
        RunDirError: an ``OSError`` of :data:`~sd35trt.errors.WRITE_ERRNOS` was raised in the block
            (faults.md #32).
    """
    try:
        yield
    except OSError as err:
        name = err.filename
        inside = root is None or name is None or Path(name).absolute().is_relative_to(Path(root).absolute())
        if err.errno not in WRITE_ERRNOS or not inside:
            raise
        raise RunDirError(
            f"`sd35trt {what}` cannot write {name or root or 'the run directory'}: {err.strerror}; "
            "free space or make it writable (or use a writable copy of the run directory)"
        ) from None


#: Where a run directory holds a model written by sd35trt (the built-in tiny model), and beside
#: it the settings it was written with.
MODEL_SUBDIR = "model"
MODEL_STAMP = "sd35trt_model.json"
#: What sd35trt itself writes into a run directory before its first record (staging names, the
#: hash cache, interrupted-publish markers); the built-in model's folder is recognised by its stamp.
_OWN_NAMES = re.compile(
    r"\.(calibrate|onnx|engines|model)\.(tmp|old)-.+|\.(calibrate|onnx|engines)\.unrecorded"
    r"|\.(manifest\.json|sha256-cache\.json)(\..+\.tmp)?"
)


def _sd35trt_made(entry: Path) -> bool:
    if entry.name == MODEL_SUBDIR:
        return (entry / MODEL_STAMP).is_file()
    return _OWN_NAMES.fullmatch(entry.name) is not None


def _manifest_data(run_dir: Path) -> dict | None:
    manifest = run_dir / MANIFEST_NAME
    return read_json(manifest, "it is not an sd35trt run manifest") if manifest.is_file() else None


def engines_instead_of_run(run_dir: str | Path) -> Path | None:
    """The engines directory that ``run_dir`` is, or holds as an unpacked artefact does; ``None``
    when it is neither (a run directory, or anything else).

    Raises:
        ManifestError: its ``manifest.json`` is not JSON.
    """
    run_dir = Path(run_dir)
    data = _manifest_data(run_dir)
    if data is None:
        engines = run_dir / Stage.BUILD.directory
        return engines if (engines / MANIFEST_NAME).is_file() else None
    return run_dir if "engines" in data and "records" not in data else None


def check_run_dir(run_dir: str | Path) -> None:
    """Refuse ``run_dir`` unless it is a run directory, a new or empty one, or holds only what
    sd35trt writes before a stage's first record (faults.md #29).

    Raises:
        RunDirError: a file; an engines directory or an unpacked artefact (``--engines`` is named);
            a directory holding anything else without a run manifest. Nothing is written then.
        ManifestError: its ``manifest.json`` is not JSON.
    """
    run_dir = Path(run_dir)
    data = _manifest_data(run_dir)
    if data is not None and "records" in data:
        return  # a run manifest; RunManifest.load checks its format and records
    engines = engines_instead_of_run(run_dir)
    if engines is not None:
        raise RunDirError(
            f"--run-dir {run_dir} is an engines directory (or an unpacked artefact), not a run directory: "
            f"pass it as `--engines {engines}` to run, serve or bench, and give the stages a run directory "
            "of their own; nothing was written"
        )
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--run-dir {run_dir} is a file, not a directory")
    found = sorted(e.name for e in run_dir.iterdir() if not _sd35trt_made(e)) if run_dir.is_dir() else []
    if data is not None or found:
        raise RunDirError(
            f"--run-dir {run_dir} holds {', '.join(found[:3]) or MANIFEST_NAME} and no sd35trt run manifest, "
            "so it is not a run directory (stages would replace its calibrate/, onnx/ and engines/): choose "
            "a new or empty directory; nothing was written"
        )


@contextlib.contextmanager
def stage_session(run_dir: str | Path, stage: Stage, wait_s: float = DEFAULT_WAIT_S) -> Iterator[None]:
    """Check ``run_dir`` is a run, hold its lock and remove an interrupted ``stage``'s leftovers.

    Raises:
        RunDirError: not a run directory (see :func:`check_run_dir`), or not writable.
        RunDirBusyError: another process writes the run directory.
    """
    check_run_dir(run_dir)
    with run_dir_lock(run_dir, stage.value, wait_s):
        with unwritable_is_one_line(stage.value):
            clean_leftovers(run_dir, stage.directory)
        yield
