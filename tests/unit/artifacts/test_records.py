"""Typed stage records: the file format they read and write, and the errors for files that don't fit."""

import json
import re
import shutil
from pathlib import Path

import pytest
from record_fakes import build_details, calibrate_details, export_details, exported_component

from sd35trt.artifacts.files import HashCache
from sd35trt.artifacts.manifest import FORMAT_VERSION, RunManifest, Stage, new_record
from sd35trt.artifacts.records import ExportRecord, StageRecords
from sd35trt.components import Component
from sd35trt.config import Backend, Precision, sha256_json
from sd35trt.errors import ManifestError

#: A manifest written by the stage writers of format 1 before the records were typed (calibrate,
#: export and build of the tiny model, ONNX Runtime engines), byte for byte.
FORMAT_1 = Path(__file__).parents[1] / "data" / "manifest_format1.json"


def _three_records(run_dir: Path):
    """Calibrate, export and build records chained by their digests, put into ``run_dir``."""
    m = RunManifest(run_dir)
    cal = new_record(Stage.CALIBRATE, "c", [], details=calibrate_details())
    exp = new_record(Stage.EXPORT, "e", [], upstream={Stage.CALIBRATE: cal}, details=export_details())
    built = new_record(Stage.BUILD, "b", [], upstream={Stage.EXPORT: exp}, details=build_details())
    for rec in (cal, exp, built):
        m.put(rec.stage, rec)
    return cal, exp, built


def test_format_1_manifest_reads_with_every_digest_unchanged(tmp_path):
    shutil.copy(FORMAT_1, tmp_path / "manifest.json")
    raw = json.loads(FORMAT_1.read_text())["records"]
    records = RunManifest(tmp_path).load()
    assert list(records) == [Stage.CALIBRATE, Stage.EXPORT, Stage.BUILD]
    for stage, rec in records.items():
        # the typed record dumps back key for key, so downstream records still name it right
        assert rec.to_json() == raw[stage.value]
        assert rec.digest() == sha256_json(raw[stage.value])
    assert records[Stage.EXPORT].upstream == {Stage.CALIBRATE: records[Stage.CALIBRATE].digest()}
    assert records[Stage.BUILD].upstream == {Stage.EXPORT: records[Stage.EXPORT].digest()}
    transformer = records[Stage.EXPORT].details.components[Component.TRANSFORMER]
    assert transformer.quantized and transformer.onnx_unquantized == "onnx/transformer_unquantized.onnx"
    assert records[Stage.EXPORT].details.components[Component.CLIP_L].fp8_weights is None
    assert transformer.fp32_blocks is None  # recorded before export.fp32_blocks existed
    assert records[Stage.BUILD].details.backend is Backend.ONNXRUNTIME


def test_records_written_and_read_back_are_equal(tmp_path):
    written = _three_records(tmp_path)
    read = RunManifest(tmp_path).load()
    assert tuple(read.values()) == written
    assert [r.digest() for r in read.values()] == [r.digest() for r in written]
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["format"] == FORMAT_VERSION and set(data["records"]) == {"calibrate", "export", "build"}
    entries = data["records"]["export"]["details"]["components"]
    # only the transformer's entry has the unquantized-graph and fp32-block keys
    assert "onnx_unquantized" in entries["transformer"] and entries["transformer"]["onnx_unquantized"] is None
    assert entries["transformer"]["fp32_blocks"] == []
    assert not {"onnx_unquantized", "fp8_weights", "fp32_blocks"} & set(entries["clip_l"])


def test_every_stage_has_its_key_in_the_file_schema():
    assert set(StageRecords.model_fields) == {s.value for s in Stage}


def test_put_refuses_another_stages_record(tmp_path):
    rec = new_record(Stage.CALIBRATE, "c", [], details=calibrate_details())
    with pytest.raises(ValueError, match=r"a calibrate record cannot be put as the export record"):
        RunManifest(tmp_path).put(Stage.EXPORT, rec)


