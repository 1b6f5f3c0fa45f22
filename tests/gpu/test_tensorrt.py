"""TensorRT engines of the tiny model: build, run, and compare with ONNX Runtime.

Skipped where TensorRT or a CUDA GPU is missing (see tests/conftest.py); `make test-gpu` runs them.
The tiny run directory comes from the session fixtures (calibrate -> export); each backend builds
into its own copy. Outputs are compared with Polygraphy's Comparator, the engines wrapped as
Polygraphy runners so both backends see the same feeds.
"""

from __future__ import annotations

import json
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from sd35trt.artifacts.manifest import RunManifest, Stage
from sd35trt.backends.engine import Engine
from sd35trt.backends.load import open_engines, verify_engines
from sd35trt.backends.machine import MachineInfo
from sd35trt.backends.tensorrt import TrtEngine
from sd35trt.compare import engine_runner
from sd35trt.components import Component, ShapeRange
from sd35trt.config import Backend
from sd35trt.errors import IncompatibleEngineError
from sd35trt.stages.build import build

pytestmark = [pytest.mark.tensorrt, pytest.mark.gpu]

VOCAB_SAFE = 50  # token ids valid for every tiny tokenizer


@pytest.fixture(scope="module")
def runs(tiny_config, exported_run, tmp_path_factory) -> dict[Backend, Path]:
    """The exported tiny run, built once per backend (separate copies)."""
    out = {}
    for backend in (Backend.TENSORRT, Backend.ONNXRUNTIME):
        run_dir = tmp_path_factory.mktemp(backend.value) / exported_run.name
        shutil.copytree(exported_run, run_dir, symlinks=True)
        build(tiny_config, run_dir, backend)
        out[backend] = run_dir
    return out


