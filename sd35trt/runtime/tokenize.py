"""The three SD3.5 tokenizers, loaded from the copies that travel with the engines.

Tokenization is diffusers' exactly (``StableDiffusion3Pipeline._get_clip_prompt_embeds`` and
``_get_t5_prompt_embeds``): the same transformers tokenizer classes, CLIP padded and truncated
to 77 tokens, T5 padded and truncated to the engine's sequence length, special tokens added.
What truncation dropped is reported instead of only logged, so callers can surface it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sd35trt.components import CLIP_MAX_LENGTH, TOKENIZER_SUBFOLDERS, Component
from sd35trt.errors import ManifestError, first_line

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Truncation:
    """A text that did not fit one encoder's token limit.

    Attributes:
        index: position of the text in the tokenized batch.
        encoder: the text encoder whose tokenizer truncated it.
        tokens: its length in tokens (special tokens included) before truncation.
        limit: the tokens kept.
        dropped: the text that was cut off.
    """

    index: int
    encoder: Component
    tokens: int
    limit: int
    dropped: str

    #: Characters of dropped text a report quotes; a long prompt's tail is not repeated whole.
    EXCERPT_CHARS = 60

    @property
    def excerpt(self) -> str:
        """The start of the dropped text, cut to :attr:`EXCERPT_CHARS` with its full length noted."""
        text = " ".join(self.dropped.split())
        if len(text) <= self.EXCERPT_CHARS:
            return repr(text)
        return f"{text[: self.EXCERPT_CHARS]!r}... ({len(text)} characters)"


@dataclass(frozen=True)
class TokenizedPrompts:
    """Token ids of a batch of texts for the three encoders.

    Attributes:
        clip_l: ``[N, 77]`` int64.
        clip_g: ``[N, 77]`` int64.
        t5: ``[N, L]`` int64, ``L`` the T5 sequence length of the engines.
        truncations: every text that was cut, per encoder.
    """

    clip_l: torch.Tensor
    clip_g: torch.Tensor
    t5: torch.Tensor
    truncations: tuple[Truncation, ...]

    def ids(self, encoder: Component) -> torch.Tensor:
        return {Component.CLIP_L: self.clip_l, Component.CLIP_G: self.clip_g, Component.T5: self.t5}[encoder]


class PromptTokenizer:
    """CLIP-L, CLIP-G and T5 tokenization for a fixed T5 sequence length."""

    def __init__(
        self,
        tokenizers: dict[Component, PreTrainedTokenizerBase],
        t5_length: int,
    ) -> None:
        """
        Args:
            tokenizers: a transformers tokenizer for each of ``clip_l``, ``clip_g`` and ``t5``.
            t5_length: tokens per text for T5 (the engine's static ``t5_length``).
        """
        self.tokenizers = dict(tokenizers)
        self.lengths = {
            Component.CLIP_L: CLIP_MAX_LENGTH,
            Component.CLIP_G: CLIP_MAX_LENGTH,
            Component.T5: t5_length,
        }

    @classmethod
    def load(cls, directory: str | Path, t5_length: int) -> PromptTokenizer:
        """Load the three tokenizer folders of an engines (or diffusers model) ``directory``.

        Raises:
            ManifestError: a tokenizer folder is missing or transformers cannot read it.
        """
        from transformers import CLIPTokenizer, T5Tokenizer

        tokenizers = {}
        for encoder, sub in TOKENIZER_SUBFOLDERS.items():
            path = Path(directory) / sub
            if not path.is_dir():
                raise ManifestError(f"{path} is missing: {directory} lacks the {encoder.value} tokenizer")
            try:
                kind = T5Tokenizer if encoder is Component.T5 else CLIPTokenizer
                tokenizers[encoder] = kind.from_pretrained(path, local_files_only=True)
            except (OSError, ValueError, TypeError) as err:
                first = first_line(err)
                raise ManifestError(
                    f"cannot load the {encoder.value} tokenizer from {path}: {first}"
                ) from None
        return cls(tokenizers, t5_length)

    def __call__(self, texts: Sequence[str]) -> TokenizedPrompts:
        """Tokenize the texts of one batch (e.g. ``[negative, positive]``) for the three encoders."""
        ids: dict[Component, torch.Tensor] = {}
        truncations: list[Truncation] = []
        for encoder, tokenizer in self.tokenizers.items():
            limit = self.lengths[encoder]
            ids[encoder] = tokenizer(
                list(texts),
                padding="max_length",
                max_length=limit,
                truncation=True,
                add_special_tokens=True,
                return_tensors="pt",
            ).input_ids.to(torch.int64)  # [N, limit]
            for index, text in enumerate(texts):
                full = tokenizer(text, add_special_tokens=True, verbose=False).input_ids
                if len(full) > limit:
                    # As diffusers reports it: the tokens after the kept ones, minus the end token.
                    dropped = tokenizer.decode(full[limit - 1 : -1])
                    truncations.append(Truncation(index, encoder, len(full), limit, dropped))
        return TokenizedPrompts(
            clip_l=ids[Component.CLIP_L],
            clip_g=ids[Component.CLIP_G],
            t5=ids[Component.T5],
            truncations=tuple(truncations),
        )


#: Characters of dropped text quoted in a truncation warning; the rest is counted. Quoting all of
#: it made a 64 KB prompt's response 400 KB (one full copy per encoder).
TRUNCATION_QUOTE_CHARS = 80


def _dropped(text: str) -> str:
    if len(text) <= TRUNCATION_QUOTE_CHARS:
        return repr(text)
    return f"{text[:TRUNCATION_QUOTE_CHARS]!r}... ({len(text)} characters in all)"


def truncation_warnings(tokens: TokenizedPrompts, labels: Sequence[tuple[int, str]]) -> dict[int, list[str]]:
    """One warning per truncated prompt, keyed by request: ``labels[i]`` is ``(request, field)``
    of the i-th tokenized text."""
    warnings: dict[int, list[str]] = {}
    for t in tokens.truncations:
        request, field_name = labels[t.index]
        warnings.setdefault(request, []).append(
            f"{field_name} is {t.tokens} {t.encoder.value} tokens, over its limit of {t.limit}: "
            f"dropped {_dropped(t.dropped)}"
        )
    return warnings
