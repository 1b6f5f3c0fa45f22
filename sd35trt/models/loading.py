"""Locating and loading the diffusers pipeline a config names, and each component's model, safely.

Only safetensors weights are loaded: pickle files (``.bin``, ``.pt``, ...) can execute code and
are refused, and every shard's header is checked against its size before anything reads it.

``model.loras`` are fused into the weights by every loader right after loading.
:func:`resolve_model` says which bytes a run is made from (the resolved commit, each LoRA's
sha256), which the calibrate and export digests include.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from sd35trt.artifacts.runlock import MODEL_STAMP, MODEL_SUBDIR
from sd35trt.components import MODELS, Component
from sd35trt.config import Config, LoadDtype, ModelSettings, ModelSource
from sd35trt.errors import ModelError
from sd35trt.models.weights import PICKLE_SUFFIXES, check_safetensors

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusion3Pipeline
    from torch import nn

    from sd35trt.models.controlnet import ResolvedControlNet
    from sd35trt.models.hub import Snapshot
    from sd35trt.models.lora import ResolvedLora


def check_weights(model_dir: str | Path) -> list[Path]:
    """Refuse pickle weights and truncated safetensors shards below ``model_dir``; the shards found.

    Raises:
        ModelError: naming the pickle file or the damaged shard.
    """
    root = Path(model_dir)
    for p in sorted(root.rglob("*")):
        if p.suffix in PICKLE_SUFFIXES and p.is_file():
            raise ModelError(
                f"{p} is a pickle weight file; sd35trt loads safetensors only "
                "(convert it, or remove it if a .safetensors copy exists)"
            )
    shards = sorted(root.rglob("*.safetensors"))
    for shard in shards:
        check_safetensors(shard)
    return shards


def torch_dtype(setting: LoadDtype, device: str) -> torch.dtype:
    import torch

    if setting is LoadDtype.AUTO:
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return {LoadDtype.FP32: torch.float32, LoadDtype.BF16: torch.bfloat16}[setting]


def default_device() -> str:
    """CUDA when present (weights and activations then live in GPU memory), else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def limit_heap_retention() -> None:
    """Have glibc return large freed blocks to the system (no effect elsewhere).

    Tracing on the CPU frees activations that glibc's heap otherwise keeps (+4.2 GiB after a
    10-block SD3.5-large trace at 1024x1024): ``mallopt(M_MMAP_THRESHOLD, 1 MiB)`` serves blocks
    of 1 MiB and more with mmap, given back on free, like ``MALLOC_MMAP_THRESHOLD_=1048576``.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


def trim_heap() -> None:
    """Return the free top of glibc's heap to the system (``malloc_trim(0)``; no effect elsewhere)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _glibc():
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


@dataclass(frozen=True)
class ResolvedModel:
    """The weights a run is made from: the diffusers directory, the Hub snapshot (source ``hub``),
    the hashed LoRAs and the located ControlNets."""

    directory: Path
    hub: Snapshot | None = None
    loras: tuple[ResolvedLora, ...] = ()
    controlnets: tuple[ResolvedControlNet, ...] = ()

    def identity(self) -> dict:
        """What the weights depend on beyond the config: the resolved commits and the LoRA bytes.

        Empty for a model without either, so such runs keep their plain config digests.
        """
        return _identity(self.hub, self.loras, self.controlnets, len(self.controlnets))

    def provenance(self) -> dict:
        """The model, LoRAs and ControlNets (where each was read when named by path), as manifests
        and PNG parameters record them."""
        out = {
            "directory": str(self.directory),
            "hub": self.hub.to_json() if self.hub is not None else None,
            "loras": [lora.to_json() for lora in self.loras],
        }
        if self.controlnets:
            out["controlnets"] = [cn.provenance() for cn in self.controlnets]
        return out


def _identity(
    hub: Snapshot | None,
    loras: Sequence[ResolvedLora],
    controlnets: Sequence[ResolvedControlNet] = (),
    configured: int = 0,
) -> dict:
    """``controlnets``: those named by a repo id count (of ``configured`` ControlNets)."""
    out: dict = {}
    if hub is not None:
        out["commit"] = hub.commit
    if loras:
        out["loras"] = [lora.identity() for lora in loras]
    commits = {cn.control_type.value: cn.hub.commit for cn in controlnets if cn.hub is not None}
    if configured == 1 and commits:  # the key a single ControlNet always had (same digests)
        out["controlnet_commit"] = next(iter(commits.values()))
    elif commits:
        out["controlnet_commits"] = commits
    return out


def weights_identity(config: Config) -> dict:
    """:meth:`ResolvedModel.identity` without materializing a built-in model (what build checks).

    Raises:
        ModelError: as :func:`resolve_model`.
    """
    from sd35trt.models.controlnet import resolve_controlnets
    from sd35trt.models.lora import resolve_loras

    m = config.model
    snapshot = _hub_snapshot(config) if m.source is ModelSource.HUB else None
    # a ControlNet in the model's own folder adds nothing beyond the model's commit
    controlnets = resolve_controlnets(m, ".", named_only=True)
    return _identity(snapshot, resolve_loras(m.loras, m.allow_download), controlnets, len(m.controlnets))


