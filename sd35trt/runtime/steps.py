"""The steps of SD3.5 generation over engines (diffusers' ``StableDiffusion3Pipeline.__call__``'s,
numbered in :mod:`sd35trt.runtime.pipeline`); every engine output is checked for NaN and inf.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from sd35trt.artifacts.repair import REBUILD
from sd35trt.backends.engine import Engine
from sd35trt.components import CONTROLNET_INPUT, Component, ModelDims, engine_components
from sd35trt.config import SkipLayerGuidance
from sd35trt.errors import ManifestError, NonFiniteError
from sd35trt.runtime.cache import CachedPass
from sd35trt.runtime.control import ControlResiduals
from sd35trt.runtime.request import GenerationParams
from sd35trt.runtime.scheduler import FlowMatchEuler, Schedule
from sd35trt.runtime.tokenize import TokenizedPrompts

TEXT_ENCODERS = (Component.CLIP_L, Component.CLIP_G, Component.T5)


class EngineSet:
    """The engines (the five of text-to-image, and the VAE encoder when built) and their lifetime.

    Normally every engine is activated once and kept. With ``low_vram`` an engine is activated
    only for its stage and deactivated after it, so at most one stage's engines hold memory.
    """

    def __init__(self, engines: Mapping[Component, Engine], low_vram: bool = False) -> None:
        missing = [c.value for c in engine_components(engines) if c not in engines]
        if missing:
            raise ManifestError(f"no engine for {', '.join(missing)}; every component needs one")
        self.engines = dict(engines)
        self.low_vram = low_vram

    def activate_all(self) -> None:
        """Activate every engine now (a no-op with ``low_vram``); on failure none stays active."""
        if self.low_vram:
            return
        try:
            for engine in self.engines.values():
                if not engine.active:
                    engine.activate()
        except BaseException:
            self.deactivate_all()
            raise

    def probe(self) -> None:
        """Load and free each engine in turn, so that with ``low_vram`` an engine its backend
        cannot load is named at start-up, not at the first request.

        Raises:
            EngineLoadError: naming the engine file (from the backend's ``activate``).
        """
        for engine in self.engines.values():
            if not engine.active:
                engine.activate()
                engine.deactivate()

    def deactivate_all(self) -> None:
        for engine in self.engines.values():
            engine.deactivate()

    def shared_activation_bytes(self) -> int | None:
        """Peak size of the activation buffer the engines share (TensorRT), or ``None``."""
        shared = {id(m): m for e in self.engines.values() if (m := getattr(e, "activation_memory", None))}
        return max((m.peak_bytes for m in shared.values()), default=None)

    @contextlib.contextmanager
    def use(self, component: Component) -> Iterator[Engine]:
        """The engine of ``component``, active for the ``with`` block."""
        engine = self.engines[component]
        if not engine.active:
            engine.activate()
        try:
            yield engine
        finally:
            if self.low_vram and engine.active:
                engine.deactivate()
                if torch.cuda.is_available():
                    # Hand torch's cached blocks back, so the next stage's TensorRT allocations fit.
                    torch.cuda.empty_cache()


def check_finite(stage: Component, tensor: torch.Tensor, what: str) -> None:
    """Raise when ``tensor`` holds NaN or inf.

    Raises:
        NonFiniteError: naming the stage and how many values are bad.
    """
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = int(finite.numel() - finite.sum())
        raise NonFiniteError(
            stage.value,
            f"{stage.value} produced {bad} non-finite values (NaN or inf) of {tensor.numel()} in {what}; "
            "no image was written",
        )


@dataclass(frozen=True)
class TextEmbeddings:
    """Step 3's output: ``hidden [T, 77 + L, D]`` and ``pooled [T, P]`` float32, one row per text."""

    hidden: torch.Tensor
    pooled: torch.Tensor


def encode_text(engines: EngineSet, tokens: TokenizedPrompts) -> TextEmbeddings:
    """Steps 2 and 3: run the three text encoders and join their outputs as SD3 does.

    CLIP-L and CLIP-G penultimate hidden states are concatenated on the channel axis and
    zero-padded to T5's width, then T5's states follow on the sequence axis; the pooled embedding
    is both CLIPs' projected embeddings side by side.

    Raises:
        NonFiniteError: an encoder produced NaN or inf.
    """
    out: dict[Component, dict[str, torch.Tensor]] = {}
    for encoder in TEXT_ENCODERS:
        with engines.use(encoder) as engine:
            result = engine.infer({"input_ids": tokens.ids(encoder)})
        for name, value in result.items():
            check_finite(encoder, value, name)
        out[encoder] = {name: value.float() for name, value in result.items()}
    clip_l, clip_g = out[Component.CLIP_L], out[Component.CLIP_G]
    t5 = out[Component.T5]["last_hidden_state"]  # [T, L, D]
    clip = torch.cat([clip_l["hidden_states"], clip_g["hidden_states"]], dim=-1)  # [T, 77, Hl + Hg]
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # [T, 77, D]
    hidden = torch.cat([clip, t5.to(clip.device)], dim=-2)  # [T, 77 + L, D]
    pooled = torch.cat([clip_l["text_embeds"], clip_g["text_embeds"]], dim=-1)  # [T, P]
    return TextEmbeddings(hidden=hidden, pooled=pooled)


def initial_latents(seeds: Sequence[int], dims: ModelDims, height: int, width: int) -> torch.Tensor:
    """Step 4: the starting noise, one image per seed, equal to diffusers' given those generators.

    diffusers' ``randn_tensor`` given a list of CPU generators draws one ``[1, C, h, w]`` sample
    per generator on the CPU in the latents' dtype (float32 here), concatenates them and only
    then moves the batch to the device (so image ``i`` can be made again alone). Returns
    ``[len(seeds), C, height / f, width / f]`` float32 on the CPU.
    """
    f = dims.vae_scale_factor
    shape = (1, dims.latent_channels, height // f, width // f)
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    return torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])


