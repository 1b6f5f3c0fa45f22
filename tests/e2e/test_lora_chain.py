"""A LoRA fused before calibration, end to end, with the model and the LoRA given by Hub repo id.

The tiny model and a LoRA made here with peft (transformer and CLIP-L) sit in an offline Hugging
Face cache (``HF_HUB_OFFLINE=1``); the config names both by repo id. Parity: non-quantized ONNX
Runtime engines against diffusers with ``load_lora_weights`` at the same scale, within 2/255;
FP8 engines (calibrated with the LoRA fused) within the usual PSNR of that reference. Then what is
recorded (manifests, PNG, ``inspect``) and that a new scale or new LoRA bytes make the chain stale.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from sd35trt.artifacts.files import sha256_file
from sd35trt.artifacts.manifest import RunManifest, Stage
from sd35trt.artifacts.records import Fingerprint
from sd35trt.config import Backend
from sd35trt.errors import StaleArtifactError
from sd35trt.metrics import psnr
from sd35trt.models.loading import weights_identity
from sd35trt.models.reference import reference_images
from sd35trt.runtime.pipeline import GenerationRequest, Sd35Runtime
from sd35trt.runtime.png import read_png_parameters

pytestmark = pytest.mark.slow

PROMPT = "a red fox in the snow, watercolor"
MODEL_REPO, LORA_REPO = "sd35trt-test/tiny-sd35", "sd35trt-test/tiny-lora"
MODEL_COMMIT, LORA_COMMIT = "1" * 40, "2" * 40
SCALE = 0.8


@pytest.fixture(scope="module")
def hub(tiny_model_dir, hf_repo_writer, lora_maker, tmp_path_factory):
    """An offline Hugging Face cache holding the tiny model and a LoRA, in this module's environment."""
    root = tmp_path_factory.mktemp("hf")
    lora_dir = root / "lora-src"
    lora_file = lora_maker(tiny_model_dir, lora_dir, rank=4, seed=3, text_encoder=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_CACHE", str(root / "cache"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        hf_repo_writer(root / "cache", MODEL_REPO, tiny_model_dir, MODEL_COMMIT)
        snapshot = hf_repo_writer(root / "cache", LORA_REPO, lora_dir, LORA_COMMIT)
        yield {"cache": root / "cache", "lora": snapshot / lora_file.name, "lora_src": lora_dir}


def _lora_config(tiny_config, quantize: bool, scale: float = SCALE):
    model = {"source": "hub", "path": MODEL_REPO, "loras": [{"path": LORA_REPO, "scale": scale}]}
    calibrate = {"num_prompts": 2, "steps": 2, "report_prompts": 1, "report_steps": 1}
    return tiny_config.model_copy(
        update={
            "model": tiny_config.model.model_validate(model),
            "calibrate": tiny_config.calibrate.model_copy(update=calibrate),
            "export": tiny_config.export.model_copy(update={"quantize": quantize}),
        }
    )


@pytest.fixture(scope="module")
def lora_run(hub, tiny_config, tmp_path_factory):
    """Non-quantized engines with the LoRA fused."""
    from sd35trt.stages.build import build
    from sd35trt.stages.export import export

    run_dir = tmp_path_factory.mktemp("lora-fp32") / "tiny-lora"
    config = _lora_config(tiny_config, quantize=False)
    export(config, run_dir)
    build(config, run_dir, Backend.ONNXRUNTIME)
    return run_dir


@pytest.fixture(scope="module")
def lora_fp8_run(hub, tiny_config, tmp_path_factory):
    """FP8 engines calibrated with the LoRA fused."""
    from sd35trt.stages.build import build
    from sd35trt.stages.calibrate import calibrate
    from sd35trt.stages.export import export

    run_dir = tmp_path_factory.mktemp("lora-fp8") / "tiny-lora"
    config = _lora_config(tiny_config, quantize=True)
    calibrate(config, run_dir, log=lambda _line: None)
    export(config, run_dir, progress=lambda _line: None)
    build(config, run_dir, Backend.ONNXRUNTIME, progress=lambda _line: None)
    return run_dir


@pytest.fixture(scope="module")
def reference(hub, tiny_model_dir, tiny_config):
    """diffusers with the LoRA loaded (not fused) by ``load_lora_weights`` at the same scale: 2 images."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(hub["lora_src"]), adapter_name="tiny")
    pipe.set_adapters(["tiny"], adapter_weights=[SCALE])
    return reference_images(pipe, tiny_config.runtime, [PROMPT] * 2, seed=11)


def _max_diff(a, b) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def test_engines_with_fused_lora_match_diffusers_load_lora_weights(
    lora_run, reference, reference_pipe, tiny_config
):
    with Sd35Runtime.load(lora_run / "engines") as rt:
        ours = rt.generate(GenerationRequest(PROMPT, seed=11, num_images=2)).images
    diffs = [_max_diff(a, b) for a, b in zip(ours, reference, strict=True)]
    print(
        f"\nLoRA parity (scale {SCALE}, 128x128, batch 2): max pixel difference vs diffusers {max(diffs)}/255"
    )
    assert max(diffs) <= 2
    base = reference_images(reference_pipe, tiny_config.runtime, [PROMPT], seed=11)[0]
    assert _max_diff(ours[0], base) > 20  # the LoRA is in the engines


def test_fp8_engines_with_lora_within_psnr_of_the_reference(lora_fp8_run, reference):
    with Sd35Runtime.load(lora_fp8_run / "engines") as rt:
        assert rt.engines.engines  # loaded
        ours = rt.generate(GenerationRequest(PROMPT, seed=11, num_images=2)).images
    values = [psnr(np.asarray(a), np.asarray(b)) for a, b in zip(ours, reference, strict=True)]
    print(f"\nFP8 + LoRA engines vs diffusers with the LoRA: PSNR {', '.join(f'{v:.1f}' for v in values)} dB")
    assert min(values) > 35.0


def test_lora_and_revision_are_recorded_everywhere(lora_fp8_run, hub, tmp_path):
    from sd35trt.info import format_manifest
    from sd35trt.run import run

    sha = sha256_file(hub["lora"])
    expected = {
        "path": LORA_REPO,
        "file": "pytorch_lora_weights.safetensors",
        "sha256": sha,
        "scale": SCALE,
        "hub": {"repo_id": LORA_REPO, "revision": "main", "commit": LORA_COMMIT},
    }
    records = RunManifest(lora_fp8_run).load()
    for stage in (Stage.CALIBRATE, Stage.EXPORT):
        model = records[stage].details.to_json()["model"]
        assert model["loras"] == [expected]
        assert model["hub"] == {"repo_id": MODEL_REPO, "revision": "main", "commit": MODEL_COMMIT}
    engines = json.loads((lora_fp8_run / "engines" / "manifest.json").read_text())
    assert engines["model"]["loras"] == [expected] and engines["model"]["hub"]["commit"] == MODEL_COMMIT

    out = run(lora_fp8_run / "engines", PROMPT, seed=2, out=tmp_path / "a.png")
    meta = read_png_parameters(out.paths[0])
    assert meta["loras"] == [{"file": "pytorch_lora_weights.safetensors", "sha256": sha, "scale": SCALE}]
    assert meta["model"] == {"repo_id": MODEL_REPO, "commit": MODEL_COMMIT}

    text = format_manifest(lora_fp8_run)
    assert f"model: {MODEL_REPO} @ {MODEL_COMMIT[:12]}" in text
    assert f"lora {LORA_REPO} sha256 {sha[:12]} x {SCALE:g}" in text


def test_new_scale_or_new_lora_bytes_make_the_chain_stale(
    lora_run, hub, tiny_config, tiny_model_dir, hf_repo_writer, lora_maker, tmp_path
):
    from sd35trt.stages.build import build

    rescaled = _lora_config(tiny_config, quantize=False, scale=0.5)
    # Issue 26.5: the message names what changed (not every section the stage depends on) and the
    # one command that brings the chain up to date.
    with pytest.raises(StaleArtifactError) as err:
        build(rescaled, lora_run, Backend.ONNXRUNTIME, hint="--config c.yaml")
    message = str(err.value)
    assert re.search(r"export output .* is stale: model\.loras\[0\]\.scale [0-9.]+ → 0\.5", message), message
    assert "runtime" not in message and "[model, export" not in message, message
    assert message.endswith("bring the chain up to date with `sd35trt build --upstream --config c.yaml`"), (
        message
    )

    config = _lora_config(tiny_config, quantize=False)
    digest = Fingerprint.of(config, Stage.EXPORT, weights_identity(config))
    assert RunManifest(lora_run).verified(Stage.EXPORT, digest)  # fresh as it is
    # The same repo id at a new commit with other bytes: the resolved LoRA changes, the export is stale.
    retrained = tmp_path / "retrained"
    lora_maker(tiny_model_dir, retrained, rank=4, seed=4)
    hf_repo_writer(hub["cache"], LORA_REPO, retrained, "3" * 40)
    try:
        with pytest.raises(StaleArtifactError, match=r"export output .* is stale"):
            build(config, lora_run, Backend.ONNXRUNTIME)
    finally:
        hf_repo_writer(hub["cache"], LORA_REPO, hub["lora_src"], LORA_COMMIT)  # refs/main back
