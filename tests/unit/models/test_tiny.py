import hashlib
import json
from pathlib import Path

import pytest

from sd35trt.components import Component, ModelDims
from sd35trt.config import Architecture
from sd35trt.models.tiny import architecture_config, t5_tokenizer, write_architecture, write_tiny


def _digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "sd35trt_model.json"
    }


def test_same_seed_gives_byte_identical_files(tiny_model_dir, tmp_path):
    again = write_tiny(tmp_path / "again", seed=0)
    assert _digests(again) == _digests(tiny_model_dir)
    other = write_tiny(tmp_path / "other", seed=1)
    d0, d1 = _digests(tiny_model_dir), _digests(other)
    assert (
        d0["transformer/diffusion_pytorch_model.safetensors"]
        != d1["transformer/diffusion_pytorch_model.safetensors"]
    )
    assert d0["transformer/config.json"] == d1["transformer/config.json"]


def test_tiny_is_sd35_shaped_and_small(tiny_model_dir):
    tr = json.loads((tiny_model_dir / "transformer" / "config.json").read_text())
    assert tr["qk_norm"] == "rms_norm" and len(tr["dual_attention_layers"]) >= 1
    assert tr["patch_size"] == 2 and tr["in_channels"] == 16
    sched = json.loads((tiny_model_dir / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "FlowMatchEulerDiscreteScheduler" and sched["shift"] == 3.0
    dims = ModelDims.from_model_dir(tiny_model_dir)
    assert dims.latent_channels == 16 and dims.vae_scale_factor == 8
    # CLIP-L + CLIP-G hidden sizes are zero-padded up to the T5 width, as in SD3.5 (768+1280 < 4096).
    assert dims.clip_l_hidden + dims.clip_g_hidden < dims.t5_hidden == dims.joint_attention_dim
    assert dims.pooled_projection_dim == dims.clip_l_projection + dims.clip_g_projection
    size = sum(p.stat().st_size for p in tiny_model_dir.rglob("*") if p.is_file())
    assert size < 4 * 2**20


def test_diffusers_loads_and_generates_on_cpu(tiny_model_dir):
    import numpy as np
    import torch
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_model_dir)
    out = pipe(
        "a photo of a cat",
        num_inference_steps=2,
        height=64,
        width=96,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert out.shape == (1, 64, 96, 3)
    assert np.isfinite(out).all() and out.std() > 0
    assert pipe.tokenizer("a cat").input_ids[0] == pipe.tokenizer.bos_token_id
    assert pipe.tokenizer_3("a cat").input_ids[-1] == pipe.tokenizer_3.eos_token_id


@pytest.mark.parametrize("arch", [Architecture.SD35_MEDIUM, Architecture.SD35_LARGE])
def test_real_architecture_shapes_without_weights(arch, tmp_path):
    out = write_architecture(tmp_path / arch.value, arch)
    dims = ModelDims.from_model_dir(out)
    assert not list(out.rglob("*.safetensors"))
    assert (dims.joint_attention_dim, dims.pooled_projection_dim, dims.head_dim) == (4096, 2048, 64)
    expected = {Architecture.SD35_MEDIUM: (24, 384), Architecture.SD35_LARGE: (38, 192)}[arch]
    assert (dims.num_layers, dims.pos_embed_max_size) == expected
    assert architecture_config(arch).transformer["caption_projection_dim"] == dims.num_heads * 64


def test_the_tiny_tokenizers_fit_the_shipped_prompts_the_tiny_config_calibrates_with(tiny_config):
    """The tiny CLIP vocabulary has BPE merges for common prompt words (it was byte-level: every
    character a token, and the shipped calibration prompts were cut mid-word at 77 tokens)."""
    from sd35trt.models.tiny import clip_tokenizer
    from sd35trt.runtime.tokenize import PromptTokenizer
    from sd35trt.stages.calibrate import read_prompts

    s = tiny_config.calibrate
    prompts = read_prompts(s.prompts, s.num_prompts, "prompts")
    prompts += read_prompts(s.heldout_prompts, s.report_prompts, "heldout_prompts")
    clip = clip_tokenizer()
    tokenizers = {c: clip for c in (Component.CLIP_L, Component.CLIP_G)}
    out = PromptTokenizer({**tokenizers, Component.T5: t5_tokenizer()}, 256)(prompts)
    assert out.truncations == ()
    assert clip.tokenize("a red fox in the snow, watercolor") == [
        f"{w}</w>" for w in ("a", "red", "fox", "in", "the", "snow", ",", "watercolor")
    ]
