"""What the bench measures, behind one small interface: engines directories and the diffusers pipeline."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd35trt.backends.engine import Engine
from sd35trt.bench.probes import MemoryProbe, StageClock
from sd35trt.bench.report import BenchParams
from sd35trt.components import Component, transformer_engine

if TYPE_CHECKING:
    from sd35trt.runtime.request import GenerationRequest


def bench_image(width: int, height: int) -> Any:
    """The initial image of image-to-image runs: a deterministic RGB gradient, ``width`` x ``height``."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(width, 1), y * 255 // max(height, 1), (x + y) % 256], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def runtime_request(params: BenchParams) -> GenerationRequest:
    """``params`` as a runtime request (with :func:`bench_image` for image-to-image)."""
    from sd35trt.parameters import PARAMS
    from sd35trt.runtime.request import GenerationRequest

    image = None if params.strength is None else bench_image(params.width, params.height)
    fields = params.model_dump(include=set(PARAMS))
    fields["skip_layer_guidance"] = params.skip_layer_guidance is not None  # the applied one, as on or off
    return GenerationRequest(image=image, **fields)


def run_diffusers(pipe, params: BenchParams, max_sequence_length: int) -> Any:
    """One generation of ``params`` with the diffusers pipeline (SLG as the engines run it)."""
    from sd35trt.models.reference import generate_images

    fields = ("negative_prompt", "num_inference_steps", "guidance_scale", "height", "width", "seed")
    return generate_images(
        pipe,
        [params.prompt] * params.num_images,
        **{name: getattr(params, name) for name in fields},
        max_sequence_length=max_sequence_length,
        skip_layer_guidance=params.skip_layer_guidance,
        output_type="np",
    )


class TimedEngine(Engine):
    """Wraps an engine so that each ``infer`` is timed as one call of ``stage``."""

    def __init__(self, inner: Engine, clock: StageClock, stage: str, memory: MemoryProbe | None = None):
        super().__init__(inner.spec)
        self.inner = inner
        self.clock = clock
        self.stage = stage
        self.memory = memory
        self._active = inner.active  # wrapped after the runtime activated it

    def _activate_impl(self) -> None:
        self.inner.activate()

    def _deactivate_impl(self) -> None:
        self.inner.deactivate()

    def _infer_impl(self, feeds):
        with self.clock.time(self.stage):
            out = self.inner.infer(feeds)
        if self.memory is not None:
            self.memory.sample()
        return out

    def __getattr__(self, name: str) -> Any:
        # Backend attributes the runtime may read (device, path, ...). Only called for misses.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


class Subject:
    """One benchmarked configuration (``kind`` ``engines`` or ``diffusers``, named ``label``, described
    by the :class:`~sd35trt.bench.report.Configuration` fields ``info``): :meth:`generate` runs once,
    timing stages on its clock."""

    label: str
    kind: str
    info: dict

    def generate(self, params: BenchParams) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Free engines and modules."""


def engines_label(manifest) -> str:
    """``sd35trt ONNX Runtime FP8``: backend and transformer precision of an engines directory."""
    from sd35trt.backends.registry import backend_of

    backend = backend_of(manifest.backend).label
    rec = manifest.record(transformer_engine(manifest.engines))
    return f"sd35trt {backend} {'FP8' if rec.fp8 else rec.precision.value.upper()}"


class RuntimeSubject(Subject):
    """An :class:`sd35trt.runtime.pipeline.Sd35Runtime`, each of its engines timed."""

    kind = "engines"

    def __init__(self, runtime, label: str, info: dict, clock: StageClock, memory: MemoryProbe) -> None:
        self.runtime = runtime
        self.clock = clock
        device = str(runtime.device)
        clock.set_device(device)
        memory.set_device(device)
        engines = runtime.engines.engines  # EngineSet.use() looks engines up here at every stage
        for component in list(engines):
            # the first-block cache's two engines are the transformer's time together
            stage = Component.TRANSFORMER.value if component.is_transformer else component.value
            engines[component] = TimedEngine(engines[component], clock, stage, memory)
        self.last = None  # the last generation's result (its transformer call counts)
        self.label = label
        # TensorRT: the one activation buffer the engines share (None for other backends).
        self.info = {
            **info,
            "device": device,
            "activation_memory_bytes": runtime.engines.shared_activation_bytes(),
        }

    @classmethod
    def from_engines(cls, engines_dir: Path, clock: StageClock, memory: MemoryProbe, device: str | None):
        """Load ``engines_dir`` (verified) and label it by backend and transformer precision."""
        from sd35trt.artifacts.engine_manifest import read_engine_manifest
        from sd35trt.runtime.pipeline import Sd35Runtime

        manifest = read_engine_manifest(engines_dir)
        runtime = Sd35Runtime.load(engines_dir, device=device)
        info = {
            "engines_dir": str(manifest.directory),
            "backend": manifest.backend.value,
            "precision": {c.value: r.precision.value for c, r in manifest.engines.items()},
            "transformer_fp8": manifest.record(transformer_engine(manifest.engines)).fp8,
        }
        return cls(runtime, engines_label(manifest), info, clock, memory)

    def generate(self, params: BenchParams) -> None:
        with self.clock.time("total"):
            self.last = result = self.runtime.generate(runtime_request(params))
        # the loop's own span (perf_counter, after a device sync on CUDA): host_loop's whole
        self.clock.record("denoise", result.timings.denoise_s)

    def close(self) -> None:
        self.runtime.close()
        self.runtime = None


class DiffusersSubject(Subject):
    """The diffusers PyTorch pipeline, its modules timed by hooks (the baseline)."""

    kind = "diffusers"

    def __init__(
        self, model_dir: Path, clock: StageClock, memory: MemoryProbe, device: str, max_sequence_length: int
    ) -> None:
        from sd35trt.models.reference import load_diffusers, pipeline_dtype, pipeline_label

        self.pipe = load_diffusers(model_dir, device)
        clock.set_device(device)
        memory.set_device(device)
        self.clock = clock
        self.memory = memory
        self.max_sequence_length = max_sequence_length
        self._handles: list[Any] = []
        self._open: dict[str, list[Any]] = {}
        modules: Mapping[str, Any] = {
            "clip_l": self.pipe.text_encoder,
            "clip_g": self.pipe.text_encoder_2,
            "t5": self.pipe.text_encoder_3,
            "transformer": self.pipe.transformer,
        }
        for stage, module in modules.items():
            self._handles.append(module.register_forward_pre_hook(self._pre(stage)))
            self._handles.append(module.register_forward_hook(self._post(stage)))
        vae = self.pipe.vae
        decode = vae.decode

        def timed_decode(*args, **kwargs):
            with clock.time("vae_decoder"):
                out = decode(*args, **kwargs)
            memory.sample()
            return out

        vae.decode = timed_decode
        self.label = pipeline_label(self.pipe)
        self.info = {"model_dir": str(model_dir), "dtype": pipeline_dtype(self.pipe), "device": device}

    def _pre(self, stage: str) -> Callable:
        def hook(module, args):
            self._open.setdefault(stage, []).append(self.clock.mark())

        return hook

    def _post(self, stage: str) -> Callable:
        def hook(module, args, output):
            self.clock.add(stage, self._open[stage].pop(), self.clock.mark())
            self.memory.sample()

        return hook

    def generate(self, params: BenchParams) -> None:
        with self.clock.time("total"):
            run_diffusers(self.pipe, params, self.max_sequence_length)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        if "decode" in self.pipe.vae.__dict__:
            del self.pipe.vae.decode
        self.pipe = None
