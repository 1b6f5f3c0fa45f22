"""``sd35trt verify ENGINES --compare`` on TensorRT engines: each plan against its ONNX in ONNX Runtime.

Skipped where TensorRT or a CUDA GPU is missing; `make test-gpu` runs it. The tiny engines are
fp32 (+ FP8 transformer): TensorRT runs fp32 GEMMs in TF32 by default, so the spec tolerance
(1e-3 relative) may be exceeded by TF32 alone; the test prints the table and bounds the error at
5e-2 of each output's range, the bound tests/gpu/test_tensorrt.py uses for the same engines.
"""

from __future__ import annotations

import shutil

import pytest

from sd35trt.config import Backend
from sd35trt.stages.build import build

pytestmark = [pytest.mark.tensorrt, pytest.mark.gpu]


def test_compare_runs_every_tensorrt_engine_against_its_onnx(tiny_config, exported_run, tmp_path):
    from sd35trt.artifacts.engine_manifest import read_engine_manifest
    from sd35trt.compare import compare_engines

    run = tmp_path / exported_run.name
    shutil.copytree(exported_run, run, symlinks=True)
    build(tiny_config, run, Backend.TENSORRT)
    report = compare_engines(run / "engines")
    print(report.table())
    built = read_engine_manifest(run / "engines")
    compared = {r.component for r in report.results}
    assert compared | set(report.skipped) == set(built.engines)
    assert compared, report.skipped
    worst = max(r.check.rel for r in report.results)
    assert worst <= 5e-2, report.table()
