"""The diffusers PyTorch pipeline: the one module that drives ``StableDiffusion3Pipeline``.

It is the baseline the engines are compared with (``sd35trt reference``, bench's PyTorch
configuration and overhead comparison, eval's reference images) and calibration's forward loop
(prompts encoded once, then denoised from the embeddings). Every call follows the guidance rules
of :mod:`sd35trt.guidance` and draws the initial noise from a CPU generator seeded like the
runtime's, so both produce the same latents on any device. Nothing here is imported before a
command needs it (diffusers and torch are imported inside the functions).
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd35trt.config import Config, RuntimeSettings, SkipLayerGuidance
from sd35trt.errors import ModelError
from sd35trt.guidance import applied_skip_layer_guidance, cfg_enabled

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusion3Pipeline


def check_reference_dir(model_dir: str | Path) -> Path:
    """Refuse a ``--reference`` that is not a diffusers pipeline directory (before any work is done).

    Raises:
        ModelError: naming the directory and what is missing.
    """
    root = Path(model_dir)
    if not (root / "model_index.json").is_file():
        raise ModelError(
            f"--reference {root} is not a diffusers pipeline directory (no model_index.json); "
            "for the tiny model it is runs/<name>/model"
        )
    return root


def run_model_dir(engines_dir: str | Path) -> Path:
    """The diffusers directory the run holding ``engines_dir`` exported (its export record's ``model_dir``).

    The default ``--reference`` of ``sd35trt eval`` for ``runs/<name>/engines``.

    Raises:
        ModelError: ``engines_dir`` is not inside a run directory with an export record (an
            unpacked artefact holds no model), or the recorded directory is gone.
    """
    from sd35trt.artifacts.manifest import MANIFEST_NAME, RunManifest, Stage

    run_dir = Path(engines_dir).parent
    record = RunManifest(run_dir).get(Stage.EXPORT) if (run_dir / MANIFEST_NAME).is_file() else None
    if record is None:
        raise ModelError(
            f"--reference is needed: {engines_dir} is not the engines directory of a run with an export "
            "record (an artefact holds no model); give the diffusers directory the engines were made from"
        )
    model_dir = record.details.model_dir  # relative to the run directory (faults.md #31)
    return check_reference_dir(model_dir if model_dir.is_absolute() else run_dir / model_dir)


def load_diffusers(
    model_dir: str | Path, device: str, dtype: torch.dtype | None = None
) -> StableDiffusion3Pipeline:
    """The diffusers pipeline in ``model_dir`` (safetensors only) on ``device``, progress bars off.

    ``dtype`` defaults to what calibration loads (BF16 on CUDA, FP32 on the CPU).

    Raises:
        ModelError: not a diffusers directory, pickle weights, a truncated shard, or not SD3.
    """
    from sd35trt.config import LoadDtype
    from sd35trt.models.loading import load_pipeline_dir, torch_dtype

    root = check_reference_dir(model_dir)
    return load_pipeline_dir(root, device, dtype or torch_dtype(LoadDtype.AUTO, device))


def dtype_label(dtype: str) -> str:
    """``float32`` -> ``FP32``, ``bfloat16`` -> ``BF16``, ``float16`` -> ``FP16``."""
    return {"float32": "FP32", "bfloat16": "BF16", "float16": "FP16"}.get(dtype, dtype)


def pipeline_dtype(pipe: StableDiffusion3Pipeline) -> str:
    """The transformer's dtype without the ``torch.`` prefix (``float32``)."""
    return str(pipe.transformer.dtype).removeprefix("torch.")


def pipeline_label(pipe: StableDiffusion3Pipeline) -> str:
    """``diffusers PyTorch FP32``: how reports name this baseline."""
    return f"diffusers PyTorch {dtype_label(pipeline_dtype(pipe))}"


def generate_images(
    pipe: StableDiffusion3Pipeline,
    prompts: Sequence[str],
    *,
    negative_prompt: str,
    num_inference_steps: int,
    guidance_scale: float,
    height: int,
    width: int,
    seed: int,
    max_sequence_length: int,
    skip_layer_guidance: SkipLayerGuidance | None,
    output_type: str = "pil",
) -> Any:
    """Run the pipeline once over ``prompts`` (one image each), as the runtime runs a request.

    ``height`` and ``width`` in pixels; ``guidance_scale`` at most 1 turns CFG (and SLG) off;
    image ``i``'s initial noise ``[1, 16, H/8, W/8]`` comes from a CPU generator seeded
    ``seed + i``. Returns the pipeline's ``images`` (``output_type`` ``"pil"``, ``"np"``:
    ``[B, H, W, 3]`` float in [0, 1], or ``"latent"``).
    """
    import torch

    slg = applied_skip_layer_guidance(skip_layer_guidance, guidance_scale)
    kwargs: dict[str, Any] = {}
    if slg is not None:
        kwargs = {
            "skip_guidance_layers": list(slg.layers),
            "skip_layer_guidance_scale": slg.scale,
            "skip_layer_guidance_start": slg.start,
            "skip_layer_guidance_stop": slg.stop,
        }
    with torch.inference_mode():
        return pipe(
            list(prompts),
            negative_prompt=[negative_prompt] * len(prompts),
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            max_sequence_length=max_sequence_length,
            generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(len(prompts))],
            output_type=output_type,
            **kwargs,
        ).images