def skip_layer_steps(steps: int, slg: SkipLayerGuidance | None) -> set[int]:
    """The steps of ``steps`` that get the skip-layer pass (none without skip-layer guidance)."""
    if slg is None:  # resolve_request keeps it only under CFG (sd35trt.guidance)
        return set()
    return {i for i in range(steps) if steps * slg.start < i < steps * slg.stop}  # diffusers' strict <


@dataclass(frozen=True)
class Conditioning:
    """What the transformer is conditioned on, rows ordered ``[negatives..., positives...]`` under CFG."""

    hidden: torch.Tensor  # [2N or N, 77 + L, D]
    pooled: torch.Tensor  # [2N or N, P]
    cfg: bool

    def positive(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The positive rows only ``([N, 77 + L, D], [N, P])`` (the skip-layer pass)."""
        if not self.cfg:
            return self.hidden, self.pooled
        n = self.hidden.shape[0] // 2
        return self.hidden[n:], self.pooled[n:]


class StepTimer:
    """Per-step durations without stalling the device: CUDA events on a GPU, the wall clock on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def durations(self) -> list[float]:
        """Seconds between consecutive marks (waits for the device once)."""
        if self.cuda:
            if self.marks:
                self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in zip(self.marks[:-1], self.marks[1:], strict=True)]
        return [b - a for a, b in zip(self.marks[:-1], self.marks[1:], strict=True)]


