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

    ``timestep [B]`` is float32 whatever the module's dtype: diffusers computes the sinusoidal
    timestep embedding in float32 and casts it to the model dtype itself, so a traced graph takes
    float32 timesteps and casts inside (see :func:`sd35trt.components.spec`).

    With ``slg_layers`` the graph takes a ``skip_layers [n]`` input (1.0 = skip that block) so one
    engine serves both the normal and the skip-layer-guidance pass. A skipped block passes its
    inputs through unchanged: ``g * inputs + (1 - g) * block(inputs)`` is exact for g in {0, 1}.

    ``fp32_blocks`` run in float32 inside a 16-bit model: their weights become float32, their
    float inputs are cast to float32 on entry and their outputs back to the incoming dtype, so a
    traced graph has Cast nodes at the block's boundary and float32 ops inside (NVIDIA's FP8
    recipe keeps block 35 of SD3.5 Large so). Module names are unchanged, so ModelOpt's quantizer
    names (the calibration file's keys) still match.

    With ``controlnet`` the last input is ``controlnet_block_samples [B, n, tokens, inner]``,
    diffusers' ``block_controlnet_hidden_states`` stacked on axis 1 (zeros: no ControlNet).
    """

    def __init__(
        self,
        transformer: nn.Module,
        slg_layers: Sequence[int] = (),
        fp32_blocks: Sequence[int] = (),
        controlnet: bool = False,
    ) -> None:
        super().__init__()
        self.transformer = transformer
        self.controlnet = controlnet
        self.slg_layers = tuple(slg_layers)
        self.fp32_blocks = tuple(fp32_blocks)
        blocks = transformer.transformer_blocks
        n = len(blocks)
        for i in self.slg_layers:
            if not 0 <= i < n - 1:
                # The last block is context_pre_only (returns no text stream); SD3.5 never skips it.
                raise ValueError(f"skip-layer-guidance layer {i} is outside 0..{n - 2}")
        for i in self.fp32_blocks:
            if not 0 <= i < n:
                raise ValueError(f"fp32 block {i} is outside 0..{n - 1}")
        self._gates: dict[int, torch.Tensor] = {}
        for i in self.slg_layers:
            blocks[i].register_forward_hook(self._gate_hook(i), with_kwargs=True)
        # Registered after the gate hooks, so a gated fp32 block is cast back after gating.
        for i in self.fp32_blocks:
            _run_in_float32(blocks[i])

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
        timestep: torch.Tensor,  # [B] float32
        *extra: torch.Tensor,  # skip_layers [n] in {0, 1} (with slg_layers), controlnet residuals
    ) -> torch.Tensor:
        extra_inputs = list(extra)
        skip_layers = extra_inputs.pop(0) if self.slg_layers and extra_inputs else None
        residuals = extra_inputs.pop(0) if self.controlnet else None  # [B, n, tokens, inner]
        if extra_inputs:
            raise TypeError(
                f"Transformer takes {len(extra) - len(extra_inputs)} extra inputs, got {len(extra)}"
            )
        if skip_layers is not None:
            self._gates = {layer: skip_layers[k] for k, layer in enumerate(self.slg_layers)}
        try:
            return self.transformer(
                hidden_states=hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                pooled_projections=pooled_projections,
                timestep=timestep,
                block_controlnet_hidden_states=None if residuals is None else list(residuals.unbind(1)),
                return_dict=False,
            )[0]
        finally:
            self._gates = {}


def _output_layers(
    transformer: nn.Module, hidden: torch.Tensor, temb: torch.Tensor, height, width
) -> torch.Tensor:
    """diffusers' SD3 ``norm_out``, ``proj_out`` and unpatchify: tokens ``[B, T, D]`` -> ``[B, C, h, w]``.

    The unpatchify is a permutation (diffusers' einsum ``nhwpqc->nchpwq``), so the values are exact.
    """
    hidden = transformer.proj_out(transformer.norm_out(hidden, temb))  # [B, T, p * p * C]
    p, c = transformer.config.patch_size, transformer.out_channels
    hidden = hidden.reshape(hidden.shape[0], height // p, width // p, p, p, c)
    return hidden.permute(0, 5, 1, 3, 2, 4).reshape(hidden.shape[0], c, height, width)


class TransformerFirstBlock(nn.Module):
    """The first-block-cache head engine: the embeddings and block 0, plus the cached step's output.

    ``(latents, text, pooled, timestep, hidden_states_residual) -> (first_block_residual,
    block_hidden_states, block_encoder_hidden_states, temb, noise_pred)``: block 0's output and its
    residual (output minus input, the quantity diffusers' ``FirstBlockCache`` compares between
    calls), what :class:`TransformerRest` continues from, and the output layers applied to block
    0's output plus ``hidden_states_residual`` (the rest's residual of the last computed step):
    diffusers' result for a step whose remaining blocks are skipped.

    ``whole`` is the :class:`Transformer` wrapper (its fp32 blocks apply); block 0 is never gated.
    """

    def __init__(self, whole: Transformer) -> None:
        super().__init__()
        self.whole = whole

    def forward(
        self,
        hidden_states: torch.Tensor,  # [B, C, h, w]
        encoder_hidden_states: torch.Tensor,  # [B, 77 + L, J]
        pooled_projections: torch.Tensor,  # [B, P]
        timestep: torch.Tensor,  # [B] float32
        hidden_states_residual: torch.Tensor,  # [B, T, D]
    ) -> tuple[torch.Tensor, ...]:
        t = self.whole.transformer
        height, width = hidden_states.shape[-2:]
        tokens = t.pos_embed(hidden_states).contiguous()  # [B, T, D]
        temb = t.time_text_embed(timestep, pooled_projections)  # [B, D]
        text = t.context_embedder(encoder_hidden_states)  # [B, 77 + L, D]
        text, hidden = t.transformer_blocks[0](hidden_states=tokens, encoder_hidden_states=text, temb=temb)
        cached = _output_layers(t, hidden_states_residual + hidden, temb, height, width)
        return hidden - tokens, hidden, text, temb, cached


class TransformerRest(nn.Module):
    """The first-block-cache tail engine: blocks 1.. and the output layers.

    ``(latents, block_hidden_states, block_encoder_hidden_states, temb[, skip_layers]) ->
    (noise_pred, hidden_states_residual)``; only the latents' shape is read (the patch grid).
    ``hidden_states_residual`` is the last block's hidden states minus block 0's, what diffusers'
    ``FirstBlockCache`` keeps for the steps it skips. Skip-layer gates as :class:`Transformer`.
    """

    def __init__(self, whole: Transformer) -> None:
        super().__init__()
        self.whole = whole

    def forward(
        self,
        hidden_states: torch.Tensor,  # [B, C, h, w], shape only
        block_hidden_states: torch.Tensor,  # [B, T, D]
        block_encoder_hidden_states: torch.Tensor,  # [B, 77 + L, D]
        temb: torch.Tensor,  # [B, D]
        skip_layers: torch.Tensor | None = None,  # [n] in {0, 1}
    ) -> tuple[torch.Tensor, torch.Tensor]:
        whole, t = self.whole, self.whole.transformer
        if skip_layers is not None:
            whole._gates = {layer: skip_layers[k] for k, layer in enumerate(whole.slg_layers)}
        try:
            hidden, text = block_hidden_states, block_encoder_hidden_states
            for block in t.transformer_blocks[1:]:
                text, hidden = block(hidden_states=hidden, encoder_hidden_states=text, temb=temb)
        finally:
            whole._gates = {}
        height, width = hidden_states.shape[-2:]
        return _output_layers(t, hidden, temb, height, width), hidden - block_hidden_states


class ControlNet(nn.Module):
    """diffusers' ``SD3ControlNetModel``: ``(latents, control latent[, text], pooled, timestep)`` ->
    ``controlnet_block_samples [B, n, tokens, inner]``, unscaled (conditioning scale 1).

    Both layouts (:mod:`sd35trt.models.controlnet`): the SD3 one takes the prompt embeddings and
    zero pooled projections; SD3.5-large's takes no text (``joint_attention_dim: null``, so the
    graph has no ``encoder_hidden_states``) and turns the latents into tokens with the
    transformer's positional embedding, which must have been lent to it first
    (:func:`sd35trt.models.controlnet.lend_pos_embed`, as diffusers' pipeline does).
    """

    def __init__(self, controlnet: nn.Module, vae_shift_offset: float = 0.0) -> None:
        super().__init__()
        if controlnet.pos_embed is None:
            raise ValueError("a use_pos_embed: false ControlNet needs the transformer's pos_embed lent first")
        self.controlnet = controlnet
        self.takes_text = controlnet.context_embedder is not None
        self.zero_pooled = bool(controlnet.config.force_zeros_for_pooled_projection)
        # diffusers' pipeline encodes the control image without the VAE's shift for these
        # (InstantX-style) ControlNets: (sample - 0) * scale, where the VAE encoder engine gives
        # (sample - shift) * scale; adding shift * scale back here lets the engines share one encoder.
        self.cond_offset = float(vae_shift_offset) if self.zero_pooled else 0.0

    def forward(
        self,
        hidden_states: torch.Tensor,  # [B, C, h, w]
        controlnet_cond: torch.Tensor,  # [B, C, h, w]
        *inputs: torch.Tensor,  # [text [B, 77 + L, D] (takes_text),] pooled [B, P], timestep [B] float32
    ) -> torch.Tensor:
        encoder_hidden_states, pooled_projections, timestep = inputs if self.takes_text else (None, *inputs)
        if self.zero_pooled:  # diffusers' pipeline feeds zeros then; kept as a graph input
            # made in float32 and cast: before opset 20 ONNX's ConstantOfShape has no bfloat16
            # output (a BF16 export failed the checker), and zeros cast exactly
            zeros = torch.zeros_like(pooled_projections, dtype=torch.float32)
            pooled_projections = zeros.to(pooled_projections.dtype)
        if self.cond_offset:
            controlnet_cond = controlnet_cond + self.cond_offset
        samples = self.controlnet(
            hidden_states=hidden_states,
            controlnet_cond=controlnet_cond,
            conditioning_scale=1.0,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            timestep=timestep,
            return_dict=False,
        )[0]
        return torch.stack(samples, dim=1)


def _run_in_float32(block: nn.Module) -> None:
    """Make ``block`` compute in float32 and hand its caller tensors of the caller's dtype."""
    block.float()
    incoming: list[torch.dtype] = []

    def widen(x):
        return x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    def enter(module, args, kwargs):
        first = next(
            (v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.is_floating_point()),
            None,
        )
        incoming.append(first.dtype if first is not None else torch.float32)
        return tuple(widen(a) for a in args), {k: widen(v) for k, v in kwargs.items()}

    def leave(module, args, output):
        dtype = incoming.pop()
        if isinstance(output, tuple):
            return tuple(o.to(dtype) if isinstance(o, torch.Tensor) else o for o in output)
        return output.to(dtype)

    block.register_forward_pre_hook(enter, with_kwargs=True)
    block.register_forward_hook(leave)


class _Vae(nn.Module):
    """A VAE and the latent ``scaling_factor`` / ``shift_factor`` of its config."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(vae.config.shift_factor or 0.0)


class VaeDecoder(_Vae):
    """Raw latents ``[B, 16, h, w]`` -> image ``[B, 3, 8h, 8w]`` in [0, 1] (scaling/shift inside)."""

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        latent = latent / self.scaling_factor + self.shift_factor
        image = self.vae.decode(latent, return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1)


class VaeEncoder(_Vae):
    """Image ``[B, 3, H, W]`` in [0, 1] and noise ``[B, 16, H/8, W/8]`` -> transformer-space latents.

    diffusers' image-to-image ``prepare_latents`` step for step: the image mapped to [-1, 1]
    (``VaeImageProcessor.normalize``), ``vae.encode``, a sample of the posterior
    ``mean + std * noise`` (``DiagonalGaussianDistribution.sample`` with the noise drawn from the
    request's generator), then ``(latent - shift_factor) * scaling_factor``.
    """

    def forward(self, image: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        posterior = self.vae.encode(2.0 * image - 1.0, return_dict=False)[0]
        latent = posterior.mean + posterior.std * noise  # [B, 16, h, w]
        return (latent - self.shift_factor) * self.scaling_factor


def wrap(
    component: Component,
    model: nn.Module,
    slg_layers: Sequence[int] = (),
    fp32_blocks: Sequence[int] = (),
    controlnet: bool = False,
    vae_shift_offset: float = 0.0,
) -> nn.Module:
    """The spec-shaped module of ``component`` around ``model`` (:func:`sd35trt.models.loading.load_model`).

    The wrapper class is the component table's (:data:`sd35trt.components.MODELS`); the other
    arguments are its constructor's. Wrap a model once: each wrap of the transformer adds hooks to
    its blocks.
    """
    wrapper = globals()[MODELS[component].wrapper]
    if component is Component.TRANSFORMER:
        return wrapper(model, slg_layers, fp32_blocks, controlnet).eval()
    if component.is_transformer:  # a first-block-cache part, over the whole transformer's wrapper
        return wrapper(Transformer(model, slg_layers, fp32_blocks)).eval()
    if component.is_controlnet:
        return wrapper(model, vae_shift_offset).eval()
    return wrapper(model).eval()
