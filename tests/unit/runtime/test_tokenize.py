"""Tokenization as diffusers does it (padding, truncation), with truncation reported."""

import pytest
import torch

from sd35trt.components import Component
from sd35trt.errors import ManifestError
from sd35trt.models.tiny import clip_tokenizer, t5_tokenizer
from sd35trt.runtime.tokenize import PromptTokenizer


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    clip_tokenizer().save_pretrained(root / "tokenizer")
    clip_tokenizer().save_pretrained(root / "tokenizer_2")
    t5_tokenizer().save_pretrained(root / "tokenizer_3")
    return root


def test_ids_match_diffusers_calls(saved):
    tok = PromptTokenizer.load(saved, t5_length=32)
    out = tok(["", "a red fox"])
    clip, t5 = clip_tokenizer(), t5_tokenizer()
    # diffusers' _get_clip_prompt_embeds / _get_t5_prompt_embeds arguments.
    want_clip = clip(
        ["", "a red fox"], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    )
    want_t5 = t5(
        ["", "a red fox"],
        padding="max_length",
        max_length=32,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    )
    assert out.clip_l.shape == (2, 77) and out.t5.shape == (2, 32)
    assert out.clip_l.dtype == torch.int64
    assert torch.equal(out.clip_l, want_clip.input_ids) and torch.equal(out.clip_g, want_clip.input_ids)
    assert torch.equal(out.t5, want_t5.input_ids)
    assert out.truncations == ()


def test_truncation_is_reported_per_encoder(saved):
    tok = PromptTokenizer.load(saved, t5_length=256)
    long = "x" * 80 + "tail"  # tiny CLIP: 80 "x" tokens, "ta", "il</w>", + start and end tokens
    out = tok(["short", long])
    assert out.clip_l.shape == (2, 77)
    assert {(t.index, t.encoder) for t in out.truncations} == {(1, Component.CLIP_L), (1, Component.CLIP_G)}
    t = out.truncations[0]
    assert t.tokens == 84 and t.limit == 77
    assert t.dropped.replace(" ", "").endswith("xtail")


def test_missing_tokenizer_is_named(saved, tmp_path):
    (tmp_path / "tokenizer").mkdir()
    with pytest.raises(ManifestError, match="tokenizer_2 is missing"):
        PromptTokenizer.load(tmp_path, t5_length=256)
