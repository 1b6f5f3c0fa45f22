"""``sd35trt reference``: the diffusers PyTorch pipeline, the baseline engines are compared with."""

from __future__ import annotations

from pathlib import Path

from sd35trt.config import Config
from sd35trt.guidance import applied_skip_layer_guidance


def reference_images(
    pipe,
    config: Config,
    prompts: list[str],
    *,
    negative_prompt: str | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
    output_type: str = "pil",
):
    """Run ``StableDiffusion3Pipeline`` with the config's runtime defaults (SLG included).

    The initial noise comes from a CPU generator seeded with ``seed``, as the runtime does, so
    both produce the same latents on any device.
    """
    import torch

    rt = config.runtime
    guidance_scale = rt.guidance_scale if guidance_scale is None else guidance_scale
    slg = applied_skip_layer_guidance(rt.skip_layer_guidance, guidance_scale)
    kwargs = {}
    if slg is not None:
        kwargs = {
            "skip_guidance_layers": list(slg.layers),
            "skip_layer_guidance_scale": slg.scale,
            "skip_layer_guidance_start": slg.start,
            "skip_layer_guidance_stop": slg.stop,
        }
    with torch.inference_mode():
        return pipe(
            prompts,
            negative_prompt=[negative_prompt if negative_prompt is not None else rt.negative_prompt]
            * len(prompts),
            num_inference_steps=num_inference_steps or rt.num_inference_steps,
            guidance_scale=guidance_scale,
            height=height or rt.height,
            width=width or rt.width,
            max_sequence_length=rt.max_sequence_length,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type=output_type,
            **kwargs,
        ).images


def generate_reference(config: Config, run_dir: Path, prompt: str, out: Path, **kwargs) -> Path:
    """Generate one image with the PyTorch pipeline and write it as a PNG.

    Returns:
        The PNG path.
    """
    from PIL.PngImagePlugin import PngInfo

    from sd35trt.model import load_pipeline

    pipe = load_pipeline(config, run_dir)
    image = reference_images(pipe, config, [prompt], **kwargs)[0]
    meta = PngInfo()
    meta.add_text("prompt", prompt)
    meta.add_text("generator", "diffusers StableDiffusion3Pipeline (sd35trt reference)")
    meta.add_text("seed", str(kwargs.get("seed", 0)))
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, pnginfo=meta)
    return out
