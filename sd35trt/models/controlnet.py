"""The ControlNet ``model.controlnet`` names: where its weights are, its layout, and the positional
embedding SD3.5-large's ControlNets borrow from the transformer.

Where: with ``path`` unset the model directory's ``controlnet/`` (``StableDiffusion3ControlNetPipeline``'s
layout), else a local ``SD3ControlNetModel`` directory or a Hugging Face repo id, resolved as
``model.path`` with ``source: hub`` is (the cache first, a download only where allowed).

Layouts (diffusers 0.42.1's ``SD3ControlNetModel`` and ``StableDiffusion3ControlNetPipeline``):

- SD3 (InstantX): its own positional embedding and context embedder; the pipeline feeds it the
  prompt embeddings, zero pooled projections (``force_zeros_for_pooled_projection``) and control
  latents without the VAE's shift.
- SD3.5-large (Stability AI): ``use_pos_embed: false``, so the pipeline gives it a copy of the
  transformer's ``pos_embed`` (``_get_pos_embed_from_transformer``), which turns the latents into
  tokens inside the ControlNet; ``joint_attention_dim: null``, so single-stream blocks and no text
  input (the pipeline passes ``encoder_hidden_states=None``); the real pooled projection; control
  latents shifted and scaled as the VAE encoder engine makes them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sd35trt.components import SUBFOLDER, Component
from sd35trt.config import Architecture, ControlNetSettings, ControlType, ModelSettings, ModelSource
from sd35trt.errors import ConfigError, ModelError, first_line

if TYPE_CHECKING:
    import torch
    from torch import nn

    from sd35trt.models.hub import Snapshot

#: What is requested of a ControlNet repo: diffusers' weights (one file or shards) and config. The
#: SD3.5 repos hold nothing else diffusers reads.
CONTROLNET_PATTERNS = ["config.json", "diffusion_pytorch_model*.safetensors", "*.safetensors.index.json"]


def config_key(index: int, count: int) -> str:
    """The config key of the ``index``-th of ``count`` ControlNets, for messages:
    ``model.controlnet`` for a single one (a mapping), ``model.controlnet[1]`` in a list."""
    return "model.controlnet" if count == 1 else f"model.controlnet[{index}]"


@dataclass(frozen=True)
class ResolvedControlNet:
    """The ControlNet a run exports: its diffusers ``directory`` (a Hub snapshot folder for a repo
    id, ``hub`` then set), its ``config.json``, its config ``key`` for messages, and whether
    ``path`` named it (``given_path``; else the model's ``controlnet/``)."""

    control_type: ControlType
    directory: Path
    config: dict
    hub: Snapshot | None = None
    key: str = "model.controlnet"
    given_path: bool = False

    @property
    def component(self) -> Component:
        """Its component (and engine): ``controlnet_<type>``."""
        return Component.controlnet(self.control_type)

    @property
    def layers(self) -> int:
        """Its blocks: the residuals it gives the transformer."""
        return int(self.config["num_layers"])

    @property
    def takes_text(self) -> bool:
        """Whether it reads the prompt embeddings (a context embedder; diffusers' default 4096)."""
        return self.config.get("joint_attention_dim", 4096) is not None

    @property
    def own_pos_embed(self) -> bool:
        """Whether it has its own positional embedding (``use_pos_embed``, default true)."""
        return self.config.get("use_pos_embed", True) is not False

    @property
    def zero_pooled(self) -> bool:
        """Whether it takes zero pooled projections (``force_zeros_for_pooled_projection``, default true)."""
        return self.config.get("force_zeros_for_pooled_projection", True) is not False

    def provenance(self) -> dict:
        """Its record entry (:class:`sd35trt.artifacts.records.ControlNetInput`)."""
        out: dict = {"type": self.control_type.value}
        if self.given_path:
            out["directory"] = str(self.directory)
            out["hub"] = None if self.hub is None else self.hub.to_json()
        return out


#: What ControlNets exported together must share, as diffusers' ``SD3MultiControlNetModel``
#: reads it from its first net only (pooled zeroing, text input) or adds their residuals block by
#: block (block count): ``(name in messages, ResolvedControlNet property)``.
ALIKE = (
    ("block count (num_layers)", "layers"),
    ("text input (joint_attention_dim set)", "takes_text"),
    ("own positional embedding (use_pos_embed)", "own_pos_embed"),
    ("zero pooled projection (force_zeros_for_pooled_projection)", "zero_pooled"),
)


def resolve_controlnets(
    model: ModelSettings, model_dir: str | Path, named_only: bool = False
) -> tuple[ResolvedControlNet, ...]:
    """Locate every ``model.controlnet`` and read its config (empty without one); see the module docstring.

    ``named_only``: only those named by ``path``, not compared (what a build checks without the model).

    Raises:
        ModelError: one line naming ``model.controlnet[i].path``: neither a directory nor a repo
            id; a file, not a directory; a repo id not cached and not allowed to download (with
            the command that downloads it); a revision for a local directory; a directory without
            a readable ``config.json`` that has ``num_layers``.
        ConfigError: ControlNets that differ in what :data:`ALIKE` lists (naming the second one's
            ``path``, its value and the first one's).
    """
    settings = model.controlnets
    nets = tuple(
        _resolve(s, config_key(i, len(settings)), model, model_dir)
        for i, s in enumerate(settings)
        if s.path is not None or not named_only
    )
    for net in () if named_only else nets[1:]:
        for what, prop in ALIKE:
            if getattr(net, prop) != getattr(nets[0], prop):
                where = net.directory if net.given_path else "the model's controlnet/"
                raise ConfigError(
                    f"{net.key}.path {where}: {what} is {getattr(net, prop)}, model.controlnet[0]'s "
                    f"is {getattr(nets[0], prop)}; ControlNets exported together must share it"
                )
    return nets


def check_paths(model: ModelSettings) -> None:
    """Refuse a ``model.controlnet[i].path`` that names no ControlNet, from the config alone, so
    that a stage can do it before it writes anything (run directory, lock file, built-in model).

    A repo id is looked up in the Hugging Face cache only: when it is missing and downloads are
    allowed, the download is left to the stage (which holds the run directory's lock then).

    Raises:
        ModelError: as :func:`resolve_controlnets`, for those given a ``path`` only.
    """
    settings = model.controlnets
    for i, s in enumerate(settings):
        if s.path is None:
            continue
        key = config_key(i, len(settings))
        folder, _ = _locate(s, key, model.allow_download, download=False)
        if folder is not None:
            _read_config(folder, False, key)


def _resolve(
    settings: ControlNetSettings, key: str, model: ModelSettings, model_dir: str | Path
) -> ResolvedControlNet:
    snap = None
    if settings.path is None:
        folder = Path(model_dir) / SUBFOLDER[Component.controlnet(settings.type)]
    else:
        folder, snap = _locate(settings, key, model.allow_download, download=True)
    config = _read_config(folder, settings.path is None, key)
    return ResolvedControlNet(settings.type, folder, config, snap, key, settings.path is not None)


#: What a ControlNet directory holds, for messages.
LAYOUT = "a diffusers SD3ControlNetModel directory (config.json and diffusion_pytorch_model*.safetensors)"


def _locate(
    settings: ControlNetSettings, key: str, allow_download: bool, *, download: bool
) -> tuple[Path | None, Snapshot | None]:
    """The directory ``settings.path`` names (and its Hub snapshot). Without ``download``, a repo id
    is looked up only where downloads are not allowed; else ``(None, None)``: the stage resolves it."""
    import re

    from sd35trt.config import REPO_ID_PATTERN
    from sd35trt.models import hub

    path, what = settings.path, f"{key}.path"
    folder = Path(path).expanduser()
    if folder.is_dir():
        if settings.revision is not None:
            raise ModelError(
                f"{what} {path} is a local directory; {key}.revision applies to Hugging Face repo ids only"
            )
        return folder, None
    if folder.exists():
        inside = f" (the directory that holds it: {folder.parent})" if folder.parent != Path() else ""
        raise ModelError(f"{what} {path} is a file; give {LAYOUT}{inside}, or a Hugging Face repo id")
    if path.startswith((".", "/", "~")) or not re.fullmatch(REPO_ID_PATTERN, path):
        raise ModelError(
            f"{what} {path}: no such directory (nor a Hugging Face repo id 'namespace/name'); "
            f"give {LAYOUT} or a repo id"
        )
    if not download and hub.download_allowed(allow_download):
        return None, None
    snap = hub.resolve(
        path,
        revision=settings.revision,
        patterns=CONTROLNET_PATTERNS,
        allow_download=allow_download,
        what=what,
    )
    return snap.path, snap


def _read_config(folder: Path, in_model: bool, key: str) -> dict:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
        int(config["num_layers"])
    except FileNotFoundError:
        if in_model:
            raise ModelError(
                f"{key} is set but {path} is missing: put the diffusers SD3ControlNetModel in {folder} "
                f"(StableDiffusion3ControlNetPipeline's layout) or name one with {key}.path"
            ) from None
        raise ModelError(f"{key}.path {folder} has no config.json: it is not {LAYOUT}") from None
    except (KeyError, TypeError, ValueError) as err:
        where = key if in_model else f"{key}.path"
        raise ModelError(f"{where}: {path} is not a diffusers SD3ControlNetModel config ({err!r})") from None
    return config


def lend_pos_embed(controlnet: nn.Module, model_dir: str | Path, model: ModelSettings) -> nn.Module:
    """Give a ``use_pos_embed: false`` ControlNet the transformer's positional embedding, as
    diffusers' ``StableDiffusion3ControlNetPipeline`` does when it is built; others unchanged.

    Only the transformer's ``pos_embed.*`` tensors are read (from its safetensors, or drawn for a
    ``random`` source by :func:`random_pos_embed`), not its 8 B weights.
    LoRAs are not applied to them (SD3.5 LoRAs adapt the attention and feed-forward layers).
    Returns ``controlnet`` with ``pos_embed`` set, in its dtype and on its device.

    Raises:
        ModelError: the transformer's weights hold no ``pos_embed`` tensors of its config's shape.
    """
    if controlnet.pos_embed is not None:
        return controlnet
    param = next(controlnet.parameters())
    if model.source is ModelSource.RANDOM:
        embed = random_pos_embed(model.architecture, model.seed)
    else:
        embed = _pos_embed_from_weights(Path(model_dir) / SUBFOLDER[Component.TRANSFORMER])
    controlnet.pos_embed = embed.to(device=param.device, dtype=param.dtype).eval().requires_grad_(False)
    return controlnet


def _patch_embed(tr: dict) -> torch.nn.Module:
    """An ``SD3Transformer2DModel``'s ``pos_embed`` from its config ``tr``, as diffusers'
    ``SD3ControlNetModel._get_pos_embed_from_transformer`` makes it (float32)."""
    from diffusers.models.embeddings import PatchEmbed

    return PatchEmbed(
        height=tr["sample_size"],
        width=tr["sample_size"],
        patch_size=tr["patch_size"],
        in_channels=tr["in_channels"],
        embed_dim=tr["num_attention_heads"] * tr["attention_head_dim"],
        pos_embed_max_size=tr["pos_embed_max_size"],
    )


def random_pos_embed(arch: Architecture, seed: int) -> torch.nn.Module:
    """The ``pos_embed`` of :func:`sd35trt.models.tiny.build_components`' random transformer,
    without drawing the rest of it: ``pos_embed`` is the first module ``SD3Transformer2DModel``
    creates, so the transformer's seed draws the same weights (sd3.5-large's transformer is 8 B
    parameters). Float32."""
    import torch

    from sd35trt.models.tiny import architecture_config

    torch.manual_seed(seed * 1000 + 0)  # the transformer's seed in build_components
    return _patch_embed(architecture_config(arch).transformer).eval()


def _pos_embed_from_weights(folder: Path) -> torch.nn.Module:
    from safetensors import safe_open

    embed = _patch_embed(json.loads((folder / "config.json").read_text()))
    prefix, state = "pos_embed.", {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 -- safe_open has keys(), not iteration
                if key.startswith(prefix):
                    state[key.removeprefix(prefix)] = f.get_tensor(key).float()
    try:
        embed.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ModelError(f"{folder}: the transformer's pos_embed does not load ({first_line(err)})") from None
    return embed
