"""One writer per run directory, with real concurrent processes (faults.md case 22)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from sd35trt.artifacts.manifest import Stage
from sd35trt.artifacts.runlock import lock_paths, run_dir_lock, stage_session
from sd35trt.errors import RunDirBusyError

_HOLDER = """
import sys, time
from sd35trt.artifacts.runlock import run_dir_lock
with run_dir_lock(sys.argv[1], "build"):
    print("holding", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _hold(run_dir, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(run_dir), str(seconds), "--force"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "holding"
    return proc


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    """faults.md 22: a second writer waits a bounded time, then is refused with the holder's pid
    and command; its own clean-up never touches the holder's staging directory."""
    holder = _hold(tmp_path, 60)
    staging = tmp_path / ".engines.tmp-holder"
    staging.mkdir()
    try:
        start = time.monotonic()
        with pytest.raises(RunDirBusyError) as err, stage_session(tmp_path, Stage.BUILD, wait_s=0.5):
            pytest.fail("the lock was taken twice")
        assert time.monotonic() - start >= 0.5
        message = str(err.value)
        assert f"is being written by pid {holder.pid} (`" in message and "--force" in message
        assert "re-run `sd35trt build`" in message and "\n" not in message
        assert staging.is_dir(), "the refused writer removed the holder's staging directory"
    finally:
        holder.kill()
        holder.wait(30)


def test_a_killed_holder_releases_the_lock(tmp_path):
    """SIGKILL leaves the lock file and a stale holder record; the kernel frees the lock anyway."""
    holder = _hold(tmp_path, 60)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(30)
    _, holder_file = lock_paths(tmp_path)
    assert holder_file.exists()  # stale, from the killed holder
    with run_dir_lock(tmp_path, "build", wait_s=5):
        assert f'"pid": {os.getpid()}' in holder_file.read_text()
    assert not holder_file.exists()


def test_a_writer_waits_for_a_holder_that_finishes(tmp_path):
    holder = _hold(tmp_path, 1.0)
    start = time.monotonic()
    try:
        with run_dir_lock(tmp_path, "export", wait_s=30):
            waited = time.monotonic() - start
    finally:
        holder.wait(30)
    assert waited >= 0.5  # the holder kept it for 1 s after saying so


def test_a_session_removes_leftovers_of_its_own_stage_only(tmp_path):
    """faults.md 4: a killed run's leftovers go at the next session of that stage, whatever it does."""
    for name in (".engines.tmp-a", ".engines.old-b", ".onnx.tmp-c"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text("x")
    (tmp_path / ".manifest.json.abc.tmp").write_text("{")
    with stage_session(tmp_path, Stage.BUILD):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == [".onnx.tmp-c"]
    assert lock_paths(tmp_path)[0].parent == tmp_path.parent  # the lock lives beside the run dir


def test_a_run_directory_is_recognised_before_its_first_record(tmp_path):
    """faults.md 29: what sd35trt writes before a stage's first record (the built-in model with its
    stamp, staging directories) is a run; a user's folder, even one with a model/, is not."""
    from sd35trt.artifacts.runlock import MODEL_STAMP, check_run_dir
    from sd35trt.errors import RunDirError

    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / MODEL_STAMP).write_text("{}")
    (run / ".calibrate.tmp-abc").mkdir()
    check_run_dir(run)
    check_run_dir(tmp_path / "new")  # not there yet
    (run / "model" / MODEL_STAMP).unlink()  # now a model/ sd35trt did not write
    with pytest.raises(RunDirError, match=r"holds model and no sd35trt run manifest"):
        check_run_dir(run)
    user = tmp_path / "user"
    user.mkdir()
    (user / ".DS_Store").write_text("")
    with pytest.raises(RunDirError, match=r"holds \.DS_Store and no sd35trt run manifest"):
        check_run_dir(user)
