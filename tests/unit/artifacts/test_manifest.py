import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from record_fakes import details

from sd35trt.artifacts.files import records_for_tree, verify_files
from sd35trt.artifacts.manifest import RunManifest, Stage, new_record, staged_directory
from sd35trt.config import Config
from sd35trt.errors import ManifestError, StaleArtifactError, VerificationError


def _publish(run_dir: Path, stage: Stage, digest: str, upstream=None, payload=b"weights"):
    with staged_directory(run_dir, stage.directory) as tmp:
        (tmp / "a.bin").write_bytes(payload)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.json").write_text("{}")
    files = records_for_tree(run_dir, stage.directory)
    rec = new_record(stage, digest, files, upstream=upstream, details=details(stage))
    RunManifest(run_dir).put(stage, rec)
    return rec


def test_flipped_byte_truncation_and_missing_file_are_named(tmp_path):
    _publish(tmp_path, Stage.CALIBRATE, "d")
    m = RunManifest(tmp_path)
    m.verified(Stage.CALIBRATE, "d")  # intact: passes
    f = tmp_path / "calibrate" / "a.bin"
    data = bytearray(f.read_bytes())
    data[3] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match=r"calibrate/a\.bin sha256 .* \(modified\)"):
        m.verified(Stage.CALIBRATE, "d")
    f.write_bytes(bytes(data[:-2]))
    with pytest.raises(VerificationError, match=r"a\.bin has 5 bytes, the manifest records 7"):
        m.verified(Stage.CALIBRATE, "d")
    f.unlink()
    (tmp_path / "calibrate" / "sub" / "b.json").write_text("{ }")
    with pytest.raises(VerificationError) as e:
        m.verified(Stage.CALIBRATE, "d")
    # Every problem is reported, not only the first.
    assert "a.bin is missing" in str(e.value) and "b.json" in str(e.value)


def test_relative_run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rec = _publish(Path("runs") / "rel", Stage.CALIBRATE, "d")
    assert {f.path for f in rec.files} == {"calibrate/a.bin", "calibrate/sub/b.json"}
    RunManifest(Path("runs") / "rel").verified(Stage.CALIBRATE, "d")


def test_missing_record_names_the_stage_to_run(tmp_path):
    with pytest.raises(ManifestError, match=r"no calibrate record.*calibrate --config c\.yaml` first"):
        RunManifest(tmp_path).verified(Stage.CALIBRATE, "d", hint="--config c.yaml")


def test_stale_config_and_stale_upstream(tmp_path):
    cal = _publish(tmp_path, Stage.CALIBRATE, "d1")
    _publish(tmp_path, Stage.EXPORT, "e1", upstream={Stage.CALIBRATE: cal})
    m = RunManifest(tmp_path)
    m.verified(Stage.EXPORT, "e1")
    stale = r"config sections \[model, export, runtime\.max_sequence_length, .*\] changed"
    with pytest.raises(StaleArtifactError, match=stale):
        m.verified(Stage.EXPORT, "e2")
    _publish(tmp_path, Stage.CALIBRATE, "d2", payload=b"other weights")  # calibrate re-ran
    with pytest.raises(
        StaleArtifactError, match=r"made from an older calibrate output; re-run `sd35trt export`"
    ):
        m.verified(Stage.EXPORT, "e1")


def test_failed_stage_leaves_previous_output_untouched(tmp_path):
    _publish(tmp_path, Stage.CALIBRATE, "d")
    before = (tmp_path / "calibrate" / "a.bin").read_bytes()
    with pytest.raises(RuntimeError), staged_directory(tmp_path, "calibrate") as tmp:
        (tmp / "a.bin").write_bytes(b"half")
        raise RuntimeError("boom")
    assert (tmp_path / "calibrate" / "a.bin").read_bytes() == before
    assert not list(tmp_path.glob(".calibrate.*"))
    RunManifest(tmp_path).verified(Stage.CALIBRATE, "d")


_WRITER = """
import sys, time
from pathlib import Path
from sd35trt.artifacts.manifest import staged_directory
with staged_directory(Path(sys.argv[1]), "onnx") as tmp:
    with open(tmp / "model.onnx", "wb") as f:
        f.write(b"x" * 1000)
        f.flush()
        print("writing", flush=True)
        time.sleep(60)
"""


