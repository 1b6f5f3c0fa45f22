"""The SD3.5 generation loop over engines, and the Python API around it.

``Sd35Runtime.load(engines_dir)`` verifies and opens an engines directory once; ``generate``
then runs any number of requests::

    from sd35trt.runtime.pipeline import GenerationRequest, Sd35Runtime

    with Sd35Runtime.load("runs/tiny/engines") as runtime:
        result = runtime.generate(GenerationRequest("a red fox in the snow", seed=7))
        result.images[0].save("fox.png")

The loop follows diffusers' ``StableDiffusion3Pipeline`` step for step, so the same seed gives
the same image as diffusers with the same weights:

1. tokenize (CLIP-L and CLIP-G: 77 tokens; T5: the engines' sequence length),
2. encode with the three text encoders, ``[negative, positive]`` in one batch under CFG,
3. join the embeddings: ``[T, 77 + L, D]`` and pooled ``[T, P]``,
4. draw the initial latents, image ``i`` of seed ``s`` from a CPU generator seeded ``s + i``;
   image-to-image: the VAE-encoded image noised to the strength's first step,
5. denoise with flow-match Euler, classifier-free guidance and skip-layer guidance,
6. decode with the VAE (scaling, shift and the [0, 1] mapping are inside its engine).

Every stage's output is checked for NaN and inf; a failure names the stage and no image is
returned. The steps are in :mod:`sd35trt.runtime.steps`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image

from sd35trt.components import Component, ModelDims, engine_components
from sd35trt.config import RuntimeSettings, sha256_json
from sd35trt.errors import BackendUnavailableError, ConfigError, RequestError
from sd35trt.runtime.cache import transformer_passes
from sd35trt.runtime.control import transformer_residuals
from sd35trt.runtime.img2img import image_latents, img2img_schedule
from sd35trt.runtime.parts import engine_parts, image_seeds
from sd35trt.runtime.png import attach_parameters
from sd35trt.runtime.request import (
    EngineBatch,
    GenerationParams,
    GenerationRequest,
    RequestLimits,
    resolve_request,
)
from sd35trt.runtime.scheduler import FlowMatchEuler, Schedule
from sd35trt.runtime.steps import (
    Conditioning,
    EngineSet,
    StepTimer,
    decode,
    denoise,
    encode_text,
    initial_latents,
    peak_memory,
    skip_layer_steps,
)
from sd35trt.runtime.tokenize import PromptTokenizer, truncation_warnings

__all__ = [
    "EngineBatch",
    "EngineSet",
    "GenerationParams",
    "GenerationRequest",
    "GenerationResult",
    "ModelInfo",
    "Sd35Runtime",
    "Timings",
]

SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"


# -- results -------------------------------------------------------------------------------------


@dataclass
class Timings:
    """Wall-clock seconds per stage of one generation (device work included), and peak memory.

    With ``low_vram`` the stage times include loading and freeing that stage's engines.
    """

    text_encoding_s: float = 0.0
    image_encoding_s: float = 0.0  # image-to-image: the VAE encoder and the noising
    step_s: list[float] = field(default_factory=list)
    denoise_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0
    peak_memory_bytes: int = 0
    memory_kind: str = ""  # what peak_memory_bytes measures
    #: CUDA only: most device memory in use (every allocator, TensorRT's included) at a stage end.
    device_memory_bytes: int | None = None
    #: TensorRT: the one activation buffer all engines share (bytes; None: not shared).
    activation_memory_bytes: int | None = None
    #: transformer calls (each step's CFG pass and skip-layer pass), and how many of them the
    #: first-block cache answered without the rest of the transformer.
    transformer_calls: int = 0
    transformer_skipped: int = 0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def format(self) -> str:
        """A short human-readable report (one line per stage)."""
        steps = self.step_s
        mean = sum(steps) / len(steps) if steps else 0.0
        per_step = ", ".join(f"{s * 1000:.1f}" for s in steps)
        lines = [
            f"text encoding   {self.text_encoding_s * 1000:10.1f} ms",
            *([f"image encoding  {self.image_encoding_s * 1000:10.1f} ms"] if self.image_encoding_s else []),
            f"denoising       {self.denoise_s * 1000:10.1f} ms  ({len(steps)} steps, "
            f"mean {mean * 1000:.1f} ms/step)",
            f"  per step (ms) {per_step}",
            f"decode          {self.decode_s * 1000:10.1f} ms",
            f"total           {self.total_s * 1000:10.1f} ms",
            f"peak memory     {self.peak_memory_bytes / 2**20:10.1f} MiB  ({self.memory_kind})",
        ]
        if self.device_memory_bytes is not None:
            lines.append(
                f"device memory   {self.device_memory_bytes / 2**20:10.1f} MiB  "
                "(most in use on the GPU at a stage end, all allocators)"
            )
        if self.activation_memory_bytes is not None:
            lines.append(
                f"activations     {self.activation_memory_bytes / 2**20:10.1f} MiB  "
                "(one device buffer shared by the engines, sized for the largest)"
            )
        return "\n".join(lines)

    @classmethod
    def combined(cls, parts: Sequence[Timings]) -> Timings:
        """The timings of engine batches run one after the other: times summed, peaks the largest."""
        if len(parts) == 1:
            return parts[0]
        out = cls(memory_kind=parts[0].memory_kind)
        for t in parts:
            for name in ("text_encoding_s", "image_encoding_s", "denoise_s", "decode_s", "total_s"):
                setattr(out, name, getattr(out, name) + getattr(t, name))
            out.step_s.extend(t.step_s)
            out.peak_memory_bytes = max(out.peak_memory_bytes, t.peak_memory_bytes)
            for name in ("device_memory_bytes", "activation_memory_bytes"):
                values = [v for v in (getattr(out, name), getattr(t, name)) if v is not None]
                setattr(out, name, max(values) if values else None)
        return out


@dataclass(frozen=True)
class GenerationResult:
    """The images of one request and how they were made.

    Image ``i`` was drawn with seed ``params.seed + i``; ``params`` has the defaults filled in and
    the drawn seed. A request run as several engine batches has their ``timings`` summed, the first
    one's ``batch`` and each image's in ``image_batches``. ``warnings``: settings that had no
    effect and prompt text dropped by truncation. ``engine_digest``: of the engines' files'
    sha256; ``model``: the weights they hold (repo commit, LoRAs with sha256 and scale).
    """

    images: list[Image.Image]  # each one's ``save("x.png")`` records its parameters (as ``save`` here)
    params: GenerationParams
    timings: Timings
    warnings: tuple[str, ...]
    engine_digest: str
    batch: EngineBatch = field(default_factory=EngineBatch)
    model: Mapping = field(default_factory=dict)
    image_batches: tuple[EngineBatch, ...] = ()
    engine_batches: int = 1

    @property
    def seeds(self) -> tuple[int, ...]:
        """The seed of each image (``params.seed + i``): a one-image request with it gives that image."""
        return image_seeds(self.params)

    def image_batch(self, index: int) -> EngineBatch:
        """The engine batch image ``index`` ran in."""
        return self.image_batches[index] if self.image_batches else self.batch

    def save(self, path: str | Path, index: int = 0) -> Path:
        """Write image ``index`` atomically as the PNG ``sd35trt run`` writes (``parameters`` chunk)."""
        from sd35trt.runtime.png import save_png

        return save_png(
            path,
            self.images[index],
            self.params,
            self.engine_digest,
            index,
            self.image_batch(index),
            self.model,
        )

    @classmethod
    def combined(cls, params: GenerationParams, parts: Sequence[GenerationResult]) -> GenerationResult:
        """The result of ``params`` from its parts' results (:func:`sd35trt.runtime.parts.engine_parts`)."""
        if len(parts) == 1:
            return parts[0]
        skipped = [r.params.cache_skipped_steps for r in parts]
        if None not in skipped:  # the first-block cache ran: its skipped steps, summed over the parts
            params = replace(params, cache_skipped_steps=sum(skipped))
        return cls(
            images=[im for r in parts for im in r.images],
            params=params,
            timings=Timings.combined([r.timings for r in parts]),
            warnings=tuple(dict.fromkeys(w for r in parts for w in r.warnings)),
            engine_digest=parts[0].engine_digest,
            batch=parts[0].batch,
            model=parts[0].model,
            image_batches=tuple(r.image_batch(i) for r in parts for i in range(len(r.images))),
            engine_batches=sum(r.engine_batches for r in parts),
        )


