"""Image-to-image over engines: diffusers' ``StableDiffusion3Img2ImgPipeline`` steps 3 to 5.

1. The request's image, already RGB at the generation size (:mod:`sd35trt.runtime.request`), as
   ``[1, 3, H, W]`` float32 in [0, 1] (``VaeImageProcessor.pil_to_numpy``; the [-1, 1] mapping is
   inside the VAE encoder engine).
2. The schedule of ``steps`` steps, cut to its last ``steps - t_start`` (``get_timesteps``).
3. Per image, one CPU generator seeded with its seed (``seed + i`` for image ``i``: diffusers
   given one copy of the image and one generator per image), used in diffusers' order: first the
   posterior sample of the encoder (``latent_dist.sample(generator)``, shape ``[1, C, h, w]``; the
   engine computes ``mean + std * noise`` and the scaling and shift), then the noise of
   ``scheduler.scale_noise``: ``sigma * noise + (1 - sigma) * latents`` at the first kept step's
   sigma.

The denoising loop itself is the text-to-image one (:func:`sd35trt.runtime.steps.denoise`) on the
cut schedule.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from sd35trt.backends.engine import Engine
from sd35trt.components import Component, ModelDims
from sd35trt.runtime.request import GenerationParams, img2img_steps
from sd35trt.runtime.scheduler import FlowMatchEuler, Schedule


def image_tensor(image) -> torch.Tensor:
    """An RGB PIL image -> ``[1, 3, H, W]`` float32 in [0, 1], as diffusers' ``pil_to_numpy``."""
    array = np.array(image).astype(np.float32) / 255.0  # [H, W, 3]
    return torch.from_numpy(array.transpose(2, 0, 1)[None].copy())


def img2img_schedule(scheduler: FlowMatchEuler, steps: int, strength: float) -> Schedule:
    """The ``steps``-step schedule from its first kept step on (diffusers' ``get_timesteps``)."""
    full = scheduler.schedule(steps)
    start = img2img_steps(steps, strength)[0]
    return Schedule(timesteps=full.timesteps[start:], sigmas=full.sigmas[start:])


def image_latents(
    engine: Engine,
    batch: Sequence[GenerationParams],
    dims: ModelDims,
    sigma: torch.Tensor,
    device: torch.device,
) -> torch.Tensor:
    """The noised starting latents of image-to-image requests.

    Args:
        engine: the active VAE encoder engine.
        batch: validated image-to-image requests (each with ``image`` at its ``height`` x ``width``).
        dims: the model sizes (latent channels, VAE scale factor).
        sigma: 0-d float32, the noise level of the first kept step.
        device: where the loop keeps its tensors.

    Returns:
        ``[sum of num_images, C, h, w]`` float32 on ``device``, request after request (the VAE
        encoder runs one row per image).

    Raises:
        NonFiniteError: the VAE encoder produced NaN or inf.
    """
    from sd35trt.runtime.parts import image_seeds
    from sd35trt.runtime.steps import check_finite

    first = batch[0]
    f = dims.vae_scale_factor
    shape = (1, dims.latent_channels, first.height // f, first.width // f)
    generators = [torch.Generator("cpu").manual_seed(s) for p in batch for s in image_seeds(p)]
    pixels = torch.cat([image_tensor(p.image) for p in batch for _ in range(p.num_images)])  # [N, 3, H, W]
    posterior_noise = torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])
    latent = engine.infer({"image": pixels.to(device), "noise": posterior_noise.to(device)})["latent"]
    check_finite(Component.VAE_ENCODER, latent, "latent")
    init = latent.float()  # [N, C, h, w]
    noise = torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators]).to(device)
    sigma = sigma.to(device=device, dtype=torch.float32)
    return sigma * noise + (1.0 - sigma) * init  # scheduler.scale_noise
