"""``sd35trt verify ENGINES --compare`` on the tiny ONNX Runtime engines: each engine against its ONNX."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from typer.testing import CliRunner

from sd35trt.artifacts.files import file_record
from sd35trt.cli import app
from sd35trt.components import Component

pytestmark = pytest.mark.slow


def test_verify_compare_checks_every_output_of_every_engine(built_run):
    from sd35trt.compare import compare_engines

    report = compare_engines(built_run / "engines")
    assert report.ok and not report.skipped
    outputs = {(r.component, r.check.output) for r in report.results}
    assert outputs == {
        (Component.CLIP_L, "hidden_states"),
        (Component.CLIP_L, "text_embeds"),
        (Component.CLIP_G, "hidden_states"),
        (Component.CLIP_G, "text_embeds"),
        (Component.T5, "last_hidden_state"),
        (Component.TRANSFORMER, "noise_pred"),
        (Component.VAE_DECODER, "image"),
        (Component.VAE_ENCODER, "latent"),
    }
    # Both ends of the profile: the tiny config's opt and min shapes differ for every engine.
    assert {r.case for r in report.results} == {"opt", "min"}
    transformer = [r for r in report.results if r.component is Component.TRANSFORMER]
    assert sorted(r.shapes["hidden_states"] for r in transformer) == [(1, 16, 8, 8), (2, 16, 16, 16)]
    assert all(r.check.max_ref > 0 for r in report.results)  # real outputs, not empty ones

    result = CliRunner().invoke(app, ["verify", str(built_run / "engines"), "--compare"])
    assert result.exit_code == 0, result.output
    assert "compare: 16 outputs within tolerance, 0 engines skipped" in result.output


def _tamper(engine: onnx.ModelProto, output: str, factor: float) -> None:
    """Scale ``output`` by ``factor`` at the end of the graph (an engine whose numbers are off)."""
    producer = next(n for n in engine.graph.node if output in n.output)
    producer.output[list(producer.output).index(output)] = f"{output}_before_tamper"
    engine.graph.initializer.append(numpy_helper.from_array(np.array(factor, np.float32), "tamper_factor"))
    engine.graph.node.append(helper.make_node("Mul", [f"{output}_before_tamper", "tamper_factor"], [output]))


def test_an_engine_whose_output_drifts_is_reported_over_tolerance_by_the_cli(built_run, copy_run):
    run = copy_run(built_run)
    engines = run / "engines"
    path = engines / "vae_decoder.onnx"
    engine = onnx.load(str(path))
    _tamper(engine, "image", 1.01)  # 1% on outputs in [0, 1]: above the 1e-3 tolerance
    onnx.save_model(engine, str(path))
    # The manifest is updated too, so only the comparison can find it (checksums pass).
    manifest = json.loads((engines / "manifest.json").read_text())
    manifest["engines"]["vae_decoder"]["file"] = file_record(engines, path).to_json()
    (engines / "manifest.json").write_text(json.dumps(manifest))

    proc = subprocess.run(
        [sys.executable, "-m", "sd35trt.cli", "verify", str(engines), "--compare"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith("error: ") and "2 output(s) of the engines differ" in proc.stderr
    assert "vae_decoder image at opt latent [1, 16, 16, 16]: max |engine - onnx|" in proc.stderr
    lines = proc.stdout.splitlines()
    over = [line for line in lines if line.endswith("OVER TOLERANCE")]
    assert len(over) == 2 and all(line.split()[:2] == ["vae_decoder", "image"] for line in over)
    assert sum(line.endswith(" ok") for line in lines) == 14  # the other engines still match


def test_compare_needs_the_onnx_the_engines_were_built_from(built_run, tmp_path):
    engines = tmp_path / "elsewhere" / "engines"
    shutil.copytree(built_run / "engines", engines)  # verifies on its own, but no onnx/ beside it
    result = CliRunner().invoke(app, ["verify", str(engines)])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["verify", str(engines), "--compare"])
    assert result.exit_code != 0
    message = str(result.exception)
    assert "--compare needs the ONNX the engines were built from" in message
    assert str(tmp_path / "elsewhere" / "onnx" / "clip_l.onnx") in message


def test_a_modified_onnx_source_is_refused_before_it_is_run(built_run, copy_run):
    from sd35trt.compare import compare_engines
    from sd35trt.errors import VerificationError

    run = copy_run(built_run)
    source = run / "onnx" / "t5.onnx"
    data = bytearray(source.read_bytes())
    data[len(data) // 2] ^= 0xFF
    source.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match=r"ONNX sources of the engines: .*t5\.onnx sha256"):
        compare_engines(run / "engines", [Component.T5])
