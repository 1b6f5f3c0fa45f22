"""scripts/gpu_evidence.py's bookkeeping on fabricated records: phase peaks, arguments, the table."""

from __future__ import annotations

import importlib
import sys

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def evidence():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        yield importlib.import_module("gpu_evidence")
    finally:
        sys.path.remove(str(REPO / "scripts"))


def test_each_phase_gets_the_peak_written_when_the_next_one_starts(evidence):
    marks = [
        {"phase": "started", "rss_peak_bytes": 5},
        {"phase": "load", "device_peak_bytes": 10, "rss_peak_bytes": 6},
        {"phase": "trace", "device_peak_bytes": 700, "rss_peak_bytes": 90},  # the load's peaks
        {"phase": "save", "device_peak_bytes": 300, "rss_peak_bytes": 40},  # the trace's peaks
    ]
    peaks = evidence.steps.phase_peaks
    assert peaks(marks, "device_peak_bytes") == {"started": 10, "load": 700, "trace": 300}
    # the last phase's host peak is wait4's, which covers the time since the last line
    assert peaks(marks, "rss_peak_bytes", last=55) == {"started": 6, "load": 90, "trace": 40, "save": 55}
    assert peaks([{"phase": "started"}, {"phase": "load"}], "device_peak_bytes") == {}  # a CPU run


def test_arguments_are_checked_and_the_export_deadline_defaults_to_the_step_one(evidence):
    args = evidence.parse_args(["--step-deadline-s", "42"])
    assert args.export_deadline_s == 42 and args.deadline_s == 540 and args.launch is evidence.Launch.AUTO
    for bad in (["--height", "1000"], ["--deadline-s", "0"], ["--iterations", "0"], ["--launch", "thread"]):
        with pytest.raises(SystemExit):
            evidence.parse_args(bad)


def test_the_table_sets_measured_steps_beside_the_published_ones(evidence):
    Step, Status, Record = evidence.Step, evidence.Status, evidence.StepRecord
    forward = Record("sd3.5-large-random", Step.FORWARD, Status.OK, wall_s=31.0, peak_host_rss_bytes=3 << 30)
    forward.result = {
        "median_ms": 374.0,
        "min_ms": 370.0,
        "times_ms": [374.0] * 10,
        "timer": "cuda events",
        "shapes": {"hidden_states": [2, 16, 128, 128]},
        "flop_per_s": 4.2e14,
        "peak_device_memory_bytes": 20 << 30,
    }
    export = Record(
        "sd3.5-large-random", Step.EXPORT, Status.DEADLINE, wall_s=300.0, peak_host_rss_bytes=8 << 30
    )
    export.error = "stopped at its 300.0 s deadline in phase save"
    export.result = {"files_so_far": {"transformer.onnx.data": 3 << 30}}
    export.result["peak_host_rss_after_load_over_weights"] = 0.49
    skipped = Record("sd3.5-medium-random", Step.FORWARD, Status.SKIPPED, reason="no time left")
    text = evidence.table([forward, export, skipped])
    rows = text.splitlines()
    assert rows[0].split() == ["model", "step", "status", "wall", "s", "dev", "GiB", "host", "GiB", "figures"]
    assert "median 374.0 ms/pass" in rows[2] and "420 TFLOP/s" in rows[2] and "20.00" in rows[2]
    assert "phase save; 3.00 GiB written; RSS after load 0.49x BF16 weights" in rows[3]
    assert rows[4].split()[:3] == ["sd3.5-medium-random", "forward", "skipped"]
    # 374 / 187 and 374 / 265
    assert "2.00x the published TensorRT FP8 step, 1.41x the TensorRT BF16 one" in text
