"""LoRA files: finding them, refusing ones that do not fit the model, fusing with diffusers' loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from sd35trt.config import LoraSettings
from sd35trt.errors import ModelError
from sd35trt.models.lora import check_lora, fuse_loras, resolve_loras


@pytest.fixture(scope="module")
def transformer(tiny_model_dir):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel.from_pretrained(tiny_model_dir, subfolder="transformer").eval()


def _lora(path, tensors: dict[str, tuple[int, ...]]):
    save_file({k: np.zeros(shape, np.float32) for k, shape in tensors.items()}, path)
    return resolve_loras([LoraSettings(path=str(path))])[0]


# The tiny transformer's blocks have width 32 (2 heads x 16); to_q maps 32 -> 32.
Q = "transformer.transformer_blocks.0.attn.to_q"


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        (
            {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": (4, 32)},
            r"is not an SD3 LoRA \(diffusers format\): key 'unet\.down_blocks.*' belongs to none of "
            r"transformer, text_encoder, text_encoder_2 \(a LoRA for another architecture\?\)",
        ),
        (
            {"transformer.transformer_blocks.9.attn.to_q.lora_A.weight": (4, 32)},
            r"key 'transformer\.transformer_blocks\.9\.attn\.to_q\.lora_A\.weight' names "
            r"transformer\.transformer_blocks\.9\.attn\.to_q, which this model does not have",
        ),
        (
            {f"{Q}.lora_A.weight": (4, 1536), f"{Q}.lora_B.weight": (32, 4)},
            rf"key '{Q}\.lora_A\.weight' has shape \[4, 1536\], but "
            r"transformer\.transformer_blocks\.0\.attn\.to_q has 32 inputs "
            r"\(a LoRA for another model size\?\)",
        ),
        (
            {f"{Q}.lora_A.weight": (4, 32), f"{Q}.lora_B.weight": (32, 8)},
            rf"rank mismatch at key '{Q}\.lora_B\.weight': "
            rf"{Q}\.lora_A\.weight rank 4, {Q}\.lora_B\.weight rank 8",
        ),
    ],
    ids=["sdxl-unet", "missing-block", "other-size", "rank"],
)
def test_lora_that_does_not_fit_names_file_and_first_key(transformer, tmp_path, tensors, message):
    lora = _lora(tmp_path / "bad.safetensors", tensors)
    with pytest.raises(ModelError, match=message) as err:
        check_lora(lora, {"transformer": transformer})
    assert str(err.value).startswith(f"model.loras[0] {tmp_path / 'bad.safetensors'}")
    assert "\n" not in str(err.value)


def test_files_are_found_safetensors_only(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ModelError, match=r"w\.bin is a pickle file; sd35trt loads LoRAs as safetensors only"):
        resolve_loras([LoraSettings(path=str(tmp_path / "w.bin"))])
    with pytest.raises(ModelError, match="no such file or directory"):
        resolve_loras([LoraSettings(path=str(tmp_path / "nowhere.safetensors"))])
    for name in ("a.safetensors", "b.safetensors"):
        save_file({"transformer.x.lora_A.weight": np.zeros((1, 1), np.float32)}, tmp_path / name)
    with pytest.raises(
        ModelError, match=r"holds 2 \.safetensors files \(a\.safetensors, b\.safetensors\); name one"
    ):
        resolve_loras([LoraSettings(path=str(tmp_path))])
    (picked,) = resolve_loras([LoraSettings(path=str(tmp_path), weight_name="b.safetensors", scale=0.3)])
    assert picked.file.name == "b.safetensors" and len(picked.sha256) == 64 and picked.scale == 0.3
    (tmp_path / "t.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ModelError, match=r"is (damaged or )?truncated"):
        resolve_loras([LoraSettings(path=str(tmp_path / "t.safetensors"))])


def test_fused_transformer_equals_diffusers_dynamic_lora(tiny_model_dir, lora_maker, tmp_path):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    file = lora_maker(tiny_model_dir, tmp_path / "lora")
    (lora,) = resolve_loras([LoraSettings(path=str(file), scale=0.6)])
    fused = SD3Transformer2DModel.from_pretrained(tiny_model_dir, subfolder="transformer").eval()
    fuse_loras({"transformer": fused}, [lora])
    assert type(fused.transformer_blocks[0].attn.to_q) is torch.nn.Linear  # merged and unloaded

    dynamic = SD3Transformer2DModel.from_pretrained(tiny_model_dir, subfolder="transformer").eval()
    StableDiffusion3Pipeline.load_lora_into_transformer(
        StableDiffusion3Pipeline.lora_state_dict(str(file)), transformer=dynamic, adapter_name="x"
    )
    base = SD3Transformer2DModel.from_pretrained(tiny_model_dir, subfolder="transformer").eval()
    g = torch.Generator().manual_seed(0)
    feeds = {
        "hidden_states": torch.randn(1, 16, 8, 8, generator=g),
        "encoder_hidden_states": torch.randn(1, 20, 96, generator=g),
        "pooled_projections": torch.randn(1, 80, generator=g),
        "timestep": torch.tensor([500.0]),
    }
    with torch.no_grad():
        ours = fused(**feeds).sample
        theirs = dynamic(**feeds, joint_attention_kwargs={"scale": 0.6}).sample
        plain = base(**feeds).sample
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert (ours - plain).abs().max() > 1e-2  # the LoRA changed the model


def test_text_encoder_lora_is_fused_like_diffusers_loads_it(tiny_model_dir, lora_maker, tmp_path):
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    file = lora_maker(tiny_model_dir, tmp_path / "lora", text_encoder=True)
    (lora,) = resolve_loras([LoraSettings(path=str(file), scale=0.7)])

    def clip():
        return CLIPTextModelWithProjection.from_pretrained(tiny_model_dir, subfolder="text_encoder").eval()

    fused, dynamic, base = clip(), clip(), clip()
    fuse_loras({"text_encoder": fused, "transformer": None}, [lora])
    StableDiffusion3Pipeline.load_lora_into_text_encoder(
        StableDiffusion3Pipeline.lora_state_dict(str(file)),
        network_alphas=None,
        text_encoder=dynamic,
        prefix="text_encoder",
        lora_scale=0.7,
        adapter_name="x",
    )
    ids = torch.randint(0, 500, (2, 77), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs, plain = (
            m(ids, output_hidden_states=True).hidden_states[-2] for m in (fused, dynamic, base)
        )
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert (ours - plain).abs().max() > 1e-3
