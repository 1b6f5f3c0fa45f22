"""Engine verification against fabricated manifests and fabricated machines (faults.md cases 1-3)."""

import json
import sys
from pathlib import Path

import pytest
from record_fakes import ENGINE_DIMS

from sd35trt.artifacts.engine_manifest import (
    ENGINE_MANIFEST_NAME,
    EngineManifest,
    EngineRecord,
    read_engine_manifest,
)
from sd35trt.artifacts.files import file_record
from sd35trt.artifacts.manifest import FileRecord
from sd35trt.backends.load import open_engines, verify_engines
from sd35trt.backends.machine import GpuInfo, MachineInfo
from sd35trt.backends.tensorrt import TrtEngine
from sd35trt.components import Component, ShapeRange
from sd35trt.config import Backend, Precision
from sd35trt.errors import BackendUnavailableError, IncompatibleEngineError, ManifestError, VerificationError

DIMS = ENGINE_DIMS
H100 = GpuInfo("NVIDIA H100 80GB HBM3", (9, 0))
L4 = GpuInfo("NVIDIA L4", (8, 9))
REBUILD = "rebuild with `sd35trt build`"


def _engines_dir(
    root: Path,
    backend: Backend = Backend.TENSORRT,
    cc: tuple[int, int] | None = (9, 0),
    version: str | None = "11.4.0",
) -> Path:
    """An engines directory as a build on an H100 with TensorRT 11.4.0 would leave it."""
    out = root / "engines"
    out.mkdir()
    suffix = ".plan" if backend is Backend.TENSORRT else ".onnx"
    engines = {}
    for i, component in enumerate((Component.TRANSFORMER, Component.VAE_DECODER)):
        path = out / f"{component.value}{suffix}"
        path.write_bytes(bytes(range(256)) * (8 + i))  # stands in for a plan: never deserialized here
        engines[component] = EngineRecord(
            backend=backend,
            file=file_record(out, path),
            precision=Precision.BF16,
            fp8=component is Component.TRANSFORMER,
            profile={"latent": ShapeRange((1, 4, 4, 4), (1, 4, 8, 8), (2, 4, 16, 16))},
            source_onnx=FileRecord(f"onnx/{component.value}.onnx", 10, "0" * 64),
            build_seconds=1.5,
            tensorrt_version=version if backend is Backend.TENSORRT else None,
            gpu_name=H100.name if backend is Backend.TENSORRT else None,
            compute_capability=cc if backend is Backend.TENSORRT else None,
        )
    (out / "tokenizer").mkdir()
    (out / "tokenizer" / "vocab.json").write_text('{"a": 0}')
    (out / "scheduler").mkdir()
    (out / "scheduler" / "scheduler_config.json").write_text('{"shift": 3.0}')
    manifest = EngineManifest(
        directory=out,
        backend=backend,
        engines=engines,
        dims=DIMS,
        runtime_defaults={"num_inference_steps": 8},
        build_settings={"backend": backend.value},
        support_files=(
            file_record(out, out / "tokenizer" / "vocab.json"),
            file_record(out, out / "scheduler" / "scheduler_config.json"),
        ),
    )
    (out / ENGINE_MANIFEST_NAME).write_text(json.dumps(manifest.to_json()))
    return out


def test_compatible_machine_passes_and_manifest_round_trips(tmp_path):
    out = _engines_dir(tmp_path)
    m = verify_engines(out, machine=MachineInfo("11.4.0", H100))
    assert set(m.engines) == {Component.TRANSFORMER, Component.VAE_DECODER}
    rec = m.record(Component.TRANSFORMER)
    assert (rec.compute_capability, rec.tensorrt_version, rec.fp8) == ((9, 0), "11.4.0", True)
    assert m.spec(Component.VAE_DECODER).input_names == ["latent"]
    assert read_engine_manifest(out) == m and m.directory == out
    assert json.loads((out / ENGINE_MANIFEST_NAME).read_text()) == m.to_json()  # written through the model
    assert isinstance(m.runtime_defaults.num_inference_steps, int)  # typed, not a mapping


