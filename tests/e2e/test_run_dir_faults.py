"""The stage driver under the faults it fixes once for every stage, recreated for real.

faults.md #29 (a ``--run-dir`` that is a user's folder or an engines directory), #30 (a same-size
edit with ``touch -r``, bit rot), #31 (a stage run from another working directory), #32 (a stray
file when packaging, a read-only run directory), and issue 26.5 (stale messages name what changed
and the one command that brings the chain up to date; runtime defaults rebuild nothing). Every
test asserts the user's files survive. Damaging tests work on a copy of the shared run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
import yaml

from sd35trt.artifacts.engine_manifest import read_engine_manifest
from sd35trt.artifacts.files import HashCache
from sd35trt.artifacts.manifest import RunManifest, Stage
from sd35trt.artifacts.records import Fingerprint
from sd35trt.config import Backend, config_from_dict
from sd35trt.errors import ModelError, VerificationError
from sd35trt.stages.build import build
from sd35trt.stages.package import package, verify

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TINY_YAML = REPO / "configs" / "tiny.yaml"
NOBODY = 65534


def _env(home: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "SD35TRT_DEBUG"} | {"PYTHONPATH": str(REPO)}
    return env | ({"HOME": str(home)} if home is not None else {})


def _cli(*args: str | Path, cwd: Path = REPO, user: int | None = None, home: Path | None = None):
    """``sd35trt ARGS`` in a real process (as ``user`` through ``setpriv`` when given)."""
    cmd = [sys.executable, "-m", "sd35trt.cli", *map(str, args)]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return subprocess.run(cmd, cwd=cwd, env=_env(home), capture_output=True, text=True, timeout=600)


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def _tree(root: Path) -> dict[str, bytes]:
    """Every file below ``root`` with its bytes (what "nothing removed or added" compares)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _stage_args(stage: str, run_dir: Path) -> list:
    return [stage, "--config", TINY_YAML, "--run-dir", run_dir]


