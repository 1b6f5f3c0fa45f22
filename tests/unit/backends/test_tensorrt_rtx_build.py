"""Real TensorRT-RTX builds of the tiny model on this machine, GPU or not (``make test-rtx``).

Marked ``tensorrt_rtx``: skipped where ``tensorrt_rtx`` does not import, left out of ``make test``
(``.ci/run`` runs them with ``make test-rtx``). The builds are TensorRT-RTX's own ahead-of-time
builds; the runtime calls are checked against the real binding classes (``create_autospec``:
a misspelt method or property fails), since running them needs a GPU (``tests/gpu``).
"""

from __future__ import annotations

from pathlib import Path
from unittest.mock import create_autospec

import pytest

from sd35trt.artifacts.engine_manifest import read_engine_manifest
from sd35trt.backends.base import BuildJob
from sd35trt.backends.layers import quantized_linear_nodes
from sd35trt.backends.machine import GpuInfo, MachineInfo
from sd35trt.backends.tensorrt_rtx import TrtRtxEngine, build_rtx_plan
from sd35trt.components import Component, exported_components
from sd35trt.config import Backend, ComputeCapability
from sd35trt.stages.build import SKIP_LAYERS_INPUT, build, engine_profile, onnx_inputs
from sd35trt.stages.package import package, verify

pytestmark = pytest.mark.tensorrt_rtx

trt = pytest.importorskip("tensorrt_rtx")


@pytest.fixture(scope="module")
def rtx_run(tiny_config, exported_run, tmp_path_factory) -> Path:
    """The tiny export built with TensorRT-RTX (default targets) in a copy of the shared run."""
    import shutil

    run_dir = tmp_path_factory.mktemp("rtx") / "tiny"
    shutil.copytree(exported_run, run_dir, symlinks=True)
    build(tiny_config, run_dir, Backend.TENSORRT_RTX, progress=lambda _line: None)
    return run_dir


def test_every_tiny_component_builds_a_real_plan_with_the_fp8_proof(rtx_run):
    manifest = read_engine_manifest(rtx_run / "engines")
    assert manifest.backend is Backend.TENSORRT_RTX
    assert set(manifest.engines) == set(exported_components(cache=False))
    for rec in manifest.engines.values():
        plan = (rtx_run / "engines" / rec.file.path).read_bytes()
        assert len(plan) == rec.file.size > 100_000  # a compiled plan, not a placeholder
        assert rec.compute_capabilities == ((8, 9), (12, 0)) and rec.tensorrt_version == trt.__version__
        assert rec.options["compute_capabilities"] == ["8.9", "12.0"]
        assert rec.layers is not None and rec.layers.detailed and rec.layers.layers > 10
        assert rec.device_memory_bytes == rec.layers.activation_bytes > 0 and rec.layers.weights_bytes > 0
        assert (rtx_run / rec.options["build_log"]).is_file()
    transformer = manifest.engines[Component.TRANSFORMER]
    quantized = quantized_linear_nodes(rtx_run / "onnx" / "transformer.onnx")
    layers = transformer.layers
    assert transformer.fp8 and len(quantized) == layers.quantized_linear > 0
    assert layers.fp8_complete and sorted(n for v in layers.fp8_gemm_layers.values() for n in v) == sorted(
        quantized
    )
    assert layers.output_precisions.get("fp8", 0) > 0
    # Text encoders and VAE have no FP8.
    assert all(manifest.engines[c].layers.fp8_gemms == 0 for c in manifest.engines if not c.is_transformer)


def test_a_rebuild_on_the_same_machine_reuses_the_engines(rtx_run, tiny_config):
    lines: list[str] = []
    build(tiny_config, rtx_run, Backend.TENSORRT_RTX, progress=lines.append)
    assert any("up to date" in line for line in lines)


def test_the_artefact_verifies_and_says_which_gpus_run_it(rtx_run, tmp_path):
    artefact = package(rtx_run, tmp_path / "tiny-rtx.tar.gz")
    report = verify(artefact, machine=MachineInfo(None, None, trt.__version__))
    assert report.ok and report.files_checked > 6
    assert report.notes == [
        "this machine has no CUDA GPU to run them: GPUs of compute capability 8.9 (RTX 4090, L40S, L4) or "
        f"12.0 (RTX 5090, RTX PRO 6000 Blackwell) with TensorRT-RTX {trt.__version__}"
    ]
    hopper = verify(artefact, machine=MachineInfo(None, GpuInfo("NVIDIA H200", (9, 0)), trt.__version__))
    assert not hopper.ok and "this GPU is NVIDIA H200 (sm_90), not a target" in hopper.problems[0]


