"""The built-in tiny SD3.5-shaped pipeline, and random-weight instances of the real architectures.

The tiny pipeline has every structural feature of SD3.5 that the toolchain handles (MMDiT with
RMS qk-norm and a dual-attention block, patch size 2, 16 latent channels; two CLIP text encoders
with projection; a T5 encoder; a 16-channel AutoencoderKL with an 8x scale factor; flow-match
Euler with shift 3.0), at sizes that run on a CPU in seconds. Its tokenizers are built offline
from a fixed list of common prompt words. Same seed => byte-identical files. The published
shapes of sd3.5-medium and sd3.5-large can be built with random weights for scale tests.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd35trt.config import Architecture

if TYPE_CHECKING:
    import torch

    from sd35trt.components import ModelDims

CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 256
VAE_SCALING_FACTOR = 1.5305
VAE_SHIFT_FACTOR = 0.0609
SCHEDULER_SHIFT = 3.0

# Frequent words of image prompts: they make the T5 vocabulary word-level for common text and
# keep it deterministic (no trainer, no corpus).
_T5_WORDS = """
a an the of in on at with and or by from to for under over near above below photo photograph
painting drawing sketch render illustration portrait landscape close-up cat dog bird horse fox
owl fish dragon robot person woman man child girl boy old young red orange yellow green blue
purple pink brown black white gray golden silver light shadow sunset sunrise night day morning
evening rain snow fog storm cloud sky sea ocean river lake mountain forest desert city street
house castle tower bridge room window door table chair book cup flower tree garden field beach
island space star moon sun planet style detailed realistic cinematic soft warm cold bright dark
vivid neon studio lighting oil watercolor digital pixel art anime 3d wide angle macro aerial
view high quality sign that reads text word letter poster cover logo old new small large tiny
giant beautiful
""".split()


@dataclass(frozen=True)
class ArchitectureConfig:
    """Constructor arguments of every component for one architecture."""

    transformer: dict[str, Any]
    clip_l: dict[str, Any]
    clip_g: dict[str, Any]
    t5: dict[str, Any]
    vae: dict[str, Any]
    scheduler: dict[str, Any] = field(default_factory=lambda: {"shift": SCHEDULER_SHIFT})


def _clip(hidden: int, layers: int, heads: int, projection: int, act: str = "gelu", inter: int | None = None):
    return {
        "hidden_size": hidden,
        "intermediate_size": inter or 4 * hidden,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "projection_dim": projection,
        "max_position_embeddings": CLIP_MAX_LENGTH,
        "hidden_act": act,
    }


def _vae(channels: tuple[int, ...], layers: int, groups: int) -> dict[str, Any]:
    n = len(channels)
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * n,
        "up_block_types": ("UpDecoderBlock2D",) * n,
        "block_out_channels": channels,
        "layers_per_block": layers,
        "latent_channels": 16,
        "norm_num_groups": groups,
        "scaling_factor": VAE_SCALING_FACTOR,
        "shift_factor": VAE_SHIFT_FACTOR,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
    }


def _transformer(layers: int, heads: int, head_dim: int, pos: int, dual: tuple[int, ...], sample: int = 128):
    return {
        "sample_size": sample,
        "patch_size": 2,
        "in_channels": 16,
        "out_channels": 16,
        "num_layers": layers,
        "attention_head_dim": head_dim,
        "num_attention_heads": heads,
        "joint_attention_dim": 4096,
        "caption_projection_dim": heads * head_dim,
        "pooled_projection_dim": 2048,
        "pos_embed_max_size": pos,
        "qk_norm": "rms_norm",
        "dual_attention_layers": dual,
    }


def architecture_config(arch: Architecture) -> ArchitectureConfig:
    """Component shapes of ``arch`` (published diffusers configs for medium and large)."""
    if arch is Architecture.TINY:
        clip_l = _clip(hidden=32, layers=5, heads=4, projection=32, inter=37)
        clip_g = _clip(hidden=48, layers=5, heads=4, projection=48, inter=53)
        return ArchitectureConfig(
            transformer={
                **_transformer(layers=3, heads=2, head_dim=16, pos=32, dual=(0,), sample=16),
                "joint_attention_dim": 96,
                "pooled_projection_dim": clip_l["projection_dim"] + clip_g["projection_dim"],
            },
            clip_l=clip_l,
            clip_g=clip_g,
            t5={"d_model": 96, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4},
            vae=_vae((8, 8, 16, 16), layers=1, groups=4),
        )
    large_t5 = {
        "d_model": 4096,
        "d_kv": 64,
        "d_ff": 10240,
        "num_layers": 24,
        "num_heads": 64,
        "feed_forward_proj": "gated-gelu",
    }
    clip_l = _clip(hidden=768, layers=12, heads=12, projection=768, act="quick_gelu")
    clip_g = _clip(hidden=1280, layers=32, heads=20, projection=1280, inter=5120)
    vae = _vae((128, 256, 512, 512), layers=2, groups=32)
    if arch is Architecture.SD35_MEDIUM:
        tr = _transformer(layers=24, heads=24, head_dim=64, pos=384, dual=tuple(range(13)))
    else:
        tr = _transformer(layers=38, heads=38, head_dim=64, pos=192, dual=())
    return ArchitectureConfig(transformer=tr, clip_l=clip_l, clip_g=clip_g, t5=large_t5, vae=vae)


def model_dims(arch: Architecture) -> ModelDims:
    """The :class:`~sd35trt.components.ModelDims` of ``arch``, without building anything."""
    from sd35trt.components import ModelDims

    cfg = architecture_config(arch)
    return ModelDims.from_configs(cfg.transformer, cfg.clip_l, cfg.clip_g, cfg.t5, cfg.vae, source=arch.value)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP reversible byte -> printable unicode map."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def _clip_merges(words: Collection[str]) -> list[tuple[str, str]]:
    """BPE merges (pairs, by rank) learned from ``words``, deterministically.

    Byte-pair encoding's training loop, on each word once (its last symbol carrying ``</w>``):
    merge the most frequent adjacent pair, ties broken by the pair itself, until every word is
    one symbol. Listed words become one token; other words split into the subwords learned.
    """
    import itertools
    from collections import Counter

    pieces = [[*w[:-1], w[-1] + "</w>"] for w in dict.fromkeys(words) if w]
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter(p for word in pieces for p in itertools.pairwise(word))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for i, word in enumerate(pieces):
            out, j = [], 0
            while j < len(word):
                if j + 1 < len(word) and (word[j], word[j + 1]) == best:
                    out.append(word[j] + word[j + 1])
                    j += 2
                else:
                    out.append(word[j])
                    j += 1
            pieces[i] = out


def clip_tokenizer():
    """A CLIP BPE tokenizer: byte symbols, and merges that make the word list's words whole tokens."""
    from transformers import CLIPTokenizer

    symbols = sorted(_bytes_to_unicode().values())
    merges = _clip_merges(_T5_WORDS)
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    for merge in merges:
        vocab.setdefault("".join(merge), len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)