def denoise(
    engine: Engine | CachedPass,
    latents: torch.Tensor,
    cond: Conditioning,
    params: GenerationParams,
    scheduler: FlowMatchEuler,
    timer: StepTimer | None = None,
    schedule: Schedule | None = None,
    skip_engine: Engine | CachedPass | None = None,
    residuals: ControlResiduals | None = None,
) -> torch.Tensor:
    """Step 5: flow-match Euler with classifier-free and skip-layer guidance.

    As diffusers: under CFG the transformer sees ``[latents, latents]`` against
    ``[negative, positive]`` and ``v = v_neg + g (v_pos - v_neg)``; inside the skip-layer window
    one more conditional pass skips the configured blocks and ``v += s (v_pos - v_skip)``.

    ``latents`` ``[N, C, h, w]`` float32 -> the denoised latents, same shape. ``engine``: the
    transformer or the first-block cache's CFG pass; ``skip_engine`` (default ``engine``) runs the
    skip-layer pass; ``schedule`` defaults to all ``params.num_inference_steps`` (image-to-image:
    the strength's cut); ``residuals``: ControlNet residuals per step; ``timer`` is marked before
    the first step and after each one.

    Raises:
        NonFiniteError: the transformer produced NaN or inf (checked once, after the last step).
        ManifestError: the engine's skip-layer input does not fit the skip-layer settings.
    """
    schedule = schedule if schedule is not None else scheduler.schedule(params.num_inference_steps)
    slg = params.skip_layer_guidance
    slg_steps = skip_layer_steps(len(schedule), slg)
    feeds, skip_feeds = _text_feeds(engine, cond, slg, bool(slg_steps), latents.device)
    n_images = latents.shape[0]
    batch = 2 * n_images if cond.cfg else n_images
    # Everything per step that does not depend on the latents is prepared here, so the loop is the
    # engine call and the element-wise guidance and Euler update (the host overhead bench measures).
    timesteps = schedule.timesteps.to(latents.device)[:, None]  # [steps, 1]
    step_t = timesteps.expand(-1, batch).unbind(0)  # steps x [2N or N]
    skip_t = timesteps.expand(-1, n_images).unbind(0)  # steps x [N]
    dts = (schedule.sigmas[1:] - schedule.sigmas[:-1]).tolist()  # float32 step sizes, exact as floats
    skip_engine = skip_engine or engine
    g = params.guidance_scale
    # Under CFG the latents live twice in one [2N] buffer, updated in place: the transformer reads
    # it directly (no per-step concatenation) and one broadcast update writes both halves.
    x = torch.cat([latents, latents]) if cond.cfg else latents.clone()  # [2N or N, C, h, w]
    pair = x.view(2, n_images, *latents.shape[1:]) if cond.cfg else None  # [2, N, C, h, w]
    feeds["hidden_states"] = x
    if timer:
        timer.mark()
    for i, dt in enumerate(dts):
        feeds["timestep"] = step_t[i]
        if residuals is not None:
            feeds[CONTROLNET_INPUT] = residuals(i, len(dts), x, step_t[i])  # [2N or N, n, tokens, inner]
        velocity = engine.infer(feeds)["noise_pred"]  # [2N or N, C, h, w]
        if velocity.dtype is not torch.float32:
            velocity = velocity.float()
        if pair is None:
            x.add_(velocity, alpha=dt)  # x + dt * v
        elif i in slg_steps:
            skip_feeds["hidden_states"] = x[:n_images]  # [N, C, h, w] view, contiguous
            skip_feeds["timestep"] = skip_t[i]
            if residuals is not None:  # the positive rows' residuals
                skip_feeds[CONTROLNET_INPUT] = feeds[CONTROLNET_INPUT][n_images:]
            v_skip = skip_engine.infer(skip_feeds)["noise_pred"].float()  # [N, C, h, w]
            _guided_update(pair, velocity, dt, g, v_skip, slg.scale)
        else:
            _guided_update(pair, velocity, dt, g)
        if timer:
            timer.mark()
    return _finite(x[:n_images], len(schedule))  # [N, C, h, w]


