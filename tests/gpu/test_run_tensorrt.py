"""The runtime on TensorRT engines of the tiny model (skipped without TensorRT and a CUDA GPU).

The exported tiny run (FP8 transformer) is built twice, for TensorRT and for ONNX Runtime; the
same requests run on both. `make test-gpu` runs these on a TensorRT machine.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from sd35trt.config import Backend
from sd35trt.errors import NonFiniteError
from sd35trt.metrics import psnr
from sd35trt.run import run
from sd35trt.runtime.pipeline import GenerationRequest, Sd35Runtime
from sd35trt.runtime.png import png_bytes, png_parameters
from sd35trt.stages.build import build

pytestmark = [pytest.mark.tensorrt, pytest.mark.gpu]

PROMPT = "a lighthouse at night, oil painting"


@pytest.fixture(scope="module")
def engines(tiny_config, exported_run, tmp_path_factory):
    """``{backend: engines directory}`` from one export."""
    out = {}
    for backend in (Backend.TENSORRT, Backend.ONNXRUNTIME):
        run_dir = tmp_path_factory.mktemp(f"run-{backend.value}") / exported_run.name
        shutil.copytree(exported_run, run_dir, symlinks=True)
        build(tiny_config, run_dir, backend)
        out[backend] = run_dir / "engines"
    return out


def _png(result, i=0) -> bytes:
    return png_bytes(result.images[i], png_parameters(result.params, result.engine_digest, i))


def test_tensorrt_runtime_is_deterministic_and_close_to_onnxruntime(engines):
    request = GenerationRequest(PROMPT, seed=5, num_images=2)
    with Sd35Runtime.load(engines[Backend.TENSORRT]) as rt:
        assert rt.device.type == "cuda"
        first, second = rt.generate(request), rt.generate(request)
    with Sd35Runtime.load(engines[Backend.ONNXRUNTIME], device="cpu") as ort:
        reference = ort.generate(request)
    assert _png(first) == _png(second) and _png(first, 1) == _png(second, 1)
    values = [psnr(np.asarray(a), np.asarray(b)) for a, b in zip(reference.images, first.images, strict=True)]
    print(f"\nTensorRT vs ONNX Runtime (same FP8 export): PSNR {', '.join(f'{v:.1f}' for v in values)} dB")
    assert min(values) > 25.0
    t = first.timings
    assert len(t.step_s) == first.params.num_inference_steps and all(s > 0 for s in t.step_s)
    assert t.device_memory_bytes and t.peak_memory_bytes > 0
    assert "device memory" in t.format()
    assert t.activation_memory_bytes and "activations" in t.format()  # one shared buffer


def test_cuda_graphs_and_low_vram_give_the_same_bytes(engines):
    # Skip-layer guidance alternates transformer batches 2N and N inside its window, so graphs
    # are replayed for two shapes.
    request = GenerationRequest(PROMPT, seed=9, num_images=1)
    outputs = []
    for kwargs in ({"use_cuda_graph": True}, {"use_cuda_graph": False}, {"low_vram": True}):
        with Sd35Runtime.load(engines[Backend.TENSORRT], **kwargs) as rt:
            outputs.append(_png(rt.generate(request)))
    assert outputs[0] == outputs[1] == outputs[2]


def test_nan_from_a_tensorrt_engine_is_named(engines, tmp_path, monkeypatch):
    from sd35trt.backends.tensorrt import TrtEngine

    real = TrtEngine.infer

    def poisoned(self, feeds):
        out = real(self, feeds)
        if self.name == "transformer":
            out["noise_pred"] = out["noise_pred"].clone()
            out["noise_pred"].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(TrtEngine, "infer", poisoned)
    with pytest.raises(NonFiniteError, match="transformer produced") as err:
        run(engines[Backend.TENSORRT], PROMPT, seed=1, out=tmp_path / "x.png")
    assert err.value.stage == "transformer"
    assert list(tmp_path.iterdir()) == []
