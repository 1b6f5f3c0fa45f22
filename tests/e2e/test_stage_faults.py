"""Stages under faults, for real: concurrent writers, a kill between publishing and recording,
leftovers, and a config refused before the first stage (faults.md cases 4, 22, 23 and 28).

Each test works on a copy of the shared built run directory (``copy_run``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sd35trt.artifacts.manifest import RunManifest, Stage, unrecorded_marker
from sd35trt.artifacts.records import Fingerprint, StageRecord
from sd35trt.config import Backend, config_from_dict
from sd35trt.errors import ConfigError, StaleArtifactError, UnsafeArtifactError
from sd35trt.stages.build import build
from sd35trt.stages.package import package

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TINY_YAML = REPO / "configs" / "tiny.yaml"


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "SD35TRT_DEBUG"} | {"PYTHONPATH": str(REPO)}


def _build_verified(config, run_dir: Path) -> StageRecord:
    """The build record, after checking that it matches the files on disk."""
    return RunManifest(run_dir).verified(Stage.BUILD, Fingerprint.of(config, Stage.BUILD))


def test_two_build_force_processes_on_one_run_directory(built_run, copy_run, tiny_config):
    """faults.md 22: two `sd35trt build --force` at once on one run directory. Before the lock,
    4 of 5 tries failed with `SystemError : 2` or a FileNotFoundError traceback (the second
    build's clean-up deleted the first one's staging directory). Now the second waits or is
    refused naming the holder; no traceback; the record matches the files afterwards."""
    run_dir = copy_run(built_run)
    cmd = [
        sys.executable, "-m", "sd35trt.cli", "build", "--config", str(TINY_YAML),
        "--run-dir", str(run_dir), "--backend", "onnxruntime", "--force",
    ]  # fmt: skip
    procs = [
        subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        results.append((p.returncode, out, err))
    for rc, _out, err in results:
        assert "Traceback" not in err, err
        assert rc == 0 or (
            rc == 1 and "is being written by pid" in err and "re-run `sd35trt build`" in err
        ), err
    assert any(rc == 0 for rc, _, _ in results)
    _build_verified(tiny_config, run_dir)
    assert not list(run_dir.glob(".engines.*")), "staging directories left behind"


_KILLED_BETWEEN_PUBLISH_AND_RECORD = """
import os, signal, sys
from sd35trt.artifacts.manifest import RunManifest, Stage
real_put = RunManifest.put

def put(self, stage, record):
    if stage is Stage.BUILD:
        os.kill(os.getpid(), signal.SIGKILL)  # engines/ is published, its record not yet written
    real_put(self, stage, record)