def _feeds(engine: Engine, profile: dict[str, ShapeRange], pick: str, seed: int) -> OrderedDict:
    """Random inputs at the profile's ``min`` or ``max`` shapes (numpy, as Polygraphy feeds)."""
    rng = np.random.default_rng(seed)
    feeds = OrderedDict()
    for t in engine.spec.inputs:
        shape = getattr(profile[t.name], pick)
        if t.dtype.value == "int64":
            feeds[t.name] = rng.integers(0, VOCAB_SAFE, shape, dtype=np.int64)
        elif t.name == "timestep":
            feeds[t.name] = rng.uniform(0, 1000, shape).astype(np.float32)
        elif t.name == "skip_layers":
            feeds[t.name] = (rng.uniform(size=shape) > 0.5).astype(np.float32)
        else:
            feeds[t.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def test_tensorrt_build_records_this_machine(runs):
    import tensorrt as trt
    import torch

    manifest = verify_engines(runs[Backend.TENSORRT] / "engines")
    cc = torch.cuda.get_device_capability()
    assert manifest.backend is Backend.TENSORRT
    for rec in manifest.engines.values():
        assert rec.file.path.endswith(".plan")
        assert (rec.tensorrt_version, rec.compute_capability) == (trt.__version__, cc)
        assert rec.options["strongly_typed"] is True
    transformer = manifest.record(Component.TRANSFORMER)
    exported = RunManifest(runs[Backend.TENSORRT]).get(Stage.EXPORT)
    quantized = exported.details.components[Component.TRANSFORMER].quantized
    # FP8 only where the GPU has it (sm_89+); otherwise the unquantized export was built.
    assert transformer.fp8 is (quantized and cc >= (8, 9))
    for rec in manifest.engines.values():
        assert rec.layers is not None and rec.layers.detailed and rec.device_memory_bytes > 0
    if transformer.fp8:
        # Issue 14 C / point 9: every quantized Linear layer became an FP8 GEMM (the build would
        # have failed otherwise); what fused into attention kernels is printed for the record.
        assert transformer.layers.fp8_gemms >= transformer.layers.quantized_linear > 0
        print(
            f"\ntransformer: {transformer.layers.summary()}; fused: {transformer.layers.fused_attention[:4]}"
        )
    assert list((runs[Backend.TENSORRT] / "timing_cache").glob("tensorrt-*.cache"))


def test_timing_cache_is_reused_by_a_rebuild(runs, tiny_config, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(runs[Backend.TENSORRT], run_dir, symlinks=True)
    build(tiny_config, run_dir, Backend.TENSORRT, force=True)
    manifest = verify_engines(run_dir / "engines")
    assert all(r.options["timing_cache_reused"] for r in manifest.engines.values())


@pytest.mark.parametrize("pick", ["min", "max"])
def test_tensorrt_matches_onnxruntime(runs, pick):
    from polygraphy.comparator import Comparator, CompareFunc

    trt_manifest = verify_engines(runs[Backend.TENSORRT] / "engines")
    ort_manifest = verify_engines(runs[Backend.ONNXRUNTIME] / "engines")
    trt_engines = open_engines(trt_manifest, device="cuda")
    ort_engines = open_engines(ort_manifest, device="cpu", intra_op_threads=1)
    failures = []
    for component, trt_engine in trt_engines.items():
        rec, ort_rec = trt_manifest.record(component), ort_manifest.record(component)
        if ort_rec.fp8 and not rec.fp8:
            continue  # GPU without FP8: TensorRT built the unquantized graph, nothing like-for-like
        feeds = [_feeds(trt_engine, rec.profile, pick, seed) for seed in (0, 1)]
        runners = [
            engine_runner(trt_engine, f"trt-{component.value}"),
            engine_runner(ort_engines[component], "ort"),
        ]
        results = Comparator.run(runners, data_loader=feeds)
        # TF32 GEMMs (TensorRT's default for fp32) and FP8 kernels differ from ORT's CPU arithmetic.
        tol = 5e-2 if rec.fp8 else 1e-2
        if not Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(rtol=tol, atol=tol)):
            failures.append(component.value)
    assert not failures, f"TensorRT and ONNX Runtime outputs differ for {failures}"


def test_cuda_graph_replay_matches_plain_execution(runs):
    import torch

    manifest = verify_engines(runs[Backend.TENSORRT] / "engines")
    rec = manifest.record(Component.TRANSFORMER)
    plain = open_engines(manifest, [Component.TRANSFORMER], "cuda")[Component.TRANSFORMER]
    graphed = open_engines(manifest, [Component.TRANSFORMER], "cuda", use_cuda_graph=True)[
        Component.TRANSFORMER
    ]
    assert isinstance(graphed, TrtEngine) and graphed.use_cuda_graph
    with plain, graphed:
        for seed in (0, 1, 2):  # the same static shapes: one capture, then replays
            feeds = {
                n: torch.from_numpy(a).cuda() for n, a in _feeds(plain, rec.profile, "max", seed).items()
            }
            want = plain.infer(feeds)["noise_pred"]
            got = graphed.infer(feeds)["noise_pred"]
            torch.cuda.synchronize()
            assert torch.equal(want, got)


def test_engines_share_one_activation_buffer_sized_for_the_largest(runs):
    manifest = verify_engines(runs[Backend.TENSORRT] / "engines")
    engines = open_engines(manifest, device="cuda")
    largest = max(r.device_memory_bytes for r in manifest.engines.values())
    try:
        for engine in engines.values():
            engine.activate()
        shared = {id(e.activation_memory) for e in engines.values()}
        assert len(shared) == 1
        assert next(iter(engines.values())).activation_memory.size_bytes == largest
    finally:
        for engine in engines.values():
            engine.deactivate()


def test_plan_for_another_gpu_is_refused_before_deserializing(runs, tmp_path):
    import tensorrt as trt

    engines_dir = tmp_path / "engines"
    shutil.copytree(runs[Backend.TENSORRT] / "engines", engines_dir)
    data = json.loads((engines_dir / "manifest.json").read_text())
    data["engines"]["vae_decoder"]["compute_capability"] = [7, 5]
    (engines_dir / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(
        IncompatibleEngineError, match=r"engine vae_decoder\.plan was built for sm_75 / TensorRT"
    ):
        verify_engines(engines_dir, machine=MachineInfo.detect())
    assert trt.__version__  # TensorRT is present; it was simply never handed the plan