def t5_tokenizer():
    """A T5 Unigram tokenizer: specials, printable ASCII characters and a fixed word list."""
    from transformers import T5Tokenizer

    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    seen = {v for v, _ in vocab}
    # Words score above characters so common words stay whole; scores are log-probabilities.
    for i, w in enumerate(_T5_WORDS):
        tok = "\u2581" + w
        if tok not in seen:
            vocab.append((tok, -2.0 - i / 1000.0))
            seen.add(tok)
    for c in ["\u2581"] + [chr(c) for c in range(33, 127)]:
        for tok in (c, "\u2581" + c) if c != "\u2581" else (c,):
            if tok not in seen:
                vocab.append((tok, -8.0 - math.log1p(len(vocab)) / 100.0))
                seen.add(tok)
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=T5_MAX_LENGTH)


@contextlib.contextmanager
def _narrowed_as_built(dtype) -> Iterator[None]:
    """Cast each submodule to ``dtype`` as soon as its parent registers it, while a model is built.

    Modules initialize their weights in float32 (with the same random draws whatever ``dtype``);
    cast as they are built, one submodule's float32 weights exist at a time instead of a whole
    float32 copy of the model (sd3.5-large: 32 GB before the cast to BF16's 16 GB). The weights
    are those of building in float32 and casting after: each is rounded once.
    """
    import torch
    from torch.nn.modules.module import register_module_module_registration_hook

    if dtype == torch.float32:
        yield
        return

    def narrow(_parent, _name, child):
        return None if child is None else child.to(dtype)

    handle = register_module_module_registration_hook(narrow)
    try:
        yield
    finally:
        handle.remove()


