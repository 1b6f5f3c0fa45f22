"""TensorRT-RTX engines of the tiny model on an RTX-class GPU (skipped without tensorrt_rtx and CUDA).

Built for this GPU's compute capability (it must be a TensorRT-RTX target: 8.9 or 12.x for FP8),
the engines generate the same images as ONNX Runtime within the FP8 tolerance, keep their runtime
cache beside the engines directory, replay with TensorRT-RTX's own CUDA graphs, and a build for
another target is refused before it is deserialized.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from sd35trt.backends.load import verify_engines
from sd35trt.backends.machine import MachineInfo
from sd35trt.backends.tensorrt_rtx import RUNTIME_CACHE_SUFFIX
from sd35trt.config import Backend, ComputeCapability
from sd35trt.errors import IncompatibleEngineError
from sd35trt.metrics import psnr
from sd35trt.runtime.pipeline import GenerationRequest, Sd35Runtime
from sd35trt.stages.build import build

pytestmark = [pytest.mark.tensorrt_rtx, pytest.mark.gpu]

PROMPT = "a lighthouse at night, oil painting"


def _target(machine: MachineInfo) -> ComputeCapability:
    cc = machine.gpu.compute_capability
    try:
        target = ComputeCapability(f"{cc[0]}.{cc[1]}")
    except ValueError:
        pytest.skip(f"{machine.gpu.name} ({machine.gpu.sm}) is no TensorRT-RTX target")
    if not target.has_fp8:
        pytest.skip(f"{machine.gpu.name} ({machine.gpu.sm}) has no FP8")
    return target


def _built(tiny_config, exported_run, tmp_path_factory, backend, targets=None):
    run_dir = tmp_path_factory.mktemp(f"run-{backend.value}") / exported_run.name
    shutil.copytree(exported_run, run_dir, symlinks=True)
    config = tiny_config
    if targets is not None:
        config = config.model_copy(
            update={"build": config.build.model_copy(update={"compute_capabilities": targets})}
        )
    build(config, run_dir, backend)
    return run_dir / "engines"


def test_rtx_engines_run_like_onnxruntime_with_a_runtime_cache(tiny_config, exported_run, tmp_path_factory):
    target = _target(MachineInfo.detect())
    rtx = _built(tiny_config, exported_run, tmp_path_factory, Backend.TENSORRT_RTX, (target,))
    ort = _built(tiny_config, exported_run, tmp_path_factory, Backend.ONNXRUNTIME)
    request = GenerationRequest(PROMPT, seed=5, num_images=1)
    with Sd35Runtime.load(rtx, use_cuda_graph=True) as rt:
        first, second = rt.generate(request), rt.generate(request)
    with Sd35Runtime.load(ort, device="cpu") as cpu:
        reference = cpu.generate(request)
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(second.images[0]))
    value = psnr(np.asarray(reference.images[0]), np.asarray(first.images[0]))
    print(f"\nTensorRT-RTX vs ONNX Runtime (same FP8 export): PSNR {value:.1f} dB")
    assert value > 25.0
    caches = list((rtx.parent / f"{rtx.name}{RUNTIME_CACHE_SUFFIX}").glob("*.cache"))
    assert len(caches) >= 5 and all(c.stat().st_size > 0 for c in caches)


def test_engines_for_another_target_are_refused_before_loading(tiny_config, exported_run, tmp_path_factory):
    machine = MachineInfo.detect()
    here = _target(machine)
    other = ComputeCapability.SM120 if here is ComputeCapability.SM89 else ComputeCapability.SM89
    engines = _built(tiny_config, exported_run, tmp_path_factory, Backend.TENSORRT_RTX, (other,))
    with pytest.raises(IncompatibleEngineError, match=f"{machine.gpu.sm}\\), not a target"):
        verify_engines(engines, machine=machine)