RunManifest.put = put
from sd35trt.stages.build import build
from sd35trt.config import Backend, load_config
build(load_config(sys.argv[1]), sys.argv[2], Backend.ONNXRUNTIME, force=True)
"""


def test_build_killed_between_publishing_and_recording_is_detected_and_repaired(
    built_run, copy_run, tiny_config, tmp_path
):
    """faults.md 23: `build` used to say "up to date" while `package` said "re-run build", a
    loop. Now every later check names the interrupted stage, and `build` redoes it."""
    run_dir = copy_run(built_run)
    before = RunManifest(run_dir).get(Stage.BUILD)
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_BETWEEN_PUBLISH_AND_RECORD, str(TINY_YAML), str(run_dir)],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert RunManifest(run_dir).get(Stage.BUILD) == before  # the record is the old one
    assert unrecorded_marker(run_dir, Stage.BUILD).is_file()
    with pytest.raises(StaleArtifactError, match=r"published but never recorded .* re-run `sd35trt build`"):
        package(run_dir, tmp_path / "a.tar.gz")

    # Without the marker (deleted, or a kill before it was written) the record no longer matches
    # the files: build still redoes the stage instead of calling it up to date.
    unrecorded_marker(run_dir, Stage.BUILD).unlink()
    lines: list[str] = []
    build(tiny_config, run_dir, Backend.ONNXRUNTIME, progress=lines.append)
    assert not any("up to date" in line for line in lines), lines
    assert not unrecorded_marker(run_dir, Stage.BUILD).exists()
    _build_verified(tiny_config, run_dir)
    package(run_dir, tmp_path / "a.tar.gz")  # the advice that was given now works


def _leftovers(run_dir: Path, name: str) -> list[Path]:
    made = []
    for suffix in ("tmp-killed", "old-killed"):
        d = run_dir / f".{name}.{suffix}"
        d.mkdir()
        (d / "half.onnx").write_bytes(b"x" * 100)
        made.append(d)
    tmp = run_dir / ".manifest.json.killed.tmp"
    tmp.write_text("{")
    return [*made, tmp]


@pytest.mark.parametrize("stage", [Stage.CALIBRATE, Stage.EXPORT, Stage.BUILD])
def test_leftovers_are_cleaned_when_the_stage_finds_itself_up_to_date(
    built_run, copy_run, tiny_config, stage
):
    """faults.md 4: leftovers of a killed run stayed when the next run found the stage up to date;
    now every run of the stage removes them first, whatever it then decides."""
    from sd35trt.stages.calibrate import calibrate
    from sd35trt.stages.export import export

    run_dir = copy_run(built_run)
    made = _leftovers(run_dir, stage.directory)
    lines: list[str] = []
    if stage is Stage.CALIBRATE:
        calibrate(tiny_config, run_dir, log=lines.append)
    elif stage is Stage.EXPORT:
        export(tiny_config, run_dir, progress=lines.append)
    else:
        build(tiny_config, run_dir, Backend.ONNXRUNTIME, progress=lines.append)
    assert any("up to date" in line for line in lines), lines
    assert [p for p in made if p.exists()] == []


def test_leftovers_are_cleaned_even_when_the_stage_refuses_to_run(built_run, copy_run, tiny_config):
    run_dir = copy_run(built_run)
    made = _leftovers(run_dir, Stage.BUILD.directory)
    stale = tiny_config.model_copy(
        update={"export": tiny_config.export.model_copy(update={"opset": tiny_config.export.opset + 1})}
    )
    with pytest.raises(StaleArtifactError, match=r"export\.opset 19 → 20 .* `sd35trt build --upstream`"):
        build(stale, run_dir, Backend.ONNXRUNTIME)
    assert [p for p in made if p.exists()] == []


def _too_tall(tiny_config):
    """The tiny config with build.height.max beyond the positional embedding (512 px)."""
    data = tiny_config.model_dump(mode="json")
    data["build"]["height"]["max"] = 1024
    return config_from_dict(data)


def test_config_beyond_the_positional_embedding_is_refused_before_calibration(tiny_config, tmp_path):
    """faults.md 28: refused only at export, after calibration had run; now by calibrate itself,
    before it loads the pipeline, and nothing is written but the model it read the dims from."""
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"build\.height\.max = 1024 exceeds what the positional embedding"):
        from sd35trt.stages.calibrate import calibrate

        calibrate(_too_tall(tiny_config), run_dir)
    assert not (run_dir / "calibrate").exists() and RunManifest(run_dir).get(Stage.CALIBRATE) is None


@pytest.mark.parametrize("stage", [Stage.EXPORT, Stage.BUILD])
def test_later_stages_refuse_it_too_before_doing_anything(built_run, copy_run, tiny_config, stage):
    from sd35trt.stages.export import export

    run_dir = copy_run(built_run)
    records = RunManifest(run_dir).load()
    with pytest.raises(ConfigError, match=rf"before `sd35trt {stage.value}` started"):
        (export if stage is Stage.EXPORT else build)(_too_tall(tiny_config), run_dir, force=True)
    assert RunManifest(run_dir).load() == records


def test_build_refuses_an_export_record_naming_an_onnx_outside_the_run_directory(
    built_run, copy_run, tiny_config
):
    """faults.md 20, in the run directory: an export record edited to name `../clip_l.onnx` (a
    real graph, so nothing else would stop it) is refused by build before it reads the file, and
    the published engines stay as they were."""
    run_dir = copy_run(built_run)
    outside = run_dir.parent / "clip_l.onnx"
    outside.write_bytes((run_dir / Stage.EXPORT.directory / "clip_l.onnx").read_bytes())
    data = json.loads((run_dir / "manifest.json").read_text())
    data["records"]["export"]["details"]["components"]["clip_l"]["onnx"] = "../clip_l.onnx"
    (run_dir / "manifest.json").write_text(json.dumps(data))
    engines = sorted(p.name for p in (run_dir / Stage.BUILD.directory).iterdir())
    with pytest.raises(UnsafeArtifactError, match=r"path '\.\./clip_l\.onnx' recorded in .* leaves it"):
        build(tiny_config, run_dir, Backend.ONNXRUNTIME, force=True, progress=lambda _line: None)
    assert sorted(p.name for p in (run_dir / Stage.BUILD.directory).iterdir()) == engines