def test_other_compute_capability_is_refused_before_loading(tmp_path):
    out = _engines_dir(tmp_path)
    l4 = MachineInfo("11.4.0", L4)
    with pytest.raises(IncompatibleEngineError) as e:
        verify_engines(out, components=[Component.TRANSFORMER], machine=l4)
    assert str(e.value) == (
        "engine transformer.plan was built for sm_90 / TensorRT 11.4.0, "
        f"this GPU is sm_89 / TensorRT 11.4.0: {REBUILD}"
    )
    with pytest.raises(IncompatibleEngineError) as e:
        verify_engines(out, machine=l4)
    assert str(e.value) == (
        "engines transformer.plan, vae_decoder.plan were built for sm_90 / TensorRT 11.4.0, "
        f"this GPU is sm_89 / TensorRT 11.4.0: {REBUILD}"
    )


@pytest.mark.parametrize("here", ["11.5.0", "10.13.2", "11.4.1"])
def test_other_tensorrt_version_is_refused_naming_both(tmp_path, here):
    out = _engines_dir(tmp_path)
    with pytest.raises(IncompatibleEngineError) as e:
        verify_engines(out, machine=MachineInfo(here, H100))
    assert f"built for sm_90 / TensorRT 11.4.0, this GPU is sm_90 / TensorRT {here}: {REBUILD}" in str(
        e.value
    )


def test_build_number_suffix_is_the_same_release(tmp_path):
    out = _engines_dir(tmp_path)
    verify_engines(out, machine=MachineInfo("11.4.0.23", H100))


def test_machine_without_tensorrt_or_gpu_is_refused(tmp_path):
    out = _engines_dir(tmp_path)
    with pytest.raises(IncompatibleEngineError, match=r"this machine has no TensorRT and no CUDA GPU"):
        verify_engines(out, machine=MachineInfo(None, None))
    with pytest.raises(
        IncompatibleEngineError, match=r"sm_90 / TensorRT 11\.4\.0, this machine has no CUDA GPU"
    ):
        verify_engines(out, machine=MachineInfo("11.4.0", None))


def test_flipped_byte_is_reported_before_compatibility(tmp_path):
    out = _engines_dir(tmp_path)
    plan = out / "transformer.plan"
    data = bytearray(plan.read_bytes())
    data[100] ^= 0x40
    plan.write_bytes(bytes(data))
    # The machine is incompatible too, but integrity comes first: the error is about the file.
    with pytest.raises(VerificationError) as e:
        verify_engines(out, machine=MachineInfo("11.4.0", L4))
    assert type(e.value) is VerificationError
    assert "transformer.plan sha256" in str(e.value) and "(modified)" in str(e.value)
    # Outside a run directory (an unpacked artefact on a serving machine) nothing can be rebuilt.
    hint = "copy the engines again (or unpack the artefact again) from where they were built, then check"
    assert f"{hint} them with `sd35trt verify {out}`" in str(e.value)
    assert REBUILD not in str(e.value)
    (tmp_path / "manifest.json").write_text("{}")  # runs/<name>/engines: rebuild
    with pytest.raises(VerificationError, match="rebuild with `sd35trt build`"):
        verify_engines(out, machine=MachineInfo("11.4.0", L4))


def test_truncated_engine_is_named_with_both_sizes(tmp_path):
    out = _engines_dir(tmp_path)
    plan = out / "vae_decoder.plan"
    full = plan.stat().st_size
    plan.write_bytes(plan.read_bytes()[:-7])
    with pytest.raises(
        VerificationError, match=rf"vae_decoder\.plan has {full - 7} bytes, the manifest records {full}"
    ):
        verify_engines(out, machine=MachineInfo("11.4.0", H100))


def test_missing_engine_and_support_files_are_all_named(tmp_path):
    out = _engines_dir(tmp_path)
    (out / "transformer.plan").unlink()
    (out / "tokenizer" / "vocab.json").write_text('{"b": 0}')
    with pytest.raises(VerificationError) as e:
        verify_engines(out, machine=MachineInfo("11.4.0", H100))
    assert "transformer.plan is missing" in str(e.value)
    assert "tokenizer/vocab.json sha256" in str(e.value)  # same size, other content
    # Checking only the VAE still checks the tokenizer files the runtime needs.
    with pytest.raises(VerificationError, match=r"vocab\.json"):
        verify_engines(out, components=[Component.VAE_DECODER], machine=MachineInfo("11.4.0", H100))


