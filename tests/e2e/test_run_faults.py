"""``run``, ``serve`` and the Python API under faults, on the tiny ONNX Runtime engines.

faults.md cases 20 (a path outside the engines directory), 24 (an engine its backend cannot
load although its checksum matches), 25 (settings without effect: a warning, and provenance
records what was used), 27 (the engine batch recorded; a request can run alone), and the
output path of ``run -o``. Tests that damage engines work on a copy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sd35trt.artifacts.engine_manifest import ENGINE_MANIFEST_NAME, read_engine_manifest
from sd35trt.artifacts.files import atomic_write_json, file_record
from sd35trt.backends.onnxruntime import OrtEngine
from sd35trt.components import Component
from sd35trt.errors import EngineLoadError, RequestError
from sd35trt.run import run
from sd35trt.runtime.pipeline import GenerationRequest, Sd35Runtime
from sd35trt.runtime.png import read_png_parameters

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
PROMPT = "a lighthouse at dusk"


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "SD35TRT_DEBUG"} | {"PYTHONPATH": str(REPO)}


@pytest.fixture
def engines_copy(built_run, tmp_path) -> Path:
    out = tmp_path / "engines"
    shutil.copytree(built_run / "engines", out)
    return out


def _replace_engine(engines: Path, component: Component, data: bytes) -> Path:
    """Write ``data`` as ``component``'s engine and record its size and sha256, so every checksum
    matches and only loading can fail."""
    manifest = read_engine_manifest(engines)
    rec = manifest.record(component)
    path = engines / rec.file.path
    path.write_bytes(data)
    records = dict(manifest.engines)
    records[component] = rec.model_copy(update={"file": file_record(engines, path), "extra_files": ()})
    atomic_write_json(
        engines / ENGINE_MANIFEST_NAME, manifest.model_copy(update={"engines": records}).to_json()
    )
    return path


def test_garbage_engine_with_matching_sha256_is_one_line_from_run(engines_copy, tmp_path):
    """faults.md 24: was a ~48-line ONNX Runtime traceback."""
    bad = _replace_engine(engines_copy, Component.VAE_DECODER, b"\x00not an onnx model" * 64)
    done = subprocess.run(
        [sys.executable, "-m", "sd35trt.cli", "run", "--engines", str(engines_copy), PROMPT,
         "-o", str(tmp_path / "x.png")],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert f"engine {bad} matches its record, but ONNX Runtime cannot load it" in done.stderr
    assert "rebuild with `sd35trt build`" in done.stderr
    assert not (tmp_path / "x.png").exists()


def test_serve_exits_1_at_start_up_naming_an_engine_it_cannot_load(engines_copy, tmp_path):
    """faults.md 24 for `serve`: the process exits 1 with the line before it binds a port."""
    bad = _replace_engine(engines_copy, Component.CLIP_L, b"\x08\x07garbage" * 64)
    done = subprocess.run(
        [sys.executable, "-m", "sd35trt.cli", "serve", "--engines", str(engines_copy),
         "--host", "127.0.0.1", "--port", "0"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"error: engine {bad} matches its record, but ONNX Runtime cannot load it" in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr


def test_low_vram_load_names_the_engine_at_load_not_at_the_first_request(engines_copy):
    bad = _replace_engine(engines_copy, Component.T5, b"garbage" * 100)
    with pytest.raises(EngineLoadError, match=rf"engine {bad} matches its record"):
        Sd35Runtime.load(engines_copy, low_vram=True)


def test_external_data_reference_inside_an_engine_is_not_read_from_elsewhere(
    engines_copy, tmp_path, monkeypatch
):
    """faults.md 20 and 24: an engine recorded without external data but referencing some. Loaded
    from bytes, ONNX Runtime looked the data up in the working directory; now only in the engines
    directory, where it is not: one line naming the engine, and the outside file is never read."""
    import onnx

    rec = read_engine_manifest(engines_copy).record(Component.VAE_DECODER)
    model = onnx.load(str(engines_copy / rec.file.path))
    staged = tmp_path / "staged" / "vae.onnx"
    staged.parent.mkdir()
    onnx.save_model(
        model, str(staged), save_as_external_data=True, location="weights.data", size_threshold=1024
    )
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    shutil.move(staged.parent / "weights.data", cwd / "weights.data")  # where ORT would have looked
    bad = _replace_engine(engines_copy, Component.VAE_DECODER, staged.read_bytes())
    monkeypatch.chdir(cwd)
    with pytest.raises(EngineLoadError, match=rf"engine {bad} matches its record.*External data"):
        Sd35Runtime.load(engines_copy)


def test_settings_without_effect_warn_and_the_png_records_what_was_used(built_run, tmp_path, capsys):
    """faults.md 25: guidance <= 1 (large-turbo) has no CFG, so a negative prompt and SLG do
    nothing: CLI warnings on stderr, `result.warnings`, and the PNG records null for both."""
    from sd35trt.cli import main

    out = tmp_path / "turbo.png"
    argv = [
        "sd35trt", "run", "--engines", str(built_run / "engines"), PROMPT, "--guidance-scale", "1.0",
        "--negative-prompt", "blurry", "--skip-layer-guidance", "--seed", "3", "-o", str(out),
    ]  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as done:
            main()
    assert done.value.code in (0, None)
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning: ")]
    assert [w.split(" ")[1] for w in warnings] == ["negative_prompt", "skip_layer_guidance"]
    assert "warning" not in captured.out and f"wrote {out}" in captured.out
    meta = read_png_parameters(out)
    assert meta["guidance_scale"] == 1.0 and meta["negative_prompt"] is None
    assert meta["skip_layer_guidance"] is None and meta["seed"] == 3

    # The same through the Python API; with CFG on, both are used and recorded, no warning.
    result = run(built_run / "engines", PROMPT, guidance_scale=1.0, negative_prompt="blurry", seed=3, out=out)
    assert len(result.result.warnings) == 1 and "negative_prompt has no effect" in result.result.warnings[0]
    cfg = run(built_run / "engines", PROMPT, guidance_scale=4.5, negative_prompt="blurry", seed=3, out=out)
    assert cfg.result.warnings == () and read_png_parameters(out)["negative_prompt"] == "blurry"


def test_png_records_the_engine_batch_it_was_made_in(built_run, tmp_path):
    """faults.md 27: the same seed merged into a batch can differ by ~1/255 from it alone; each
    PNG says which batch it came from, and `run` always runs a request alone."""
    from sd35trt.runtime.png import png_parameters

    alone = run(built_run / "engines", PROMPT, seed=4, out=tmp_path / "alone.png")
    assert read_png_parameters(alone.paths[0])["engine_batch"] == {
        "requests": 1,
        "images": 1,
        "first_image": 0,
    }
    with Sd35Runtime.load(built_run / "engines") as rt:
        a = rt.validate(GenerationRequest(PROMPT, seed=4))
        b = rt.validate(GenerationRequest("a boat", seed=5))
        ra, rb = rt.generate_batch([a, b])
    assert (ra.batch.requests, ra.batch.images, ra.batch.first_image) == (2, 2, 0)
    assert rb.batch.first_image == 1
    assert png_parameters(rb.params, rb.engine_digest, 0, rb.batch)["engine_batch"]["requests"] == 2


@pytest.mark.parametrize("case", ["existing dir", "png-named dir", "numbered dir", "parent is a file"])
def test_run_output_that_cannot_be_a_png_file_is_refused_before_any_engine_loads(
    built_run, tmp_path, monkeypatch, capsys, case
):
    """`run -o DIR` was an IsADirectoryError traceback after generating; now one line, first."""
    from sd35trt.cli import main

    target = {
        "existing dir": tmp_path,
        "png-named dir": tmp_path / "out.png",
        "numbered dir": tmp_path / "cat.png",
        "parent is a file": tmp_path / "file.txt" / "x.png",
    }[case]
    if case == "png-named dir":
        target.mkdir()
    elif case == "numbered dir":
        (tmp_path / "cat-1.png").mkdir()
    elif case == "parent is a file":
        (tmp_path / "file.txt").write_text("x")
    before = sorted(tmp_path.rglob("*"))

    def refuse(self):
        raise AssertionError(f"engine {self.name} was loaded for an unwritable output")

    monkeypatch.setattr(OrtEngine, "activate", refuse)
    num_images = 2 if case == "numbered dir" else 1
    with pytest.raises(RequestError) as err:
        run(built_run / "engines", PROMPT, out=target, num_images=num_images)
    assert err.value.field == "out"
    argv = ["sd35trt", "run", "--engines", str(built_run / "engines"), PROMPT, "-o", str(target)]
    argv += ["--num-images", str(num_images)]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.delenv("SD35TRT_DEBUG", raising=False)
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code == 1
    err_text = capsys.readouterr().err
    assert err_text.startswith("error: output ") and err_text.count("\n") == 1, err_text
    assert sorted(tmp_path.rglob("*")) == before


def test_written_png_parameters_are_plain_json(built_run, tmp_path):
    """numpy scalars through the Python API come back as plain numbers in the PNG record."""
    import numpy as np

    out = run(
        built_run / "engines",
        PROMPT,
        seed=np.int64(6),
        guidance_scale=np.float32(4.5),
        out=tmp_path / "n.png",
    )
    meta = json.loads(json.dumps(read_png_parameters(out.paths[0])))
    assert meta["seed"] == 6 and meta["guidance_scale"] == 4.5
