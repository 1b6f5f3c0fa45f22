"""scripts/gpu_evidence.py end to end on the tiny model, on the CPU: the code path a GPU run takes.

The tiny config is set to the random configs' precisions (BF16 calibration and BF16 transformer
export), so the steps run what they run on a GPU; only the device and the sizes differ.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.slow

SCRIPT = REPO / "scripts" / "gpu_evidence.py"
SMALL = ["--device", "cpu", "--height", "64", "--width", "64", "--iterations", "3", "--warmup", "1"]
SMALL += ["--calibrate-prompts", "2", "--calibrate-steps", "2"]


@pytest.fixture(scope="module")
def tiny_bf16(tmp_path_factory) -> Path:
    data = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    data["calibrate"]["dtype"] = "bf16"
    data["export"]["precision"] = {"transformer": "bf16"}
    path = tmp_path_factory.mktemp("gpu-evidence") / "tiny-bf16.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def evidence(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300
    )


def steps_by_name(out: Path) -> tuple[dict, dict]:
    doc = json.loads((out / "gpu_evidence.json").read_text())
    return doc, {s["step"]: s for s in doc["steps"]}


def test_every_step_measures_the_tiny_model(tiny_bf16, tmp_path):
    from safetensors import safe_open

    out, work = tmp_path / "out", tmp_path / "work"
    done = evidence(
        "--configs", str(tiny_bf16), *SMALL, "--out", str(out), "--work-dir", str(work), "--keep-work"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    doc, steps = steps_by_name(out)
    assert doc["complete"] and doc["environment"]["device"] == "cpu" and doc["args"]["launch"] == "fork"
    assert [(s["model"], s["status"]) for s in doc["steps"]] == [("tiny", "ok")] * 3

    # forward: real timings, a median of them, FLOP counted, weights as the safetensors file holds them
    fwd = steps["forward"]["result"]
    assert len(fwd["times_ms"]) == 3 and min(fwd["times_ms"]) > 0
    assert fwd["median_ms"] == pytest.approx(statistics.median(fwd["times_ms"]), abs=1e-3)
    assert steps["forward"]["wall_s"] * 1e3 > sum(fwd["times_ms"])
    assert fwd["shapes"]["hidden_states"] == [2, 16, 8, 8] and fwd["timer"] == "time.perf_counter"
    assert fwd["flop_per_s"] == pytest.approx(fwd["flop_per_pass"] / (fwd["median_ms"] / 1e3), rel=1e-3)
    assert fwd["flop_per_pass"] > 0
    weights = work / "tiny" / "model" / "transformer" / "diffusion_pytorch_model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        # every tensor but the positional-embedding table, a buffer saved with the weights
        shapes = [f.get_slice(k).get_shape() for k in f.keys() if k != "pos_embed.pos_embed"]  # noqa: SIM118
    parameters = sum(math.prod(s) for s in shapes)
    assert fwd["parameters"] == parameters and fwd["weights_bytes"] == 2 * parameters

    # calibrate: one enabled quantizer per amax tensor in the file it left for the export
    cal = steps["calibrate"]["result"]
    amax = work / "tiny" / "amax.safetensors"
    with safe_open(str(amax), framework="pt") as f:
        assert cal["quantizers_enabled"] == len(list(f.keys())) > 0
    assert cal["calibration_file_bytes"] == amax.stat().st_size
    assert cal["dtype"] == "bfloat16" and cal["seconds"] > 0
    assert cal["transformer_passes"] == 2 and cal["transformer_batch"] == [4]  # 2 prompts, CFG

    # export: sizes are those of the files on disk; the FP8 graph has the Q/DQ pairs reported
    import onnx

    exp = steps["export"]
    res = exp["result"]
    onnx_dir = work / "tiny" / "onnx"
    on_disk = {p.name: p.stat().st_size for p in onnx_dir.iterdir() if p.is_file()}
    assert res["files"] == on_disk and {"transformer.onnx", "transformer_unquantized.onnx"} <= set(on_disk)
    assert res["onnx_bytes"] == sum(v for k, v in on_disk.items() if k.endswith(".onnx"))
    graph = onnx.load(str(onnx_dir / "transformer.onnx"), load_external_data=False)
    qdq = sum(n.op_type == "QuantizeLinear" for n in graph.graph.node)
    assert res["qdq_pairs"] == {"transformer.onnx": qdq, "transformer_unquantized.onnx": 0}
    assert qdq == cal["quantizers_enabled"] and res["validation"] == "passed"  # BF16 in its float32 form
    assert res["weights_bf16_bytes"] == 2 * parameters
    # host memory: a peak per phase (the last one from wait4); the export's own is after the load
    host = exp["host_peak_by_phase_bytes"]
    assert set(host) == {m["phase"] for m in exp["phases"]} and min(host.values()) > 0
    assert exp["peak_host_rss_bytes"] >= max(host.values()) and res["rss_before_load_bytes"] > 0
    after_load = max(v for k, v in host.items() if k not in ("started", "model", "sized", "load"))
    assert res["peak_host_rss_after_load_bytes"] == after_load
    assert res["peak_host_rss_over_weights"] == pytest.approx(
        exp["peak_host_rss_bytes"] / (2 * parameters), rel=1e-3
    )
    # ONNX Runtime runs before the FP8 reference, which loads the transformer again
    assert [m["phase"] for m in exp["phases"]][-5:] == [
        "save",
        "unquantized",
        "validate",
        "reference",
        "done",
    ]

    table = done.stdout
    assert "figures" in table and "tiny   export     ok" in table
    assert (out / "gpu_evidence.log").stat().st_size > 0


def test_the_export_stops_at_its_deadline_and_says_how_far_it_got(tiny_bf16, tmp_path):
    data = yaml.safe_load(tiny_bf16.read_text())
    data["export"]["quantize"] = False  # no calibrate step needed before it
    config = tmp_path / "tiny-plain.yaml"
    config.write_text(yaml.safe_dump(data))
    out, deadline = tmp_path / "out", 0.2
    done = evidence(
        "--configs", str(config), *SMALL, "--out", str(out), "--work-dir", str(tmp_path / "work"),
        "--steps", "export", "--export-deadline-s", str(deadline), "--launch", "fork",
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    doc, steps = steps_by_name(out)
    exp = steps["export"]
    assert doc["complete"] and exp["status"] == "deadline"
    assert deadline <= exp["wall_s"] < deadline + 2.0
    # How far it got: the last phase it started, named in the error, and what it had written.
    reached = [m["phase"] for m in exp["phases"]]
    assert reached[0] == "started" and exp["phase"] == reached[-1] and "done" not in reached
    assert f"phase {exp['phase']}" in exp["error"] and isinstance(exp["result"]["files_so_far"], dict)
    assert exp["peak_host_rss_bytes"] > 0
    if "sized" in reached:  # how far it gets in a second depends on the machine's load
        assert exp["result"]["weights_bf16_bytes"] > 0 and exp["result"]["peak_host_rss_over_weights"] > 0
    assert not (tmp_path / "work").exists()  # removed without --keep-work


def test_spawned_steps_stop_at_their_deadline_and_the_run_goes_on(tiny_bf16, tmp_path):
    out, deadline = tmp_path / "out", 0.5
    done = evidence(
        "--configs", str(tiny_bf16), *SMALL, "--out", str(out), "--work-dir", str(tmp_path / "work"),
        "--step-deadline-s", str(deadline), "--launch", "spawn",
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    doc, steps = steps_by_name(out)
    assert doc["complete"] and doc["args"]["launch"] == "spawn"
    for name in ("forward", "calibrate"):
        step = steps[name]
        assert step["status"] == "deadline" and step["result"] is None, step
        assert deadline <= step["wall_s"] < deadline + 2.0 and step["peak_host_rss_bytes"] > 0
    # the export needs this run's calibration, which did not finish
    assert steps["export"]["status"] == "skipped" and "calibrat" in steps["export"]["reason"]
    assert "tiny   export     skipped" in done.stdout