def build_components(
    arch: Architecture,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype=None,
    only: Collection[str] | None = None,
):
    """The keyword arguments of ``StableDiffusion3Pipeline`` for ``arch``, seeded random weights.

    ``dtype`` defaults to float32; ``only``: build just these models (pipeline keyword names, e.g.
    ``{"transformer"}``; the others are None; each model has its own seed). The ControlNet is
    built only when ``only`` names it.
    """
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from sd35trt.components import SUBFOLDER, Component

    cfg = architecture_config(arch)
    tok_l, tok_3 = clip_tokenizer(), t5_tokenizer()
    special = {
        "vocab_size": len(tok_l),
        "bos_token_id": tok_l.bos_token_id,
        "eos_token_id": tok_l.eos_token_id,
        "pad_token_id": tok_l.pad_token_id,
    }
    dtype = dtype or torch.float32
    # One seed per component (seed * 1000 + its index here), so a component's weights don't
    # depend on the others' sizes.
    makers = {
        Component.TRANSFORMER: (0, lambda: SD3Transformer2DModel(**cfg.transformer)),
        Component.CLIP_L: (1, lambda: CLIPTextModelWithProjection(CLIPTextConfig(**cfg.clip_l, **special))),
        Component.CLIP_G: (2, lambda: CLIPTextModelWithProjection(CLIPTextConfig(**cfg.clip_g, **special))),
        Component.T5: (
            3,
            lambda: T5EncoderModel(
                T5Config(
                    **cfg.t5, vocab_size=len(tok_3), decoder_start_token_id=0, pad_token_id=0, eos_token_id=1
                )
            ),
        ),
        Component.VAE_DECODER: (4, lambda: AutoencoderKL(**cfg.vae)),
    }

    def make(index: int, fn):
        torch.manual_seed(seed * 1000 + index)
        with torch.device(device), _narrowed_as_built(dtype):
            return fn().to(dtype).eval()

    models = {
        SUBFOLDER[c]: None if only is not None and SUBFOLDER[c] not in only else make(index, fn)
        for c, (index, fn) in makers.items()
    }
    controlnet = controlnet_config(arch)
    if only is not None and SUBFOLDER[Component.CONTROLNET_CANNY] in only and controlnet is not None:
        with torch.device(device):
            models["controlnet"] = make_controlnet(
                controlnet, seed, dtype, 0.2 if arch is Architecture.TINY else 0.02
            )
    return {
        **models,
        "tokenizer": tok_l,
        "tokenizer_2": clip_tokenizer(),
        "tokenizer_3": tok_3,
        "scheduler": FlowMatchEulerDiscreteScheduler(**cfg.scheduler),
    }


#: Blocks of the tiny ControlNet.
TINY_CONTROLNET_LAYERS = 2
#: Seed offset of the ControlNet's weights (after build_components' five models: 0..4).
CONTROLNET_SEED_INDEX = 5


def controlnet_config(arch: Architecture, own_pos_embed: bool = True) -> dict[str, Any] | None:
    """``SD3ControlNetModel`` arguments of ``arch``'s ControlNet; ``None`` for sd3.5-medium.

    - sd3.5-large: Stability AI's SD3.5-large ControlNets (canny, depth, blur), as diffusers'
      ``scripts/convert_sd3_controlnet_to_diffusers.py`` builds them: 19 single-stream blocks
      (``joint_attention_dim: null``, so no text input and no context embedder) of the
      transformer's width (38 heads x 64), no positional embedding of their own
      (``use_pos_embed: false``: the pipeline lends them the transformer's), the real pooled
      projection (``force_zeros_for_pooled_projection: false``). Stability AI publishes none for
      sd3.5-medium.
    - tiny: the tiny transformer's widths and two blocks; ``own_pos_embed`` picks the SD3 layout
      (its own positional embedding and context embedder, zero pooled projection: InstantX's SD3
      ControlNets) or, ``False``, sd3.5-large's layout at tiny size.
    """
    if arch is Architecture.SD35_MEDIUM:
        return None
    tr = architecture_config(arch).transformer
    widths = {k: tr[k] for k in ("patch_size", "in_channels", "out_channels", "attention_head_dim")}
    large = {
        **widths,
        "num_attention_heads": tr["num_attention_heads"],
        "joint_attention_dim": None,
        "caption_projection_dim": 2048,
        "pooled_projection_dim": tr["pooled_projection_dim"],
        "pos_embed_max_size": None,
        "pos_embed_type": None,
        "use_pos_embed": False,
        "force_zeros_for_pooled_projection": False,
    }
    if arch is Architecture.SD35_LARGE:
        return {**large, "num_layers": 19}
    if not own_pos_embed:
        return {
            **large,
            "caption_projection_dim": tr["caption_projection_dim"],
            "num_layers": TINY_CONTROLNET_LAYERS,
        }
    keys = (
        "sample_size", "num_attention_heads", "joint_attention_dim", "caption_projection_dim",
        "pooled_projection_dim", "pos_embed_max_size", "qk_norm",
    )  # fmt: skip
    return {**widths, **{k: tr[k] for k in keys}, "num_layers": TINY_CONTROLNET_LAYERS}