def _set(data: dict, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    for key in path:
        data = data[key]
    if value is _DELETE:
        del data[last]
    else:
        data[last] = value


_DELETE = object()
_TRANSFORMER = "records.export.details.components.transformer"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (f"{_TRANSFORMER}.onnx", 5, r": Input should be a valid string \(found 5\)"),
        # a list where the components' mapping belongs ('list' object has no attribute 'items' before)
        ("records.export.details.components", [], ": Input should be an object"),
        (f"{_TRANSFORMER}.quantized", "yes", ": Input should be a valid boolean"),
        # strict: a number in a string is not a number
        ("records.build.files", [{"path": "x", "size": "1", "sha256": "0"}], r"\[0\]\.size: .* integer"),
        (
            "records.build.details.backend",
            "cuda",
            ": Input should be 'auto', 'tensorrt', 'tensorrt-rtx' or 'onnxruntime'",
        ),
        ("records.calibrate.details.seeds", _DELETE, ": Field required"),
        ("records.evaluate", {}, r": unknown key \(check its spelling\)"),
        ("records.export.stage", "build", ": Input should be"),
        ("records", [], ": Input should be"),
    ],
)
def test_a_record_that_does_not_validate_is_one_line_naming_file_and_field(tmp_path, field, value, message):
    expected = re.escape(f"field {field}") + message
    _three_records(tmp_path)
    path = tmp_path / "manifest.json"
    data = json.loads(path.read_text())
    _set(data, field, value)
    path.write_text(json.dumps(data))
    m = RunManifest(tmp_path)
    for read in (
        m.load,
        lambda: m.verified(Stage.BUILD),
        lambda: m.verified(Stage.BUILD, "b", cache=HashCache(tmp_path)),
    ):
        with pytest.raises(ManifestError, match=expected) as err:
            read()
        text = str(err.value)
        assert "\n" not in text and text.startswith(f"{path}: field ")
    # and nothing is written over it
    with pytest.raises(ManifestError):
        m.put(Stage.CALIBRATE, new_record(Stage.CALIBRATE, "c", [], details=calibrate_details()))
    assert json.loads(path.read_text()) == data


@pytest.mark.parametrize("content", [b"{", b"\xff{}", b"[]", b'{"format": 0, "records": {}}'])
def test_unreadable_or_other_format_manifest_is_one_line(tmp_path, content):
    (tmp_path / "manifest.json").write_bytes(content)
    with pytest.raises(ManifestError) as err:
        RunManifest(tmp_path).load()
    assert "\n" not in str(err.value) and "re-run the stages" in str(err.value)


def test_details_of_the_wrong_stage_are_a_bug_not_a_record():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        new_record(Stage.EXPORT, "e", [], details=calibrate_details())


def test_exported_component_keeps_its_types():
    entry = exported_component(Component.TRANSFORMER, precision="bf16", quantized=True)
    assert entry.precision is Precision.BF16 and entry.fp8_weights is False
    rec = new_record(Stage.EXPORT, "e", [], details=export_details(components={Component.TRANSFORMER: entry}))
    assert isinstance(rec, ExportRecord) and rec.details.components[Component.TRANSFORMER] == entry


def test_a_fingerprint_names_exactly_what_changed():
    """Issue 26.5: a stale record names the values that changed, not every section it depends on."""
    from sd35trt.artifacts.records import Fingerprint
    from sd35trt.config import config_from_dict

    data = {"name": "t", "model": {"loras": [{"path": "a.safetensors", "scale": 1.0}]}}
    base = config_from_dict(data)
    data["model"]["loras"][0]["scale"] = 0.5
    rescaled = config_from_dict(data)
    identity = {"loras": [{"sha256": "ab" * 32}]}
    old, new = (Fingerprint.of(c, Stage.EXPORT, identity) for c in (base, rescaled))
    assert old.digest != new.digest
    assert new.changes(old.inputs) == "model.loras[0].scale 1.0 → 0.5"
    assert new.changes(new.inputs) is None and new.changes(None) is None
    other_bytes = Fingerprint.of(base, Stage.EXPORT, {"loras": [{"sha256": "cd" * 32}]})
    assert other_bytes.changes(old.inputs).startswith('weights.loras[0].sha256 "abab')
    # Build keys on whether CFG is on by default, not on the guidance value.
    guided = base.model_copy(update={"runtime": base.runtime.model_copy(update={"guidance_scale": 7.0})})
    no_cfg = base.model_copy(update={"runtime": base.runtime.model_copy(update={"guidance_scale": 1.0})})
    build = Fingerprint.of(base, Stage.BUILD)
    assert Fingerprint.of(guided, Stage.BUILD).digest == build.digest
    assert Fingerprint.of(no_cfg, Stage.BUILD).changes(build.inputs) == "cfg_by_default true → false"


def test_records_keep_their_inputs_and_older_records_without_them_keep_their_digest(tmp_path):
    from sd35trt.artifacts.records import Fingerprint
    from sd35trt.config import Config

    fingerprint = Fingerprint.of(Config(name="t"), Stage.CALIBRATE)
    rec = new_record(Stage.CALIBRATE, fingerprint, [], details=calibrate_details())
    assert rec.inputs == fingerprint.inputs and "inputs" in rec.to_json()
    old = new_record(Stage.CALIBRATE, fingerprint.digest, [], details=calibrate_details())
    assert old.inputs is None and "inputs" not in old.to_json()
    RunManifest(tmp_path).put(Stage.CALIBRATE, rec)
    assert RunManifest(tmp_path).get(Stage.CALIBRATE) == rec
