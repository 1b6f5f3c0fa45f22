"""The deployment artefact: pack, verify, tamper, unpack elsewhere."""

import json
import shutil
import tarfile

import pytest

from sd35trt.backends.machine import GpuInfo, MachineInfo
from sd35trt.errors import VerificationError
from sd35trt.stages.package import CHECKSUMS, engines_dir_of, package, unpack, verify


@pytest.fixture(scope="module")
def artefact(built_run, tmp_path_factory):
    return package(built_run, tmp_path_factory.mktemp("art") / "tiny.tar.gz")


def _unpacked(artefact, tmp_path):
    return unpack(artefact, tmp_path / "unpacked")


def test_packed_artefact_verifies_and_unpacks_to_engines(artefact, tmp_path):
    report = verify(artefact)
    assert report.ok, report.problems
    assert report.files_checked > 5
    root = _unpacked(artefact, tmp_path)
    assert (root / CHECKSUMS).is_file() and (root / "engines" / "config.yaml").is_file()
    assert engines_dir_of(root) == root / "engines"
    assert verify(root).ok
    from sd35trt.info import format_manifest  # `sd35trt inspect` of the unpacked artefact: its engines

    assert format_manifest(root).startswith(f"engines {root / 'engines'} (onnxruntime")


def test_artefact_file_gets_the_umask_mode_not_mkstemps_0600(artefact):
    """A copied artefact must be readable by the service user that serves it."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    assert artefact.stat().st_mode & 0o777 == 0o666 & ~mask


def test_flipped_byte_missing_and_extra_files_each_named(artefact, tmp_path):
    root = _unpacked(artefact, tmp_path)
    engine = next((root / "engines").glob("transformer*.onnx"))
    data = bytearray(engine.read_bytes())
    data[len(data) // 2] ^= 0xFF
    engine.write_bytes(bytes(data))
    (root / "engines" / "scheduler" / "scheduler_config.json").unlink()
    (root / "engines" / "notes.txt").write_text("stray")
    problems = "\n".join(verify(root).problems)
    assert f"engines/{engine.name} sha256 does not match" in problems
    assert "engines/scheduler/scheduler_config.json is missing" in problems
    assert "engines/notes.txt is an unexpected file" in problems


def _as_tensorrt(root, cc, version):
    """Rewrite the manifest as if the engines had been built by TensorRT on another machine."""
    m = root / "engines" / "manifest.json"
    data = json.loads(m.read_text())
    data["backend"] = "tensorrt"
    for rec in data["engines"].values():
        rec.update(backend="tensorrt", tensorrt_version=version, compute_capability=cc, gpu_name="H100")
    m.write_text(json.dumps(data))
    # Keep the checksum file in step so only the machine check can fail.
    from sd35trt.artifacts.files import sha256_file

    lines = [
        f"{sha256_file(m)}  engines/manifest.json" if line.endswith("  engines/manifest.json") else line
        for line in (root / CHECKSUMS).read_text().splitlines()
    ]
    (root / CHECKSUMS).write_text("\n".join(lines) + "\n")


def test_manifest_for_another_gpu_or_tensorrt_version_is_named(artefact, tmp_path):
    root = _unpacked(artefact, tmp_path)
    _as_tensorrt(root, [9, 0], "11.4.0")
    ada = MachineInfo(tensorrt_version="11.4.0", gpu=GpuInfo("L40S", (8, 9)))
    problems = " ".join(verify(root, machine=ada).problems)
    assert "built for sm_90 / TensorRT 11.4.0, this GPU is sm_89 / TensorRT 11.4.0" in problems
    hopper_new_trt = MachineInfo(tensorrt_version="11.5.1", gpu=GpuInfo("H100", (9, 0)))
    problems = " ".join(verify(root, machine=hopper_new_trt).problems)
    assert "built for sm_90 / TensorRT 11.4.0, this GPU is sm_90 / TensorRT 11.5.1" in problems
    same = MachineInfo(tensorrt_version="11.4.0", gpu=GpuInfo("H100", (9, 0)))
    assert verify(root, machine=same).ok


def test_unsafe_archive_refused(tmp_path):
    evil = tmp_path / "evil.tar.gz"
    payload = tmp_path / "p"
    payload.write_text("x")
    with tarfile.open(evil, "w:gz") as tar:
        tar.add(payload, arcname="top/../../escape.txt")
    with pytest.raises(VerificationError, match="absolute or leaves the archive"):
        unpack(evil, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()
    assert "absolute or leaves the archive" in verify(evil).problems[0]


def test_engines_directory_of_a_built_run_verifies(built_run):
    """`sd35trt verify ENGINES_DIR` (and a run directory): checked against the engine manifest."""
    for path in (built_run / "engines", built_run):
        report = verify(path)
        assert report.ok, report.problems
        assert report.files_checked >= 10


def test_artefact_starts_with_its_index_files(artefact):
    """`unpack` reads the sizes before any other member: SHA256SUMS, then the engine manifest."""
    with tarfile.open(artefact) as tar:
        names = tar.getnames()
    assert [n.split("/", 1)[1] for n in names[:2]] == [CHECKSUMS, "engines/manifest.json"]


def test_package_refuses_unbuilt_run(tmp_path, built_run):
    from sd35trt.errors import ManifestError

    shutil.copytree(built_run, tmp_path / "r", symlinks=True)
    (tmp_path / "r" / "manifest.json").unlink()
    with pytest.raises(ManifestError, match="no build record"):
        package(tmp_path / "r", tmp_path / "x.tar.gz")
    assert not (tmp_path / "x.tar.gz").exists()


@pytest.mark.parametrize("kind", ["missing", "not a run"])
def test_package_of_a_folder_that_is_not_a_run_writes_nothing_beside_it(tmp_path, kind):
    """A missing folder or one without a run manifest is one line, before the run lock's file
    (``.NAME.sd35trt-lock``) would be written beside it."""
    from sd35trt.errors import ManifestError

    target = tmp_path / "notrun"
    if kind == "not a run":
        target.mkdir()
        (target / "notes.txt").write_text("mine")
    expected = "does not exist" if kind == "missing" else "has no manifest.json"
    with pytest.raises(ManifestError, match=expected):
        package(target, tmp_path / "x.tar.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == (["notrun"] if kind == "not a run" else [])