def test_missing_or_malformed_manifest(tmp_path):
    with pytest.raises(ManifestError, match=r"manifest\.json does not exist: .* is not an engines directory"):
        verify_engines(tmp_path)
    out = _engines_dir(tmp_path)
    data = json.loads((out / ENGINE_MANIFEST_NAME).read_text())
    (out / ENGINE_MANIFEST_NAME).write_text(json.dumps({**data, "format": 99}))
    with pytest.raises(ManifestError, match=r"has format 99, this sd35trt reads format 1"):
        read_engine_manifest(out)
    del data["engines"]["transformer"]["file"]
    (out / ENGINE_MANIFEST_NAME).write_text(json.dumps(data))
    missing = r"is malformed: field engines\.transformer\.file: Field required"
    with pytest.raises(ManifestError, match=missing):
        read_engine_manifest(out)
    (out / ENGINE_MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ManifestError, match=r"is not valid JSON"):
        read_engine_manifest(out)


def test_onnxruntime_engines_need_no_tensorrt_or_gpu(tmp_path, monkeypatch):
    out = _engines_dir(tmp_path, backend=Backend.ONNXRUNTIME)

    def no_detection():
        raise AssertionError("ONNX Runtime engines must not query TensorRT or CUDA")

    monkeypatch.setattr(MachineInfo, "detect", staticmethod(no_detection))
    m = verify_engines(out)
    assert m.backend is Backend.ONNXRUNTIME
    assert "tensorrt" not in sys.modules


def test_unknown_component_is_a_clear_error(tmp_path):
    out = _engines_dir(tmp_path)
    with pytest.raises(ManifestError, match=r"has no clip_l engine \(built: transformer, vae_decoder\)"):
        verify_engines(out, components=[Component.CLIP_L], machine=MachineInfo("11.4.0", H100))


def test_an_untyped_controlnet_engine_of_an_older_build_says_to_rebuild(tmp_path):
    """Engines once named their single ControlNet ``controlnet``; they are named by type now."""
    import json

    from sd35trt.artifacts.manifest import FORMAT_VERSION, RunManifest

    out = _engines_dir(tmp_path)
    path = out / "manifest.json"
    data = json.loads(path.read_text())
    data["engines"]["controlnet"] = data["engines"]["vae_decoder"]
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError) as err:
        verify_engines(out, machine=MachineInfo("11.4.0", H100))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path} has a 'controlnet' component")
    assert "re-run `sd35trt export` and `sd35trt build`" in message
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(
        json.dumps(
            {"format": FORMAT_VERSION, "records": {"export": {"details": {"components": {"controlnet": {}}}}}}
        )
    )
    with pytest.raises(ManifestError, match=r"the export record in .* has a 'controlnet' component"):
        RunManifest(run).load()


def test_plan_swapped_after_verification_is_refused_before_tensorrt_sees_it(tmp_path):
    out = _engines_dir(tmp_path)
    m = verify_engines(out, machine=MachineInfo("11.4.0", H100))
    engine = open_engines(m, components=[Component.VAE_DECODER], device="cuda:0")[Component.VAE_DECODER]
    assert isinstance(engine, TrtEngine) and not engine.active
    plan = out / "vae_decoder.plan"
    plan.write_bytes(b"\x00" * plan.stat().st_size)
    # Where TensorRT is absent, reaching `import tensorrt` would raise ImportError instead.
    with pytest.raises(VerificationError, match=r"vae_decoder\.plan sha256 .* \(modified or corrupted\)"):
        engine.activate()
    assert "tensorrt" not in sys.modules
    plan.write_bytes(b"\x00" * 64)
    with pytest.raises(
        VerificationError, match=r"vae_decoder\.plan has 64 bytes, the engine manifest records"
    ):
        engine.activate()