# -- faults.md #29 --------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["calibrate", "export", "build"])
def test_a_users_folder_as_run_dir_is_refused_and_nothing_is_removed(tmp_path, stage):
    """Before: calibrate, export and build silently deleted the folder's calibrate/, model/, onnx/
    and engines/ (export deleted model/, then failed with "no calibrate record")."""
    folder = tmp_path / "photos"
    for rel in ("calibrate/notes.txt", "model/keep.bin", "onnx/graph.onnx", "engines/plan.bin", "todo.txt"):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(f"the user's {rel}".encode())
    before = _tree(folder)
    proc = _cli(*_stage_args(stage, folder))
    _one_line_error(proc, f"--run-dir {folder} holds calibrate, engines, model", "not a run directory")
    assert _tree(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # no lock file beside it either


@pytest.mark.parametrize("stage", ["calibrate", "export", "build"])
def test_an_engines_directory_as_run_dir_names_engines_and_gets_nothing_added(built_run, copy_run, stage):
    """Before: every stage advised deleting the engine manifest; export first wrote a 2 MB model/
    into the engines directory, which verify then rejected and package shipped."""
    engines = copy_run(built_run) / Stage.BUILD.directory
    before = _tree(engines)
    proc = _cli(*_stage_args(stage, engines))
    _one_line_error(proc, f"--run-dir {engines} is an engines directory", f"--engines {engines}")
    assert _tree(engines) == before


def test_package_of_an_engines_directory_says_so_in_one_line_and_writes_nothing(
    built_run, copy_run, tmp_path
):
    """Before: `sd35trt package ENGINES_DIR` answered a schema error about the engine manifest."""
    run_dir = copy_run(built_run)
    engines = run_dir / Stage.BUILD.directory
    before = _tree(run_dir)
    out = tmp_path / "out" / "a.tar.gz"
    proc = _cli("package", engines, "--out", out)
    _one_line_error(
        proc, f"{engines} is an engines directory", f"(this one's is {run_dir})", f"--engines {engines}"
    )
    assert _tree(run_dir) == before and not out.parent.exists()
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(p.name for p in built_run.iterdir())


def test_package_of_an_unpacked_artefact_names_its_engines(built_run, tmp_path):
    from sd35trt.stages.package import unpack

    unpacked = unpack(package(built_run, tmp_path / "a.tar.gz"), tmp_path / "unpacked")
    top = unpacked.parent if unpacked.name == Stage.BUILD.directory else unpacked
    proc = _cli("package", top, "--out", tmp_path / "b.tar.gz")
    _one_line_error(proc, f"{top} is an engines directory (or an unpacked artefact)", "--engines")
    assert not (tmp_path / "b.tar.gz").exists()


# -- faults.md #30 --------------------------------------------------------------------------------


def _edit_keeping_size_and_mtime(path: Path) -> None:
    """Flip one byte in place and put the mtime back, as ``touch -r`` does."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns, path.stat().st_ino) == (
        st.st_size,
        st.st_mtime_ns,
        st.st_ino,
    )


def test_a_same_size_edit_with_touch_r_is_stale_for_every_command(built_run, copy_run, tiny_config, tmp_path):
    """Before: the hash cache (size, mtime, inode) made build say "up to date" while run and package
    said "rebuild with `sd35trt build`", a loop. The ctime in the key sees the edit."""
    run_dir = copy_run(built_run)
    lines: list[str] = []
    build(tiny_config, run_dir, Backend.ONNXRUNTIME, progress=lines.append)  # hashes into the cache
    assert any("up to date" in line for line in lines)
    _edit_keeping_size_and_mtime(run_dir / Stage.BUILD.directory / "vae_decoder.onnx")
    lines.clear()
    build(tiny_config, run_dir, Backend.ONNXRUNTIME, progress=lines.append)
    assert not any("up to date" in line for line in lines), lines
    out = package(run_dir, tmp_path / "a.tar.gz")  # the engines agree with the record again
    assert verify(out).ok, verify(out).problems


def test_bit_rot_under_the_cache_is_rebuilt_after_the_first_full_check(
    built_run, copy_run, tiny_config, tmp_path
):
    """Bit rot changes no metadata, so no cache key can see it: the first command that hashes the
    bytes (run, package, verify) refuses and drops the cached digest, and build then agrees."""
    from sd35trt.run import run

    run_dir = copy_run(built_run)
    engine = run_dir / Stage.BUILD.directory / "vae_decoder.onnx"
    build(tiny_config, run_dir, Backend.ONNXRUNTIME, progress=lambda _line: None)
    cached = json.loads((run_dir / HashCache.NAME).read_text())[str(engine.absolute())]
    _edit_keeping_size_and_mtime(engine)
    st = engine.stat()  # what rot would leave: the cache's stamp still matches the file
    cache = json.loads((run_dir / HashCache.NAME).read_text())
    cache[str(engine.absolute())] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, cached[4]]
    (run_dir / HashCache.NAME).write_text(json.dumps(cache))

    with pytest.raises(VerificationError, match=r"vae_decoder\.onnx .*rebuild with `sd35trt build`"):
        run(run_dir / Stage.BUILD.directory, "a cat", num_inference_steps=1, out=tmp_path / "x.png")
    lines: list[str] = []
    build(tiny_config, run_dir, Backend.ONNXRUNTIME, progress=lines.append)  # the advice given works
    assert not any("up to date" in line for line in lines), lines
    run(run_dir / Stage.BUILD.directory, "a cat", num_inference_steps=1, out=tmp_path / "x.png")


# -- faults.md #31 --------------------------------------------------------------------------------


def test_records_hold_paths_relative_to_the_run_directory(tiny_config, tmp_path, monkeypatch):
    """Before: export recorded model_dir relative to where it ran; `build --force` from another
    directory failed ("runs/tiny/model/tokenizer is missing") or took another run's tokenizers."""
    from sd35trt.stages.export import export

    config = tiny_config.model_copy(
        update={"export": tiny_config.export.model_copy(update={"quantize": False})}
    )
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    monkeypatch.chdir(here)
    export(config, Path("runs/tiny"), progress=lambda _line: None)
    run_dir = here / "runs" / "tiny"
    details = RunManifest(run_dir).get(Stage.EXPORT).details
    assert details.model_dir == Path("model") and details.model.directory == "model"

    # Another run's model at the same relative path from the other directory.
    other = elsewhere / "runs" / "tiny" / "model"
    shutil.copytree(run_dir / "model", other)
    for vocab in other.glob("tokenizer*/*.json"):
        vocab.write_text("{}")
    monkeypatch.chdir(elsewhere)
    build(config, Path("../here/runs/tiny"), Backend.ONNXRUNTIME, force=True, progress=lambda _line: None)
    for sub in ("tokenizer", "tokenizer_2", "tokenizer_3", "scheduler"):
        assert _tree(run_dir / "engines" / sub) == _tree(run_dir / "model" / sub), sub

    # A record an older export wrote (relative to where it ran) still builds from there, and from
    # elsewhere is refused with the fix instead of reading the other run's files.
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["records"]["export"]["details"]["model_dir"] = "runs/tiny/model"
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match=r"model_dir runs/tiny/model, which is not inside .* --force"):
        build(config, Path("../here/runs/tiny"), Backend.ONNXRUNTIME, force=True, progress=lambda _line: None)
    monkeypatch.chdir(here)
    build(config, Path("runs/tiny"), Backend.ONNXRUNTIME, force=True, progress=lambda _line: None)
    assert _tree(run_dir / "engines" / "tokenizer") == _tree(run_dir / "model" / "tokenizer")