def resolve_model(config: Config, run_dir: str | Path) -> ResolvedModel:
    """Locate the model (materializing the built-in ones), resolve a repo id and hash the LoRAs.

    Raises:
        ModelError: a local directory is missing or not a diffusers pipeline; a repo id (of the
            model or ``model.controlnet.path``) is not cached and may not be downloaded (one line
            saying how to download it); a LoRA file is missing, pickle or damaged; the ControlNet
            has no config.
    """
    from sd35trt.models.controlnet import resolve_controlnets
    from sd35trt.models.lora import resolve_loras

    m = config.model
    directory, snapshot = _locate(config, run_dir)
    loras = resolve_loras(m.loras, m.allow_download)
    return ResolvedModel(directory, snapshot, loras, resolve_controlnets(m, directory))


def model_dir(config: Config, run_dir: str | Path) -> Path:
    """The diffusers directory for ``config``: ``model.path`` (``local``), the Hub snapshot folder
    (``hub``), or written to ``<run_dir>/model`` on first use (``tiny``; ``random``: no weights).

    Raises:
        ModelError: a local directory is missing or not a diffusers pipeline, or a repo id cannot
            be resolved.
    """
    return _locate(config, run_dir)[0]


def _hub_snapshot(config: Config) -> Snapshot:
    from sd35trt.models import hub

    m = config.model
    snap = hub.resolve(
        m.path.as_posix(),
        revision=m.revision,
        patterns=hub.pipeline_patterns(),
        allow_download=m.allow_download,
        what="model.path",
    )
    if not (snap.path / "model_index.json").is_file():
        raise ModelError(
            f"model.path {snap.repo_id} (commit {snap.commit}) has no model_index.json: "
            "it is not a diffusers pipeline repo"
        )
    return snap


def _locate(config: Config, run_dir: str | Path) -> tuple[Path, Snapshot | None]:
    m = config.model
    if m.source is ModelSource.HUB:
        snap = _hub_snapshot(config)
        return snap.path, snap
    if m.source is ModelSource.LOCAL:
        path = Path(m.path)
        if not (path / "model_index.json").is_file():
            hint = (
                "; for a Hugging Face repo id use source: hub"
                if not path.exists() and not path.is_absolute()
                else ""
            )
            raise ModelError(
                f"model.path {path} is not a diffusers pipeline directory (no model_index.json); "
                f"point it at a local copy of an SD3.5 repository{hint}"
            )
        return path, None
    path = Path(run_dir) / MODEL_SUBDIR
    stamp = path / MODEL_STAMP
    wanted = {"source": m.source.value, "architecture": m.architecture.value, "seed": m.seed}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return path, None
    if m.source is ModelSource.TINY:
        from sd35trt.models.tiny import write_tiny

        write_tiny(path, m.seed)
    else:
        from sd35trt.models.tiny import write_architecture

        write_architecture(path, m.architecture)
    stamp.write_text(json.dumps(wanted))
    return path, None


class LoadPurpose(str, Enum):
    """What a component model is loaded for; it picks the load options of the component table."""

    RUN = "run"  # pipelines and the PyTorch backend: the library's default attention
    TRACE = "trace"  # ONNX export: ``ComponentModel.trace_attention``


def load_model(
    model_dir: str | Path,
    component: Component,
    dtype: torch.dtype,
    *,
    device: str = "cpu",
    purpose: LoadPurpose = LoadPurpose.RUN,
    model: ModelSettings | None = None,
    loras: Sequence[ResolvedLora] = (),
    folder: str | Path | None = None,
) -> nn.Module:
    """One component's diffusers / transformers model, the way every stage loads it.

    The class, subfolder and options come from :data:`sd35trt.components.MODELS`; weights load
    from safetensors straight in ``dtype`` (no float32 copy of a BF16 model), or are drawn from
    ``model.seed`` when ``model.source`` is ``random``. Random weights are drawn on the CPU, so a
    seed gives the same weights whichever device a stage runs on. ``loras`` are fused right after
    loading; ``folder``: the component's own directory (a ControlNet named by path), used whatever
    the source. Returns the raw model in eval mode, gradients off.

    Raises:
        ModelError: pickle weights, a truncated shard, a subfolder that does not load, or a LoRA
            that does not fit the model.
    """
    import importlib

    from sd35trt.models.lora import fuse_loras

    facts = MODELS[component]
    if model is not None and model.source is ModelSource.RANDOM and folder is None:
        from sd35trt.models.tiny import build_components

        raw = build_components(model.architecture, model.seed, "cpu", dtype, only={facts.subfolder})
        raw = raw.get(facts.subfolder)
        if raw is None:  # sd3.5-medium has no published ControlNet
            raise ModelError(
                f"{model.architecture.value} has no published controlnet shape ({component.value}) to draw "
                "random weights for; name one with model.controlnet.path"
            )
        if purpose is LoadPurpose.TRACE and facts.trace_attention is not None:
            raw.set_attn_implementation(facts.trace_attention)
    else:
        sub = Path(folder) if folder is not None else Path(model_dir) / facts.subfolder
        check_weights(sub)
        cls = getattr(importlib.import_module(facts.library.value), facts.class_name)
        options = {"dtype": dtype, "use_safetensors": True}
        if purpose is LoadPurpose.TRACE and facts.trace_attention is not None:
            options["attn_implementation"] = facts.trace_attention
        try:
            raw = cls.from_pretrained(sub, **options)
        except (OSError, ValueError) as err:
            raise ModelError(f"cannot load {component.value} from {sub}: {err}") from None
    raw = raw.to(device).eval()
    fuse_loras({facts.subfolder: raw}, loras)
    raw.requires_grad_(False)
    return raw