# -- what the runtime knows about its engines -----------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """What the runtime knows about the model behind its engines (``digest`` and ``model``, the
    weights they hold, are written into every PNG)."""

    dims: ModelDims
    limits: RequestLimits
    defaults: RuntimeSettings
    digest: str
    model: Mapping = field(default_factory=dict)


# -- the runtime -----------------------------------------------------------------------------------


def engine_digest(files: Mapping[str, Sequence[str]]) -> str:
    """A short digest of the engines: component -> sha256 of each of its files."""
    return sha256_json({k: list(v) for k, v in sorted(files.items())})[:16]


class Sd35Runtime:
    """Verified engines, tokenizers and scheduler, ready to generate.

    Load once with :meth:`load`, call :meth:`generate` any number of times, :meth:`close` (or use
    it as a context manager) to free the engines. Calls are serialized by a lock.
    """

    def __init__(
        self,
        engines: EngineSet,
        tokenizer: PromptTokenizer,
        scheduler: FlowMatchEuler,
        info: ModelInfo,
        device: str | torch.device = "cpu",
    ) -> None:
        """``tokenizer`` at the engines' T5 length; ``device``: the engines', where the loop keeps tensors."""
        self.engines = engines
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.info = info
        self.device = torch.device(device)
        self._lock = threading.Lock()
        self._device_used = 0

    @classmethod
    def load(
        cls,
        engines_dir: str | Path,
        *,
        low_vram: bool = False,
        device: str | None = None,
        intra_op_threads: int | None = None,
        use_cuda_graph: bool = True,
        activate: bool = True,
        max_images: int | None = None,
    ) -> Sd35Runtime:
        """Verify an engines directory and load it.

        ``low_vram``: load each engine only for its stage and free it after. ``device``: ``cpu`` or
        ``cuda[:N]``; default ``cuda`` for TensorRT engines, ``cpu`` for ONNX Runtime ones.
        ``activate``: load the engines now (with ``low_vram``: load and free each once), so an
        engine that cannot be loaded is named here. ``max_images`` defaults to
        :data:`~sd35trt.runtime.request.DEFAULT_MAX_IMAGES`.

        Raises:
            ManifestError: the directory, its manifest or a support file is missing or malformed.
            VerificationError: an engine or support file does not match its record (named).
            IncompatibleEngineError: engines built for another GPU or TensorRT version.
            BackendUnavailableError: a CUDA device was asked for and there is none.
            EngineLoadError: an engine matches its record but its backend cannot load it (named).
        """
        from sd35trt.backends.load import open_engines, verify_engines
        from sd35trt.backends.registry import backend_of

        # Engine files: sizes here, sha256 when each engine loads (each byte hashed once).
        manifest = verify_engines(engines_dir, hash_engines=False)
        device = backend_of(manifest.backend).device_for(device)
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailableError(f"device {device!r} was asked for, but torch sees no CUDA device")
        components = engine_components(manifest.engines)
        limits = RequestLimits.from_manifest(manifest)
        if max_images is not None:
            if max_images < 1:
                raise ConfigError(f"max_images {max_images} is below 1; give 1 or more")
            limits = dataclasses.replace(limits, max_images=max_images)
        defaults = manifest.runtime_defaults
        digest = engine_digest({c.value: [f.sha256 for f in manifest.record(c).files] for c in components})
        info = ModelInfo(
            dims=manifest.dims, limits=limits, defaults=defaults, digest=digest, model=manifest.model
        )
        tokenizer = PromptTokenizer.load(manifest.directory, limits.t5_length)
        scheduler = FlowMatchEuler.from_config(manifest.directory / SCHEDULER_CONFIG)
        opened = open_engines(
            manifest,
            components,
            device=device,
            intra_op_threads=intra_op_threads,
            use_cuda_graph=use_cuda_graph,
        )
        runtime = cls(EngineSet(opened, low_vram=low_vram), tokenizer, scheduler, info, device=device)
        if activate and low_vram:
            runtime.engines.probe()
        elif activate:
            runtime.engines.activate_all()
        return runtime

    # -- public API ------------------------------------------------------------------------------

    def validate(self, request: GenerationRequest) -> GenerationParams:
        """Check ``request`` against the engines and fill in the defaults (runs nothing).

        Raises:
            RequestError: naming the field, the value and what is allowed.
        """
        return resolve_request(request, self.info.limits, self.info.defaults)

    def parts(self, params: GenerationParams) -> list[GenerationParams]:
        """``params`` cut into engine batches (one part when it fits; see :func:`engine_parts`)."""
        lo = self.info.limits.images(params.cfg, params.skip_layer_guidance is not None)[0]
        return engine_parts(params, self.info.limits.images_per_batch(params), lo)

    def generate(self, request: GenerationRequest | GenerationParams) -> GenerationResult:
        """Generate the images of one request, in several engine batches when it needs more.

        ``request``: a request, or parameters :meth:`validate` returned.

        Raises:
            RequestError: the request is invalid (checked before anything runs).
            NonFiniteError: a stage produced NaN or inf (named); nothing is returned.
        """
        params = request if isinstance(request, GenerationParams) else self.validate(request)
        parts = [self.generate_batch([part])[0] for part in self.parts(params)]
        return GenerationResult.combined(params, parts)

    def generate_batch(self, batch: Sequence[GenerationParams]) -> list[GenerationResult]:
        """Run several validated requests as one engine batch.

        Each request keeps its own prompt and seed; its images equal those it would get alone up
        to the engines' batch-size numerics (about 1/255; each result records its
        :class:`EngineBatch`). Size, steps, guidance and skip-layer guidance must be equal
        (:attr:`GenerationParams.batch_key`).

        Raises:
            RequestError: the requests differ in their batch key, or together exceed the engine batch.
            NonFiniteError: a stage produced NaN or inf; the whole batch fails.
        """
        if not batch:
            return []
        first = batch[0]
        if any(p.batch_key != first.batch_key for p in batch):
            raise RequestError(
                "num_images", "requests in one engine batch must share size, steps and guidance"
            )
        total = sum(p.num_images for p in batch)
        lo, hi = self.info.limits.images(first.cfg, first.skip_layer_guidance is not None)
        if not lo <= total <= hi:
            raise RequestError("num_images", f"{total} images in one engine batch is outside {lo}..{hi}")
        if first.image is not None and total > (self.info.limits.img2img_batch or (0, 0))[1]:
            raise RequestError("image", f"{total} images to encode exceed the vae_encoder engine's batch")
        texts = len(batch) * (2 if first.cfg else 1)
        if texts > self.info.limits.encoder_batch[1]:
            raise RequestError(
                "num_images",
                f"{len(batch)} prompts need {texts} text rows, the text encoders take at most "
                f"{self.info.limits.encoder_batch[1]}",
            )
        with self._lock, torch.inference_mode():
            return self._run(batch)

    def close(self) -> None:
        """Free every engine."""
        self.engines.deactivate_all()

    def __enter__(self) -> Sd35Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the loop --------------------------------------------------------------------------------

    def _clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # time the device's work, not its queueing
            # TensorRT allocates outside torch's allocator: sample what the whole device holds.
            free, total = torch.cuda.mem_get_info(self.device)
            self._device_used = max(self._device_used, total - free)
        return time.perf_counter()

    def _run(self, batch: Sequence[GenerationParams]) -> list[GenerationResult]:
        first = batch[0]
        timings = Timings()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._device_used = 0
        start = self._clock()
        cond, warnings = self._encode(batch)  # 1-3
        timings.text_encoding_s = self._clock() - start
        latents, schedule = self._initial_latents(batch, timings)  # 4
        latents, skipped = self._denoise(first, cond, latents, schedule, timings)  # 5
        mark = self._clock()  # 6. Decode.
        with self.engines.use(Component.VAE_DECODER) as vae:
            images = decode(vae, latents)
        timings.decode_s = self._clock() - mark
        timings.total_s = self._clock() - start
        timings.peak_memory_bytes, timings.memory_kind = peak_memory(self.device)
        if self.device.type == "cuda":
            timings.device_memory_bytes = self._device_used
        timings.activation_memory_bytes = self.engines.shared_activation_bytes()
        return self._results(batch, images, timings, skipped, warnings)

    def _encode(self, batch: Sequence[GenerationParams]) -> tuple[Conditioning, dict[int, list[str]]]:
        """Steps 1-3: the text conditioning ``[2N or N, ...]`` and truncation warnings per request."""
        cfg = batch[0].cfg
        # 1. Tokenize: [negatives..., positives...] under CFG, one row per request.
        texts = [p.negative_prompt for p in batch] if cfg else []
        labels = [(i, "negative_prompt") for i in range(len(batch))] if cfg else []
        texts += [p.prompt for p in batch]
        labels += [(i, "prompt") for i in range(len(batch))]
        tokens = self.tokenizer(texts)
        # 2-3. Encode and join; then one row per image: [T, ...] -> [2N or N, ...].
        text = encode_text(self.engines, tokens)
        counts = torch.tensor([p.num_images for p in batch] * (2 if cfg else 1))
        cond = Conditioning(
            hidden=text.hidden.repeat_interleave(counts.to(text.hidden.device), dim=0).to(self.device),
            pooled=text.pooled.repeat_interleave(counts.to(text.pooled.device), dim=0).to(self.device),
            cfg=cfg,
        )
        return cond, truncation_warnings(tokens, labels)

    def _initial_latents(
        self, batch: Sequence[GenerationParams], timings: Timings
    ) -> tuple[torch.Tensor, Schedule | None]:
        """Step 4, per request from its seed: noise, or the noised image (and the strength's schedule)."""
        first = batch[0]
        if first.image is None:
            seeds = [s for p in batch for s in image_seeds(p)]
            return initial_latents(seeds, self.info.dims, first.height, first.width).to(self.device), None
        mark = self._clock()
        schedule = img2img_schedule(self.scheduler, first.num_inference_steps, first.strength)
        with self.engines.use(Component.VAE_ENCODER) as vae_encoder:
            latents = image_latents(vae_encoder, batch, self.info.dims, schedule.sigmas[0], self.device)
        timings.image_encoding_s = self._clock() - mark
        return latents, schedule

    def _denoise(
        self,
        first: GenerationParams,
        cond: Conditioning,
        latents: torch.Tensor,
        schedule: Schedule | None,
        timings: Timings,
    ) -> tuple[torch.Tensor, int | None]:
        """Step 5 (through the first-block cache with a threshold): latents, steps skipped or ``None``."""
        mark = self._clock()
        timer = StepTimer(self.device)
        # the ControlNet residual input is the whole transformer engine's only (the config check
        # refuses model.controlnet with runtime.cache): the first-block cache's passes get none
        with contextlib.ExitStack() as stack:
            passes = stack.enter_context(
                transformer_passes(self.engines, first.cache_threshold, self.info.dims)
            )
            controlnets = [
                stack.enter_context(self.engines.use(Component.controlnet(c.control_type)))
                for c in first.control
            ]
            residuals = transformer_residuals(
                self.engines, passes.cfg, controlnets, first, cond, latents, self.info.dims.patch_size
            )
            latents = denoise(
                passes.cfg, latents, cond, first, self.scheduler, timer, schedule, passes.slg, residuals
            )
        timings.denoise_s = self._clock() - mark
        timings.step_s = timer.durations()
        steps = len(timings.step_s)
        timings.transformer_calls = steps + len(skip_layer_steps(steps, first.skip_layer_guidance))
        timings.transformer_skipped = passes.skipped_calls
        return latents, passes.skipped_steps if first.cache_threshold is not None else None

    def _results(
        self,
        batch: Sequence[GenerationParams],
        images: list,
        timings: Timings,
        skipped: int | None,
        warnings: dict[int, list[str]],
    ) -> list[GenerationResult]:
        """One result per request, its images carrying their PNG parameters."""
        results, offset = [], 0
        total = sum(p.num_images for p in batch)
        for i, p in enumerate(batch):
            engine_batch = EngineBatch(requests=len(batch), images=total, first_image=offset)
            mine = images[offset : offset + p.num_images]
            params = p if skipped is None else replace(p, cache_skipped_steps=skipped)
            for j, image in enumerate(mine):  # image.save("x.png") records the parameters too
                attach_parameters(image, params, self.info.digest, j, engine_batch, self.info.model)
            results.append(
                GenerationResult(
                    images=mine,
                    params=params,
                    timings=timings,
                    warnings=(*p.warnings, *warnings.get(i, [])),
                    engine_digest=self.info.digest,
                    batch=engine_batch,
                    model=self.info.model,
                )
            )
            offset += p.num_images
        return results
