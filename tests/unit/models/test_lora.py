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


@pytest.mark.parametrize(("dtype", "name"), [(np.int8, "I8"), (np.bool_, "BOOL")])
def test_integer_and_boolean_loras_are_refused_naming_key_and_dtype(transformer, tmp_path, dtype, name):
    """faults.md #38: an int8 or bool LoRA was fused as its raw numbers (calibration PSNR 34 and 23 dB)."""
    path = tmp_path / "q.safetensors"
    save_file(
        {f"{Q}.lora_A.weight": np.ones((4, 32), dtype), f"{Q}.lora_B.weight": np.ones((32, 4), dtype)}, path
    )
    (lora,) = resolve_loras([LoraSettings(path=str(path))])
    fused = {"transformer": transformer}
    with pytest.raises(
        ModelError, match=rf"key '{Q}\.lora_A\.weight' has dtype {name}; a LoRA's weights must be floating"
    ):
        fuse_loras(fused, [lora])
    assert type(transformer.transformer_blocks[0].attn.to_q) is torch.nn.Linear  # nothing was loaded


def test_alpha_keys_scale_the_update_by_alpha_over_rank(tiny_model_dir, lora_maker, tmp_path):
    """faults.md #38 (diffusers#14088): ``<module>.alpha`` keys were ignored, so a LoRA trained with
    alpha = rank / 2 was fused at twice its strength. The fused weights now equal the same LoRA
    without alpha keys fused at scale alpha / rank."""
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import load_file
    from safetensors.torch import save_file as save_torch

    plain = lora_maker(tiny_model_dir, tmp_path / "plain", rank=4)
    tensors = load_file(plain)
    modules = {k.removesuffix(".lora_A.weight") for k in tensors if k.endswith(".lora_A.weight")}
    with_alpha = tmp_path / "alpha.safetensors"
    save_torch(tensors | {f"{m}.alpha": torch.tensor(2.0) for m in modules}, with_alpha)  # alpha 2, rank 4

    def fused(path, scale):
        model = SD3Transformer2DModel.from_pretrained(tiny_model_dir, subfolder="transformer").eval()
        fuse_loras({"transformer": model}, list(resolve_loras([LoraSettings(path=str(path), scale=scale)])))
        return model.transformer_blocks[0].attn.to_q.weight.detach()

    base = SD3Transformer2DModel.from_pretrained(tiny_model_dir, subfolder="transformer")
    w0 = base.transformer_blocks[0].attn.to_q.weight.detach()
    half, full, alpha = fused(plain, 0.5), fused(plain, 1.0), fused(with_alpha, 1.0)
    assert (full - w0).abs().max() > 1e-3
    torch.testing.assert_close(alpha, half, atol=1e-6, rtol=0)
    assert not torch.allclose(alpha, full, atol=1e-4)


def test_alpha_without_its_lora_pair_is_refused(transformer, tmp_path):
    path = tmp_path / "a.safetensors"
    save_file(
        {
            f"{Q}.lora_A.weight": np.zeros((4, 32), np.float32),
            f"{Q}.lora_B.weight": np.zeros((32, 4), np.float32),
            "transformer.transformer_blocks.0.attn.to_k.alpha": np.array(2.0, np.float32),
        },
        path,
    )
    with pytest.raises(
        ModelError, match=r"key 'transformer\.transformer_blocks\.0\.attn\.to_k\.alpha' belongs to no module"
    ):
        check_lora(resolve_loras([LoraSettings(path=str(path))])[0], {"transformer": transformer})


def _raw_safetensors(path, header: bytes, data: bytes = b"") -> None:
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (b'["a", "b"]', r"has a malformed header: a JSON list, not an object"),
        (b'"weights"', r"has a malformed header: a JSON str, not an object"),
        (
            b'{"w": {"dtype": "F32", "shape": ["4"], "data_offsets": [0, 16]}}',
            r"has a malformed header: key 'w' has shape \['4'\], not a list",
        ),
        (
            b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": ["0", 16]}}',
            r"has a malformed header: key 'w' has data_offsets \['0', 16\]",
        ),
        (b'{"w": [1, 2]}', r"has a malformed header: key 'w' maps to a JSON list"),
    ],
    ids=["list", "string", "shape", "offset", "entry"],
)
def test_malformed_safetensors_headers_name_file_and_key(tmp_path, header, message):
    """faults.md #38: these were AttributeError / TypeError tracebacks, for LoRAs and model shards alike."""
    from sd35trt.models.loading import check_weights

    lora = tmp_path / "lora.safetensors"
    _raw_safetensors(lora, header, bytes(16))
    with pytest.raises(ModelError, match=rf"safetensors file .*lora\.safetensors {message}"):
        resolve_loras([LoraSettings(path=str(lora))])
    model = tmp_path / "model" / "transformer"
    model.mkdir(parents=True)
    _raw_safetensors(model / "diffusion_pytorch_model.safetensors", header, bytes(16))
    with pytest.raises(ModelError, match=rf"diffusion_pytorch_model\.safetensors {message}") as err:
        check_weights(tmp_path / "model")
    assert "\n" not in str(err.value)