def test_one_target_build_fuses_projections_and_keeps_them_fp8(tiny_config, exported_run, tmp_path):
    """Built for 8.9 alone, the tiny transformer's q/k/v projections share FP8 GEMMs (measured: 29 FP8
    GEMM layers for 43 quantized MatMuls), and the proof still accounts for every MatMul."""
    source = exported_run / "onnx" / "transformer.onnx"
    inputs, external = onnx_inputs(source)
    shapes = engine_profile(
        tiny_config, _dims(exported_run), Component.TRANSFORMER, inputs[SKIP_LAYERS_INPUT][0]
    )
    settings = tiny_config.build.model_copy(update={"compute_capabilities": (ComputeCapability.SM89,)})
    built = build_rtx_plan(
        BuildJob(
            Component.TRANSFORMER,
            source,
            tmp_path / "transformer.plan",
            shapes,
            settings,
            fp8=True,
            external_data=external,
            machine=MachineInfo.detect(),
            run_dir=tmp_path,
            progress=lambda _line: None,
            label="transformer",
            build_has_fp8=True,
        )
    )
    layers = built.layers
    assert built.compute_capabilities == ((8, 9),) and layers.fp8_complete
    assert layers.fp8_gemms < layers.quantized_linear
    assert max(len(v) for v in layers.fp8_gemm_layers.values()) == 3  # q, k, v in one GEMM


def _dims(run_dir: Path):
    from sd35trt.artifacts.manifest import RunManifest, Stage

    return RunManifest(run_dir).get(Stage.EXPORT).details.dims


def test_machine_detection_finds_tensorrt_rtx():
    assert MachineInfo.detect().tensorrt_rtx_version == trt.__version__


def test_the_runtime_config_calls_exist_on_the_real_classes(rtx_run, tmp_path):
    """The context of a TensorRT-RTX engine: runtime config, runtime cache, CUDA graph strategy.

    Deserializing needs a GPU, so the engine is a stand-in specced on the real ``ICudaEngine``
    (and its config and cache on the real ``IRuntimeConfig`` / ``IRuntimeCache``).
    """
    manifest = read_engine_manifest(rtx_run / "engines")
    cache_file = tmp_path / "engines.runtime-cache" / "transformer.cache"
    cache_file.parent.mkdir()
    cache_file.write_bytes(b"previous kernels")
    engine = create_autospec(trt.ICudaEngine, instance=True, spec_set=True)
    config = create_autospec(trt.IRuntimeConfig, instance=True, spec_set=True)
    cache = create_autospec(trt.IRuntimeCache, instance=True, spec_set=True)
    engine.create_runtime_config.return_value = config
    config.create_runtime_cache.return_value = cache
    cache.serialize.return_value = b"new kernels"
    rec = manifest.record(Component.TRANSFORMER)
    runner = TrtRtxEngine(
        manifest.spec(Component.TRANSFORMER),
        rtx_run / "engines" / rec.file.path,
        rec.file.sha256,
        rec.file.size,
        use_cuda_graph=True,
        runtime_cache=cache_file,
    )
    runner._new_context(trt, engine, user_managed=True)
    config.set_execution_context_allocation_strategy.assert_called_once_with(
        trt.ExecutionContextAllocationStrategy.USER_MANAGED
    )
    cache.deserialize.assert_called_once_with(b"previous kernels")
    config.set_runtime_cache.assert_called_once_with(cache)
    assert config.cuda_graph_strategy == trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
    engine.create_execution_context.assert_called_once_with(config)
    assert runner.graphs is None and runner.builtin_cuda_graphs  # no capture of our own
    assert runner.save_runtime_cache() and cache_file.read_bytes() == b"new kernels"
    assert sorted(p.name for p in cache_file.parent.iterdir()) == [
        "transformer.cache",
        "transformer.cache.lock",
    ]