def test_writer_killed_mid_write_leaves_nothing_final_and_is_cleaned(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert not (tmp_path / "onnx").exists()
    assert list(tmp_path.glob(".onnx.tmp-*")), "the killed writer's temporary directory should be there"
    assert RunManifest(tmp_path).get(Stage.EXPORT) is None
    # The next run of the same stage removes the leftovers and publishes normally.
    with staged_directory(tmp_path, "onnx") as tmp:
        (tmp / "model.onnx").write_bytes(b"ok")
    assert not list(tmp_path.glob(".onnx.tmp-*"))
    assert (tmp_path / "onnx" / "model.onnx").read_bytes() == b"ok"


_MANIFEST_WRITER = """
import sys
from record_fakes import calibrate_details
from sd35trt.artifacts.manifest import RunManifest, Stage, new_record
m = RunManifest(sys.argv[1])
i = 0
details = calibrate_details(prompts_file="y" * 200000)
print("ready", flush=True)
while True:
    m.put(Stage.CALIBRATE, new_record(Stage.CALIBRATE, str(i), [], details=details))
    i += 1
"""


def test_manifest_killed_during_writes_stays_valid(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", _MANIFEST_WRITER, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[3] / "tests" / "helpers",  # imports record_fakes
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(1.0)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    data = json.loads((tmp_path / "manifest.json").read_text())  # never a half-written JSON
    assert int(data["records"]["calibrate"]["config_digest"]) >= 0
    assert RunManifest(tmp_path).get(Stage.CALIBRATE).details.prompts_file == "y" * 200000


def test_verify_files_accepts_matching_records(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_bytes(b"abc")
    recs = records_for_tree(tmp_path, "d")
    assert [r.path for r in recs] == ["d/x"]
    assert recs[0].sha256 == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    verify_files(tmp_path, recs)


def test_config_digest_matches_stage_sections():
    cfg = Config(name="t")
    assert cfg.digest(*Stage.CALIBRATE.config_sections) != cfg.digest(*Stage.EXPORT.config_sections)


def _fresh(run: Path, digest: str) -> bool:
    from sd35trt.artifacts.files import HashCache

    try:
        RunManifest(run).verified(Stage.EXPORT, digest, cache=HashCache(run))
    except VerificationError:
        return False
    return True


def test_freshness_checks_do_not_rehash_unchanged_files_but_see_changes(tmp_path, monkeypatch):
    """Issue 13 point 6: `make` chains check freshness from (size, mtime, ctime, inode); loads hash fully."""
    import hashlib

    from sd35trt.artifacts.files import HashCache

    run = tmp_path / "run"
    (run / "onnx").mkdir(parents=True)
    big = run / "onnx" / "model.onnx"
    big.write_bytes(os.urandom(1 << 20))
    digest = Config(name="x").digest(*Stage.EXPORT.config_sections)
    record = new_record(Stage.EXPORT, digest, records_for_tree(run, "onnx"), details=details(Stage.EXPORT))
    RunManifest(run).put(Stage.EXPORT, record)
    hashed = []
    real = hashlib.sha256

    def counting(data=b"", **kw):
        h = real(data, **kw)
        hashed.append(len(data))
        update = h.update
        return type(
            "H", (), {"update": lambda s, d: hashed.append(len(d)) or update(d), "hexdigest": h.hexdigest}
        )()

    monkeypatch.setattr(hashlib, "sha256", counting)
    assert _fresh(run, digest)  # first check hashes and remembers
    first = sum(hashed)
    assert first >= 1 << 20 and (run / HashCache.NAME).is_file()
    hashed.clear()
    assert _fresh(run, digest) and sum(hashed) == 0  # unchanged: nothing rehashed
    data = bytearray(big.read_bytes())
    data[7] ^= 1
    before = big.stat()
    big.write_bytes(bytes(data))  # same size, and the mtime put back as `touch -r` does (faults.md #30)
    os.utime(big, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert big.stat().st_mtime_ns == before.st_mtime_ns and big.stat().st_ino == before.st_ino
    assert not _fresh(run, digest)  # the ctime moved: rehashed
    hashed.clear()
    with pytest.raises(VerificationError, match=r"model\.onnx sha256"):
        RunManifest(run).verified(Stage.EXPORT, digest)  # without a cache: always hashed
    assert sum(hashed) >= 1 << 20


@pytest.mark.parametrize(
    ("field", "value"), [("negative_prompt", "blurry, low quality"), ("max_sequence_length", 128)]
)
def test_calibration_is_stale_when_the_runtime_text_encoding_changes(field, value):
    # calibration encodes its prompts with the runtime's negative prompt and T5 length
    cfg = Config(name="t")
    changed = cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={field: value})})
    assert cfg.digest(*Stage.CALIBRATE.config_sections) != changed.digest(*Stage.CALIBRATE.config_sections)
    other = cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"guidance_scale": 7.0})})
    assert cfg.digest(*Stage.CALIBRATE.config_sections) == other.digest(*Stage.CALIBRATE.config_sections)
