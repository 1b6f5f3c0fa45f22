"""The sizes of a concrete SD3.5 pipeline, read from its diffusers config files (no weights).

:class:`ModelDims` is the vocabulary of :mod:`sd35trt.components` (which re-exports it): every
component spec, profile and request limit is sized by it. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sd35trt.component_table import SUBFOLDER, Component
from sd35trt.errors import ModelError
from sd35trt.user_files import read_json


@dataclass(frozen=True)
class ModelDims:
    """The sizes of a concrete pipeline, read from its diffusers config files."""

    clip_l_hidden: int
    clip_l_projection: int
    clip_g_hidden: int
    clip_g_projection: int
    t5_hidden: int
    latent_channels: int
    patch_size: int
    num_layers: int
    head_dim: int
    num_heads: int
    joint_attention_dim: int
    pooled_projection_dim: int
    pos_embed_max_size: int
    vae_scale_factor: int
    vae_scaling_factor: float
    vae_shift_factor: float

    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor * self.patch_size

    @property
    def inner_dim(self) -> int:
        """Width of the transformer's token streams (``num_heads x head_dim``)."""
        return self.num_heads * self.head_dim

    @property
    def max_image_size(self) -> int:
        """Largest height/width the positional embedding covers."""
        return self.pos_embed_max_size * self.patch_size * self.vae_scale_factor

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> ModelDims:
        """Read the dims from a diffusers SD3 directory's JSON configs (no weights loaded).

        Raises:
            ModelError: a config file is missing, not a JSON object, or lacks a key.
        """
        root = Path(model_dir)

        def read(sub: str) -> dict:
            missing = f"is missing: {root} is not a diffusers SD3 pipeline directory"
            return read_json(root / sub / "config.json", error=ModelError, missing=missing)

        order = (
            Component.TRANSFORMER,
            Component.CLIP_L,
            Component.CLIP_G,
            Component.T5,
            Component.VAE_DECODER,
        )
        return cls.from_configs(*(read(SUBFOLDER[c]) for c in order), source=str(root))

    @classmethod
    def from_configs(
        cls, transformer: dict, clip_l: dict, clip_g: dict, t5: dict, vae: dict, source: str = "model"
    ) -> ModelDims:
        """The dims from the components' config dicts (diffusers / transformers config keys).

        Raises:
            ModelError: a config lacks a key.
        """
        tr = transformer
        try:
            return cls(
                clip_l_hidden=clip_l["hidden_size"],
                clip_l_projection=clip_l["projection_dim"],
                clip_g_hidden=clip_g["hidden_size"],
                clip_g_projection=clip_g["projection_dim"],
                t5_hidden=t5["d_model"],
                latent_channels=tr["in_channels"],
                patch_size=tr["patch_size"],
                num_layers=tr["num_layers"],
                head_dim=tr["attention_head_dim"],
                num_heads=tr["num_attention_heads"],
                joint_attention_dim=tr["joint_attention_dim"],
                pooled_projection_dim=tr["pooled_projection_dim"],
                pos_embed_max_size=tr["pos_embed_max_size"],
                vae_scale_factor=2 ** (len(vae["block_out_channels"]) - 1),
                vae_scaling_factor=float(vae["scaling_factor"]),
                vae_shift_factor=float(vae.get("shift_factor") or 0.0),
            )
        except KeyError as err:
            raise ModelError(f"{source}: a component config lacks key {err}") from None

    def to_json(self) -> dict:
        return dict(self.__dict__)
