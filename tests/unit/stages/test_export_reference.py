"""The FP8/BF16 validation reference computes in float32 without a float32 copy of the model."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def _patch_embed():
    """diffusers' SD3 patch embedding: a Conv and a positional table cropped to the latent."""
    from diffusers.models.embeddings import PatchEmbed

    torch.manual_seed(0)
    embed = PatchEmbed(height=16, width=16, patch_size=2, in_channels=4, embed_dim=32, pos_embed_max_size=24)
    embed.pos_embed.normal_()  # the sin-cos table, made less regular
    return embed.eval()


def test_float32_compute_equals_a_float32_copy_and_leaves_the_model_as_it_was():
    from sd35trt.stages.export.reference import float32_compute

    narrow = _patch_embed().to(torch.bfloat16)
    wide = _patch_embed().to(torch.bfloat16).float()  # the same bf16 values, widened
    x = torch.randn(2, 4, 12, 8)
    weight, table = narrow.proj.weight, narrow.pos_embed
    with torch.no_grad(), float32_compute(narrow):
        got = narrow(x)
    assert got.dtype == torch.float32
    assert torch.equal(got, wide(x).detach())  # bit for bit: BF16 -> float32 is exact
    assert narrow.proj.weight is weight and narrow.pos_embed is table and weight.dtype == torch.bfloat16
    assert not narrow.proj._forward_pre_hooks and not narrow.proj._forward_hooks


def test_float32_compute_leaves_buffers_narrow():
    """SD3.5-medium's positional table is [1, 384 * 384, 1536]: widened whole it cost 0.84 GiB at
    full size, though only a crop of it is added (promoted exactly) to the float32 latent."""
    from sd35trt.stages.export.reference import float32_compute

    narrow = _patch_embed().to(torch.bfloat16)
    seen = []
    with torch.no_grad(), float32_compute(narrow):
        # registered after float32_compute's own hooks, so these run after its widening
        narrow.register_forward_pre_hook(lambda m, _args: seen.append(("table", m.pos_embed.dtype)))
        narrow.proj.register_forward_pre_hook(lambda m, _args: seen.append(("conv", m.weight.dtype)))
        narrow(torch.randn(1, 4, 8, 8))
    # the table stays bf16 while the Conv computes with float32 weights
    assert seen == [("table", torch.bfloat16), ("conv", torch.float32)]


@pytest.mark.parametrize("latent_side", [8, 10, 14])
def test_a_cropped_positional_table_gives_every_smaller_latent_the_same_embedding(latent_side):
    from sd35trt.stages.export.reference import crop_pos_embed

    full, cropped = _patch_embed(), _patch_embed()
    freed = crop_pos_embed(cropped, latent_side)
    keep = cropped.pos_embed_max_size
    assert keep < 24 and (24 - keep) % 2 == 0 and keep * 2 >= latent_side
    assert freed == (24 * 24 - keep * keep) * 32 * 4
    with torch.no_grad():
        for h, w in [(2, 2), (4, 2), (6, 8), (latent_side, latent_side), (latent_side - 2, latent_side)]:
            x = torch.randn(1, 4, h, w)
            assert torch.equal(cropped(x), full(x)), (h, w)
    assert crop_pos_embed(cropped, latent_side) == 0  # already small enough
