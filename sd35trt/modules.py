"""PyTorch modules with exactly the I/O contract of each component's spec.

Export traces these wrappers, the PyTorch reference backend runs them, and validation compares
the two, so the glue between a diffusers component and its graph is written once. Which wrapper
serves which component is the component table's (:data:`sd35trt.components.MODELS`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from sd35trt.components import MODELS, Component


class ClipTextEncoder(nn.Module):
    """``input_ids [B, 77]`` -> penultimate ``hidden_states [B, 77, H]``, ``text_embeds [B, P]``."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.encoder(input_ids, output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds


class T5TextEncoder(nn.Module):
    """``input_ids [B, L]`` -> ``last_hidden_state [B, L, D]`` (no attention mask, as SD3 does)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids)[0]


class Transformer(nn.Module):
    """The MMDiT denoiser: ``(latents, text, pooled, timestep[, skip_layers]) -> noise_pred``.

    With ``slg_layers`` the graph takes a ``skip_layers [n]`` input (1.0 = skip that block) so one
    engine serves both the normal and the skip-layer-guidance pass. A skipped block passes its
    inputs through unchanged: ``g * inputs + (1 - g) * block(inputs)`` is exact for g in {0, 1}.
    """

    def __init__(self, transformer: nn.Module, slg_layers: Sequence[int] = ()) -> None:
        super().__init__()
        self.transformer = transformer
        self.slg_layers = tuple(slg_layers)
        n = len(transformer.transformer_blocks)
        for i in self.slg_layers:
            if not 0 <= i < n - 1:
                # The last block is context_pre_only (returns no text stream); SD3.5 never skips it.
                raise ValueError(f"skip-layer-guidance layer {i} is outside 0..{n - 2}")
        self._gates: dict[int, torch.Tensor] = {}
        for i in self.slg_layers:
            transformer.transformer_blocks[i].register_forward_hook(self._gate_hook(i), with_kwargs=True)

    def _gate_hook(self, index: int):
        def hook(module, args, kwargs, output):
            gate = self._gates.get(index)
            if gate is None:
                return output
            enc_out, hid_out = output
            hid_in, enc_in = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
            return gate * enc_in + (1 - gate) * enc_out, gate * hid_in + (1 - gate) * hid_out

        return hook

    def forward(
        self,
        hidden_states: torch.Tensor,  # [B, C, h, w]
        encoder_hidden_states: torch.Tensor,  # [B, 77 + L, D]
        pooled_projections: torch.Tensor,  # [B, P]
        timestep: torch.Tensor,  # [B]
        skip_layers: torch.Tensor | None = None,  # [n] in {0, 1}
    ) -> torch.Tensor:
        if skip_layers is not None:
            self._gates = {layer: skip_layers[k] for k, layer in enumerate(self.slg_layers)}
        try:
            return self.transformer(
                hidden_states=hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                pooled_projections=pooled_projections,
                timestep=timestep,
                return_dict=False,
            )[0]
        finally:
            self._gates = {}


class VaeDecoder(nn.Module):
    """Raw latents ``[B, 16, h, w]`` -> image ``[B, 3, 8h, 8w]`` in [0, 1] (scaling/shift inside)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(vae.config.shift_factor or 0.0)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        latent = latent / self.scaling_factor + self.shift_factor
        image = self.vae.decode(latent, return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1)


def wrap(component: Component, model: nn.Module, slg_layers: Sequence[int] = ()) -> nn.Module:
    """The spec-shaped module of ``component`` around its ``model`` (from :func:`sd35trt.model.load_model`).

    The wrapper class is the component table's (:data:`sd35trt.components.MODELS`); ``slg_layers``
    are the transformer blocks its ``skip_layers`` input gates (transformer only). Wrap a model
    once: each wrap of the transformer adds gating hooks to its blocks.
    """
    wrapper = globals()[MODELS[component].wrapper]
    if component is Component.TRANSFORMER:
        return wrapper(model, slg_layers).eval()
    return wrapper(model).eval()