def test_tensorrt_engines_do_not_run_on_the_cpu(tmp_path):
    m = verify_engines(_engines_dir(tmp_path), machine=MachineInfo("11.4.0", H100))
    with pytest.raises(BackendUnavailableError, match=r"TensorRT plans run on a CUDA device, not 'cpu'"):
        open_engines(m, device="cpu")


def _set(data: dict, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    for key in path:
        data = data[key]
    data[last] = value


@pytest.mark.parametrize(
    ("dotted", "value", "named"),
    [
        ("engines", ["transformer"], "engines: Input should be an object"),
        (
            "engines.transformer.file.size",
            "2048",
            "engines.transformer.file.size: Input should be a valid integer",
        ),
        ("engines.transformer.file", "transformer.plan", "engines.transformer.file: Input should be"),
        ("engines.transformer.profile", [], "engines.transformer.profile: Input should be an object"),
        ("engines.transformer.profile.latent.min", "1,4,4,4", "engines.transformer.profile.latent.min"),
        ("engines.transformer.fp8", "yes", "engines.transformer.fp8: Input should be a valid boolean"),
        ("engines.transformer.compute_capability", [9], "engines.transformer.compute_capability"),
        ("engines.transformer.backend", "tensorflow", "engines.transformer.backend: Input should be"),
        ("engines.vae_decoder.extra_files", {"path": "x"}, "engines.vae_decoder.extra_files"),
        ("dims.patch_size", "2", "dims.patch_size: Input should be a valid integer"),
        ("dims", None, "dims: Input should be an object"),
        ("support_files", ["tokenizer/vocab.json"], "support_files[0]: Input should be an object"),
        ("runtime_defaults", [], "runtime_defaults: Input should be an object"),
        ("backend", 3, "backend: Input should be"),
    ],
)
def test_manifest_with_wrong_json_types_names_the_file_and_field(tmp_path, dotted, value, named):
    """faults.md 15 for the engine manifest (issue: wrong JSON types gave an AttributeError
    traceback): one line naming the file, the field, what was found, and the fix."""
    out = _engines_dir(tmp_path)
    data = json.loads((out / ENGINE_MANIFEST_NAME).read_text())
    _set(data, dotted, value)
    (out / ENGINE_MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ManifestError) as e:
        verify_engines(out, machine=MachineInfo("11.4.0", H100))
    message = str(e.value)
    assert message.startswith(f"{out / ENGINE_MANIFEST_NAME} is malformed: ")
    assert named in message and message.endswith(REBUILD) and "\n" not in message


def test_manifest_field_errors_are_listed_together(tmp_path):
    out = _engines_dir(tmp_path)
    data = json.loads((out / ENGINE_MANIFEST_NAME).read_text())
    for rec in data["engines"].values():
        rec["build_seconds"] = "fast"
    data["dims"]["head_dim"] = 4.5
    data["created"] = 1
    (out / ENGINE_MANIFEST_NAME).write_text(json.dumps(data))
    three = r"created.*; .*build_seconds.*; .*build_seconds.*; 1 more field\(s\) are invalid"
    with pytest.raises(ManifestError, match=three):
        read_engine_manifest(out)


def test_cli_names_a_malformed_manifest_without_traceback(tmp_path):
    """`sd35trt verify ENGINES_DIR` whose manifest has wrong types: the problem in one line, exit 1."""
    import os
    import subprocess

    out = _engines_dir(tmp_path, backend=Backend.ONNXRUNTIME)
    data = json.loads((out / ENGINE_MANIFEST_NAME).read_text())
    data["engines"] = ["transformer"]
    (out / ENGINE_MANIFEST_NAME).write_text(json.dumps(data))
    env = {k: v for k, v in os.environ.items() if k != "SD35TRT_DEBUG"}
    done = subprocess.run(
        [sys.executable, "-m", "sd35trt.cli", "verify", str(out)], capture_output=True, text=True, env=env
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    first, last = done.stderr.strip().splitlines()
    assert "manifest.json is malformed: field engines: Input should be an object" in first
    assert last.startswith("error: ") and "1 problem(s) found" in last