# -- faults.md #32 --------------------------------------------------------------------------------


def test_package_ships_what_the_manifest_declares_and_leaves_a_stray_out(built_run, copy_run, tmp_path):
    """Before: a stray file in engines/ was shipped, and verify then refused the artefact."""
    run_dir = copy_run(built_run)
    stray = run_dir / Stage.BUILD.directory / "notes.txt"
    stray.write_text("the user's notes")
    out = package(run_dir, tmp_path / "a.tar.gz")
    with tarfile.open(out) as tar:
        names = tar.getnames()
    assert not any(name.endswith("notes.txt") for name in names), names
    report = verify(out)
    assert report.ok, report.problems
    assert stray.read_text() == "the user's notes"


def _set_writable(root: Path, writable: bool) -> None:
    for p in [root, *root.rglob("*")]:
        if p.is_symlink():
            continue
        mode = (0o755 if p.is_dir() else 0o644) if writable else (0o555 if p.is_dir() else 0o444)
        p.chmod(mode)


@pytest.mark.skipif(
    os.geteuid() == 0 and shutil.which("setpriv") is None, reason="as root, needs setpriv to drop privileges"
)
def test_a_read_only_run_directory_is_one_line_naming_the_path(built_run):
    """Before: build (even up to date), calibrate and package printed a traceback on the lock."""
    base = Path(tempfile.mkdtemp(prefix="sd35trt-readonly-"))
    user = NOBODY if os.geteuid() == 0 else None  # root writes anywhere: run the commands as nobody
    try:
        runs = base / "runs"
        run_dir = runs / "tiny"
        shutil.copytree(built_run, run_dir, symlinks=True)
        (base / "out").mkdir()
        (base / "home").mkdir()
        for writable in (base, base / "out", base / "home"):
            writable.chmod(0o777)
        _set_writable(runs, writable=False)
        before = _tree(runs)
        commands = (
            [*_stage_args("build", run_dir), "--backend", "onnxruntime"],
            [*_stage_args("build", run_dir), "--backend", "onnxruntime", "--force"],
            _stage_args("calibrate", run_dir),
            ["package", run_dir, "--out", base / "out" / "a.tar.gz"],
        )
        for args in commands:
            _one_line_error(_cli(*args, user=user, home=base / "home"), f"cannot write {runs}")
        # Only the run directory read-only (its parent, where the lock lives, writable): an up to
        # date build needs to write nothing; a rebuild is one line naming where it could not write.
        runs.chmod(0o777)
        up_to_date = _cli(*commands[0], user=user, home=base / "home")
        assert up_to_date.returncode == 0 and "up to date" in up_to_date.stderr + up_to_date.stdout
        _one_line_error(_cli(*commands[1], user=user, home=base / "home"), f"cannot write {run_dir}")
        assert {k: v for k, v in _tree(runs).items() if "sd35trt-lock" not in k} == before
    finally:
        _set_writable(base, writable=True)
        shutil.rmtree(base, ignore_errors=True)