def make_controlnet(config: dict[str, Any], seed: int = 0, dtype=None, std: float = 0.2):
    """A seeded diffusers ``SD3ControlNetModel`` of ``config`` (see :func:`controlnet_config`).

    diffusers zero-initialises the ControlNet's input and output projections (a fresh ControlNet
    changes nothing); a test model that changed nothing could not show a wrong wiring, so they
    are drawn from a normal distribution of standard deviation ``std`` instead. In eval mode,
    float32 unless ``dtype`` says otherwise.
    """
    import torch
    from diffusers import SD3ControlNetModel

    torch.manual_seed(seed * 1000 + CONTROLNET_SEED_INDEX)
    with _narrowed_as_built(dtype or torch.float32):
        net = SD3ControlNetModel(**config)
    with torch.no_grad():
        for p in (*net.pos_embed_input.parameters(), *net.controlnet_blocks.parameters()):
            p.normal_(0.0, std)
    return (net if dtype is None else net.to(dtype)).eval()


def tiny_controlnet(seed: int = 0, dtype=None, own_pos_embed: bool = True):
    """A seeded tiny diffusers ``SD3ControlNetModel`` that fits the tiny transformer.

    Two blocks (so the tiny transformer's three blocks take residuals 0, 0, 1: diffusers'
    ``index_block / (num_layers / n)`` rule), in the SD3 layout or, ``own_pos_embed=False``, in
    SD3.5-large's (:func:`controlnet_config`).
    """
    return make_controlnet(controlnet_config(Architecture.TINY, own_pos_embed), seed, dtype)


def write_tiny(out: str | Path, seed: int = 0) -> Path:
    """Write the tiny pipeline as a diffusers directory (safetensors) at ``out``.

    Written beside ``out`` and renamed into place (an existing ``out`` is replaced). The tiny
    ControlNet goes to ``controlnet/``, ``StableDiffusion3ControlNetPipeline``'s layout.
    """
    import torch
    from diffusers import StableDiffusion3Pipeline

    from sd35trt.artifacts.manifest import staged_directory

    out = Path(out)
    torch.use_deterministic_algorithms(True, warn_only=True)
    pipe = StableDiffusion3Pipeline(**build_components(Architecture.TINY, seed))
    with staged_directory(out.parent, out.name) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        tiny_controlnet(seed).save_pretrained(tmp / "controlnet", safe_serialization=True)
    return out


def write_architecture(out: str | Path, arch: Architecture) -> Path:
    """Write ``arch``'s configs, tokenizers and scheduler (no weights) as a diffusers layout.

    Used by ``model.source: random``: the stages read shapes from it, the weights are drawn
    from the seed when the pipeline is loaded.
    """
    import json

    from sd35trt.artifacts.manifest import staged_directory

    out = Path(out)
    parts = build_components(arch, device="meta")
    with staged_directory(out.parent, out.name) as tmp:
        index = {"_class_name": "StableDiffusion3Pipeline"}
        for name, obj in parts.items():
            sub = tmp / name
            if hasattr(obj, "save_config"):  # diffusers models and the scheduler
                obj.save_config(sub)
            elif hasattr(obj, "config") and hasattr(obj.config, "save_pretrained"):  # transformers models
                obj.config.save_pretrained(sub)
            else:  # tokenizers
                obj.save_pretrained(sub)
            lib = "diffusers" if hasattr(obj, "save_config") else "transformers"
            index[name] = [lib, type(obj).__name__]
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        controlnet = controlnet_config(arch)
        if controlnet is not None:  # StableDiffusion3ControlNetPipeline's layout; not in the index
            import diffusers

            (tmp / "controlnet").mkdir()
            config = {"_class_name": "SD3ControlNetModel", "_diffusers_version": diffusers.__version__}
            (tmp / "controlnet" / "config.json").write_text(json.dumps({**config, **controlnet}, indent=2))
    return out