def load_controlnet(
    net: ResolvedControlNet,
    model: ModelSettings,
    model_dir: str | Path,
    dtype: torch.dtype,
    *,
    device: str = "cpu",
    trace: bool = False,
) -> nn.Module:
    """One of ``model.controlnet``'s ControlNets as every stage loads it: through
    :func:`load_model` (from its ``path`` when set, else the model's ``controlnet/`` or, for a
    ``random`` source, drawn), the transformer's positional embedding lent where it has none
    (:func:`sd35trt.models.controlnet.lend_pos_embed`); ``trace``: loaded for ONNX export.

    Raises:
        ModelError: as :func:`load_model`.
    """
    from sd35trt.models.controlnet import lend_pos_embed

    folder = net.directory if net.given_path else None
    purpose = LoadPurpose.TRACE if trace else LoadPurpose.RUN
    raw = load_model(
        model_dir, net.component, dtype, device=device, purpose=purpose, model=model, folder=folder
    )
    return lend_pos_embed(raw, model_dir, model)


def load_pipeline(
    config: Config,
    run_dir: str | Path,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    loras: Sequence[ResolvedLora] | None = None,
    transformer: bool = True,
) -> StableDiffusion3Pipeline:
    """Load the configured pipeline on ``device`` (default: CUDA if present) in ``dtype``.

    ``model.loras`` are fused into its transformer and CLIP encoders (``loras``: already
    resolved ones, else they are resolved here). With ``transformer=False`` the pipeline has
    none until :func:`attach_transformer`, so the text encoders (~11 GB in BF16) and the
    transformer (4.5 GB medium, 16.3 GB large) need not be in memory together.

    Raises:
        ModelError: as :func:`load_pipeline_dir`.
    """
    from sd35trt.models.lora import resolve_loras

    device = device or default_device()
    dtype = dtype or torch_dtype(config.calibrate.dtype, device)
    if loras is None:
        loras = resolve_loras(config.model.loras, config.model.allow_download)
    return load_pipeline_dir(
        model_dir(config, run_dir), device, dtype, model=config.model, loras=loras, transformer=transformer
    )


def load_pipeline_dir(
    model_dir: str | Path,
    device: str,
    dtype: torch.dtype,
    model: ModelSettings | None = None,
    loras: Sequence[ResolvedLora] = (),
    transformer: bool = True,
) -> StableDiffusion3Pipeline:
    """The diffusers pipeline in ``model_dir`` on ``device``, progress bars off.

    The five models load through :func:`load_model` (``loras`` fused into the transformer and
    the CLIP encoders); diffusers reads only the tokenizers and the scheduler config from the
    directory. ``transformer=False`` leaves the transformer out (see :func:`attach_transformer`).

    Raises:
        ModelError: pickle weights, a truncated shard, a directory that is not SD3, or a LoRA
            that does not fit the model.
    """
    from diffusers import StableDiffusion3Pipeline

    root = Path(model_dir)
    check_weights(root)
    models = {
        MODELS[c].subfolder: load_model(root, c, dtype, device=device, model=model, loras=loras)
        for c in Component
        if c.required and (transformer or c is not Component.TRANSFORMER)
        # the VAE encoder is the same AutoencoderKL as the decoder
    }
    if not transformer:
        models[MODELS[Component.TRANSFORMER].subfolder] = None
    try:
        pipe = StableDiffusion3Pipeline.from_pretrained(root, **models)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load the diffusers pipeline in {root}: {err}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def attach_transformer(
    pipe: StableDiffusion3Pipeline,
    model_dir: str | Path,
    device: str,
    dtype: torch.dtype,
    model: ModelSettings | None = None,
    loras: Sequence[ResolvedLora] = (),
) -> None:
    """Load the transformer into ``pipe`` (loaded with ``transformer=False``), as
    :func:`load_pipeline_dir` would have; call it once the text encoders are dropped.

    Raises:
        ModelError: as :func:`load_model`.
    """
    raw = load_model(Path(model_dir), Component.TRANSFORMER, dtype, device=device, model=model, loras=loras)
    pipe.register_modules(transformer=raw)
    # what the pipeline's __init__ reads from the transformer (its defaults are SD3's 128 and 2)
    pipe.default_sample_size, pipe.patch_size = raw.config.sample_size, raw.config.patch_size