# -- issue 26.5 -----------------------------------------------------------------------------------


def _changed(config, **runtime):
    data = config.model_dump(mode="json")
    data["runtime"].update(runtime)
    return config_from_dict(data)


def test_a_runtime_default_updates_the_engines_without_rebuilding_them(
    built_run, copy_run, tiny_config, tmp_path
):
    """Before: build's digest covered the whole runtime section: a new default step count rebuilt
    every engine. Now only what shapes the engines does (T5 length, CFG on by default)."""
    run_dir = copy_run(built_run)
    engines = run_dir / Stage.BUILD.directory
    stamps = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in engines.glob("*.onnx")}
    steps = tiny_config.runtime.num_inference_steps
    changed = _changed(tiny_config, num_inference_steps=steps + 3, guidance_scale=6.0)
    lines: list[str] = []
    build(changed, run_dir, Backend.ONNXRUNTIME, progress=lines.append)
    assert any("up to date" in line for line in lines), lines
    note = next(line for line in lines if "runtime defaults updated" in line)
    assert f"runtime.num_inference_steps {steps} → {steps + 3}" in note and "runtime.guidance_scale" in note
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in engines.glob("*.onnx")} == stamps
    defaults = read_engine_manifest(engines).runtime_defaults
    assert (defaults.num_inference_steps, defaults.guidance_scale) == (steps + 3, 6.0)
    assert (
        yaml.safe_load((engines / "config.yaml").read_text())["runtime"]["num_inference_steps"] == steps + 3
    )
    RunManifest(run_dir).verified(Stage.BUILD, Fingerprint.of(changed, Stage.BUILD))  # record == files
    assert verify(package(run_dir, tmp_path / "a.tar.gz")).ok

    # CFG off by default halves the transformer's optimal batch: that one is a rebuild.
    lines.clear()
    build(_changed(changed, guidance_scale=1.0), run_dir, Backend.ONNXRUNTIME, progress=lines.append)
    assert not any("up to date" in line for line in lines), lines


def test_stale_chain_names_what_changed_and_one_command_brings_it_up_to_date(built_run, copy_run, tmp_path):
    """Before: "config sections [model, export, runtime.max_sequence_length,
    runtime.skip_layer_guidance.layers] changed", fixed by re-running stages by hand."""
    run_dir = copy_run(built_run)
    data = yaml.safe_load(TINY_YAML.read_text())
    data["runtime"]["skip_layer_guidance"]["layers"] = [0]
    config = tmp_path / "tiny-slg0.yaml"
    config.write_text(yaml.safe_dump(data))
    args = ["build", "--config", config, "--run-dir", run_dir, "--backend", "onnxruntime"]
    line = _one_line_error(_cli(*args), "runtime.skip_layer_guidance.layers [1] → [0]")
    assert line.endswith(
        f"bring the chain up to date with `sd35trt build --upstream --config {config} --run-dir {run_dir}`"
    )
    assert "[model, export" not in line
    chained = _cli(*args, "--upstream")
    assert chained.returncode == 0, chained.stderr
    again = _cli(*args)
    assert again.returncode == 0 and "is up to date" in again.stderr + again.stdout, again.stderr
    assert verify(run_dir / Stage.BUILD.directory).ok