def _guided_update(
    pair: torch.Tensor,
    velocity: torch.Tensor,
    dt: float,
    g: float,
    v_skip: torch.Tensor | None = None,
    s: float = 0.0,
) -> None:
    """One Euler step of the CFG pair ``[2, N, C, h, w]`` in place, from ``velocity`` ``[2N, C, h, w]``.

    x + dt * (v_u + g (v_t - v_u)) = x + dt (1 - g) v_u + dt g v_t, and with skip-layer guidance
    + dt s (v_t - v_skip): the same update as diffusers in fused in-place adds (equal up to float32
    rounding).
    """
    v_uncond, v_text = velocity.chunk(2)  # [N, C, h, w] each
    if v_skip is None:
        pair.add_(v_uncond, alpha=dt * (1 - g)).add_(v_text, alpha=dt * g)
        return
    pair.add_(v_uncond, alpha=dt * (1 - g)).add_(v_text, alpha=dt * (g + s))
    pair.add_(v_skip, alpha=-dt * s)


def _text_feeds(
    engine: Engine | CachedPass,
    cond: Conditioning,
    slg: SkipLayerGuidance | None,
    skip_pass: bool,
    device: torch.device,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """The feeds every step shares: the text conditioning and, for an engine with a
    ``skip_layers [n]`` input, its gates (every block runs; the listed blocks skipped in the
    skip-layer pass, whose feeds are the positive rows' and ``None`` without ``skip_pass``).

    Raises:
        ManifestError: the engine gates another number of blocks than ``slg`` lists.
    """
    feeds = {"encoder_hidden_states": cond.hidden, "pooled_projections": cond.pooled}
    skip_on = None
    if "skip_layers" in engine.spec.input_names:
        size = engine.spec.inputs[engine.spec.input_names.index("skip_layers")].shape[0]
        if slg is not None and len(slg.layers) != size:
            raise ManifestError(
                f"skip-layer guidance lists {len(slg.layers)} layers, the transformer engine gates "
                f"{size}; {REBUILD}"
            )
        feeds["skip_layers"] = torch.zeros(size, device=device)  # [n]: every block runs
        skip_on = torch.ones(size, device=device)  # [n]: the listed blocks are skipped
    if not skip_pass:
        return feeds, None
    hidden, pooled = cond.positive()
    return feeds, {"encoder_hidden_states": hidden, "pooled_projections": pooled, "skip_layers": skip_on}


def _finite(latents: torch.Tensor, steps: int) -> torch.Tensor:
    """``latents``, checked once after the loop: NaN and inf survive every later Euler update, so
    one check catches a bad step without a per-step device sync.

    Raises:
        NonFiniteError: naming the transformer.
    """
    if not bool(torch.isfinite(latents).all()):
        raise NonFiniteError(
            Component.TRANSFORMER.value,
            f"transformer produced non-finite values (NaN or inf) in noise_pred during denoising "
            f"({steps} steps); no image was written",
        )
    return latents


def decode(engine: Engine, latents: torch.Tensor) -> list[Image.Image]:
    """Step 6: VAE-decode raw latents ``[N, C, h, w]`` into ``N`` RGB images.

    Raises:
        NonFiniteError: the decoder produced NaN or inf.
    """
    image = engine.infer({"latent": latents})["image"]  # [N, 3, H, W] in [0, 1]
    check_finite(Component.VAE_DECODER, image, "image")
    array = image.cpu().permute(0, 2, 3, 1).float().numpy()  # [N, H, W, 3], rounded as diffusers does
    return [Image.fromarray(a) for a in (array * 255).round().astype(np.uint8)]


def peak_memory(device: torch.device | str) -> tuple[int, str]:
    """``(bytes, what they measure)``: the torch CUDA allocator's peak on ``device``, or the
    process's peak RSS on the CPU (``ru_maxrss``: kilobytes on Linux, bytes on macOS)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(
            device
        ), "CUDA, torch allocator (TensorRT's own memory not included)"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (rss if sys.platform == "darwin" else rss * 1024), "host peak RSS of the process"