def reference_images(
    pipe: StableDiffusion3Pipeline,
    settings: RuntimeSettings,
    prompts: list[str],
    *,
    seed: int = 0,
    output_type: str = "pil",
    **overrides: Any,
) -> Any:
    """:func:`generate_images` with the runtime defaults ``settings`` (SLG included), replaced by
    the ``overrides`` that are not ``None`` (``num_inference_steps``, ``height``, ...)."""
    chosen = settings.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    fields = {name: getattr(chosen, name) for name in _GENERATION_SETTINGS}
    return generate_images(pipe, prompts, seed=seed, output_type=output_type, **fields)


#: The runtime settings :func:`generate_images` takes.
_GENERATION_SETTINGS = (
    "negative_prompt",
    "num_inference_steps",
    "guidance_scale",
    "height",
    "width",
    "max_sequence_length",
    "skip_layer_guidance",
)


def generate_reference(config: Config, run_dir: Path, prompt: str, out: Path, **kwargs) -> Path:
    """Generate one image with the PyTorch pipeline and write it as the PNG ``out``.

    ``kwargs``: :func:`reference_images` overrides (``num_inference_steps``, ``seed``, ...).
    """
    from PIL.PngImagePlugin import PngInfo

    from sd35trt.models.loading import load_pipeline

    pipe = load_pipeline(config, run_dir)
    image = reference_images(pipe, config.runtime, [prompt], **kwargs)[0]
    meta = PngInfo()
    meta.add_text("prompt", prompt)
    meta.add_text("generator", "diffusers StableDiffusion3Pipeline (sd35trt reference)")
    meta.add_text("seed", str(kwargs.get("seed", 0)))
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, pnginfo=meta)
    return out


# --------------------------------------------------------------------------------------------
# Calibration's loop: prompts encoded once, then denoised from the embeddings


@dataclass(frozen=True)
class PromptBatch:
    """One batch of prompts, encoded once, and the seed of its initial noise.

    The negative embeddings are None when guidance is off (``guidance_scale <= 1``).
    """

    prompts: tuple[str, ...]
    seed: int
    prompt_embeds: torch.Tensor  # [B, 77 + max_sequence_length, joint_attention_dim]
    pooled_prompt_embeds: torch.Tensor  # [B, pooled_projection_dim]
    negative_prompt_embeds: torch.Tensor | None
    negative_pooled_prompt_embeds: torch.Tensor | None


def encode_batches(
    pipe: StableDiffusion3Pipeline,
    prompts: Sequence[str],
    batch_size: int,
    seed: int,
    guidance_scale: float,
    device: str,
    *,
    negative_prompt: str,
    max_sequence_length: int,
) -> list[PromptBatch]:
    """Encode ``prompts`` in batches with the pipeline's three text encoders.

    Batch ``i`` gets noise seed ``seed + i``. The negative prompt and T5's length are the
    runtime's (``config.runtime``), so the transformer is calibrated on the conditioning the
    engines will see. The batches are on the pipeline's device.
    """
    import torch

    batches = []
    with torch.no_grad():
        for i, start in enumerate(range(0, len(prompts), batch_size)):
            chunk = list(prompts[start : start + batch_size])
            embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
                prompt=chunk,
                prompt_2=None,
                prompt_3=None,
                device=torch.device(device),
                do_classifier_free_guidance=cfg_enabled(guidance_scale),
                negative_prompt=[negative_prompt] * len(chunk),
                max_sequence_length=max_sequence_length,
            )
            batches.append(PromptBatch(tuple(chunk), seed + i, embeds, pooled, negative, negative_pooled))
    return batches


def drop_text_encoders(pipe: StableDiffusion3Pipeline) -> None:
    """Free the text encoders (about 11 GB for sd3.5-large in BF16) once prompts are encoded."""
    import torch

    pipe.text_encoder = pipe.text_encoder_2 = pipe.text_encoder_3 = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def denoise_batch(
    pipe: StableDiffusion3Pipeline,
    batch: PromptBatch,
    num_inference_steps: int,
    guidance_scale: float,
    height: int,
    width: int,
    output_type: str,
    **control: Any,
) -> Any:
    """The pipeline's ``images`` from diffusers' SD3 denoising loop on one encoded batch.

    ``output_type``: ``"latent"`` stops before the VAE, ``"np"`` gives ``[B, H, W, 3]`` in [0, 1];
    ``control``: ``control_image=...`` for a ``StableDiffusion3ControlNetPipeline``.
    """
    import torch

    return pipe(
        prompt_embeds=batch.prompt_embeds,
        negative_prompt_embeds=batch.negative_prompt_embeds,
        pooled_prompt_embeds=batch.pooled_prompt_embeds,
        negative_pooled_prompt_embeds=batch.negative_pooled_prompt_embeds,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        height=height,
        width=width,
        generator=torch.Generator("cpu").manual_seed(batch.seed),
        output_type=output_type,
        **control,
    ).images
