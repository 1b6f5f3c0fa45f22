"""``sd35trt bench``: stage latencies, throughput, peak memory and the runtime's per-step overhead.

Each configuration (an engines directory, or the diffusers PyTorch pipeline given with
``--reference``) runs ``warmup`` untimed generations, then ``runs`` timed ones with the engines'
runtime defaults (size, steps, guidance, skip-layer guidance). Stage times are taken around each
engine call (each diffusers module call for the reference): CUDA events on a GPU, ``perf_counter``
on the CPU. Per stage the median and 90th percentile over the timed runs are reported; a text
encoder's time per run is the sum of its calls (diffusers encodes the prompt and the negative
prompt in two calls, the runtime in one batch), the transformer's is per denoising step (its
time per run divided by the steps) and per call.

Runtime overhead: the host time per denoising step spent outside the transformer, measured with
the transformer replaced by an instant stand-in that returns a preallocated zero tensor, on both
sides (sd35trt: an :class:`~sd35trt.runtime.engine.Engine`; diffusers: ``pipe.transformer.forward``).
The stand-in notes when each call starts and ends and its timestep; a step runs from the first
call of one timestep to the first call of the next, so per step::

    overhead = (start of next step's first call - start of this step's first call)
               - time inside this step's calls

which counts everything the loop does per step (CFG combine, skip-layer guidance, scheduler
update, checks, callbacks, building the next inputs) and nothing outside the loop (text encoders,
VAE). The last step has no successor and is not counted. Runs of the two sides alternate so that
load from other processes falls on both alike.
"""

from __future__ import annotations

import gc
import itertools
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd35trt.components import Component
from sd35trt.errors import ConfigError
from sd35trt.manifest import atomic_write_json, now_utc
from sd35trt.runtime.engine import Engine

if TYPE_CHECKING:
    import torch

    from sd35trt.components import ComponentSpec

SCHEMA = "sd35trt.bench/1"
BENCH_JSON = "bench.json"
BENCH_PNG = "bench.png"
DEFAULT_PROMPT = "a photo of a cat sitting on a windowsill at sunset"
#: The overhead target: sd35trt's per-step host overhead at most this fraction of diffusers'.
OVERHEAD_TARGET_RATIO = 0.5

#: Reported stages, in pipeline order: ``transformer_step`` is per denoising step; ``host`` is
#: the time of a generation outside every engine (module) call: tokenizing, joining embeddings,
#: the denoising loop's own work, checks, converting the images.
STAGES = ("clip_l", "clip_g", "t5", "transformer_step", "vae_decoder", "host", "total")
STAGE_LABELS = {
    "host": "host (outside engines)",
    "clip_l": "CLIP-L",
    "clip_g": "CLIP-G",
    "t5": "T5",
    "transformer_step": "transformer / step",
    "transformer_call": "transformer / call",
    "vae_decoder": "VAE decode",
    "total": "total",
}


# --------------------------------------------------------------------------------------------
# Statistics


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between order statistics.

    The same definition as ``numpy.percentile``'s default, so p50 is the median.

    Raises:
        ValueError: ``values`` is empty or ``q`` is outside 0..100.
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in 0..100, got {q}")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


_UNIT_SCALE = {"s": 1.0, "ms": 1e3, "us": 1e6}


def summarize(seconds: Sequence[float], unit: str = "ms") -> dict[str, Any]:
    """Median, p90, mean, min and max of durations given in seconds, expressed in ``unit``.

    Returns:
        ``{"unit", "n", "median", "p90", "mean", "min", "max"}``; the statistics are ``None``
        when there are no samples.
    """
    if unit not in _UNIT_SCALE:
        raise ValueError(f"unit must be one of {sorted(_UNIT_SCALE)}, got {unit!r}")
    k = _UNIT_SCALE[unit]
    out: dict[str, Any] = {"unit": unit, "n": len(seconds)}
    if not seconds:
        return {**out, "median": None, "p90": None, "mean": None, "min": None, "max": None}
    return {
        **out,
        "median": statistics.median(seconds) * k,
        "p90": percentile(seconds, 90.0) * k,
        "mean": statistics.fmean(seconds) * k,
        "min": min(seconds) * k,
        "max": max(seconds) * k,
    }


def stage_stats(runs: Sequence[Mapping[str, Sequence[float]]], steps: int) -> dict[str, dict]:
    """Per-stage statistics over timed runs.

    Args:
        runs: per run, the durations (seconds) of every call of each stage; the keys are
            ``clip_l``, ``clip_g``, ``t5``, ``transformer``, ``vae_decoder`` and ``total``.
        steps: denoising steps per run.

    Returns:
        ``{stage: summarize(...)}`` for :data:`STAGES` plus ``transformer_call`` (every call).
        A stage's sample per run is the sum of its calls; ``transformer_step`` is the
        transformer's sum divided by ``steps``; ``host`` is ``total`` minus every engine call.
    """
    per_run: dict[str, list[float]] = {s: [] for s in STAGES}
    calls: list[float] = []
    engines = ("clip_l", "clip_g", "t5", "transformer", "vae_decoder")
    for run in runs:
        for s in ("clip_l", "clip_g", "t5", "vae_decoder", "total"):
            if run.get(s):
                per_run[s].append(sum(run[s]))
        if run.get("transformer"):
            per_run["transformer_step"].append(sum(run["transformer"]) / steps)
            calls.extend(run["transformer"])
        if run.get("total"):
            per_run["host"].append(sum(run["total"]) - sum(sum(run.get(e, ())) for e in engines))
    out = {s: summarize(per_run[s]) for s in STAGES}
    out["transformer_call"] = summarize(calls)
    return out


# --------------------------------------------------------------------------------------------
# Clocks and memory


class StageClock:
    """Collects the durations of named stages: CUDA events on a GPU, ``perf_counter`` on the CPU.

    On CUDA, a pair of events is recorded on the current stream around each stage and read only
    in :meth:`collect`, after one synchronization, so timing adds no synchronization per call.
    """

    def __init__(self, device: str = "cpu") -> None:
        self.cuda = str(device).startswith("cuda")
        self._marks: list[tuple[str, Any, Any]] = []

    def set_device(self, device: str) -> None:
        self.cuda = str(device).startswith("cuda")

    def mark(self) -> Any:
        if self.cuda:
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def add(self, stage: str, start: Any, end: Any) -> None:
        self._marks.append((stage, start, end))

    @contextmanager
    def time(self, stage: str) -> Iterator[None]:
        start = self.mark()
        try:
            yield
        finally:
            self.add(stage, start, self.mark())

    def collect(self) -> dict[str, list[float]]:
        """Durations in seconds per stage since the last collect (synchronizes on CUDA)."""
        if self.cuda and self._marks:
            import torch

            torch.cuda.synchronize()
        out: dict[str, list[float]] = {}
        for stage, start, end in self._marks:
            seconds = start.elapsed_time(end) / 1e3 if self.cuda else end - start
            out.setdefault(stage, []).append(seconds)
        self._marks = []
        return out


def _rss_status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(v) * 1024 for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.M)}


class MemoryProbe:
    """Peak memory over a window: peak RSS on the CPU, device memory on CUDA.

    CPU: Linux's ``VmHWM`` reset through ``/proc/self/clear_refs`` at :meth:`reset`; where that
    is not allowed, ``ru_maxrss`` (the process's peak since it started) is reported and said so.
    CUDA: the peak of device memory in use (``total - free``, sampled after every engine call,
    other processes on the GPU included) and the torch allocator's peak (TensorRT allocates its
    own memory, which only the former sees).
    """

    def __init__(self, device: str = "cpu") -> None:
        self.set_device(device)
        self._method = ""
        self._baseline = 0
        self._device_used_peak = 0

    def set_device(self, device: str) -> None:
        self.cuda = str(device).startswith("cuda")
        self.device = device

    def reset(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._baseline = self._device_used()
            self._device_used_peak = self._baseline
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._method = "VmHWM of this process, reset before the timed runs"
        except OSError:
            self._method = "ru_maxrss: peak RSS since the process started (VmHWM reset not permitted)"
        try:
            self._baseline = _rss_status().get("VmRSS", 0)
        except OSError:
            self._baseline = 0

    def _device_used(self) -> int:
        import torch

        free, total = torch.cuda.mem_get_info(self.device)
        return int(total - free)

    def sample(self) -> None:
        if self.cuda:
            self._device_used_peak = max(self._device_used_peak, self._device_used())

    def read(self) -> dict[str, Any]:
        if self.cuda:
            import torch

            self.sample()
            return {
                "kind": "cuda",
                "peak_device_used_bytes": self._device_used_peak,
                "baseline_device_used_bytes": self._baseline,
                "peak_torch_allocated_bytes": int(torch.cuda.max_memory_allocated(self.device)),
                "method": "device memory in use (total - free) sampled after each engine call",
            }
        peak = 0
        with suppress(OSError):
            peak = _rss_status().get("VmHWM", 0)
        if not peak or self._method.startswith("ru_maxrss"):
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {
            "kind": "peak_rss",
            "peak_rss_bytes": int(peak),
            "baseline_rss_bytes": int(self._baseline),
            "method": self._method,
        }


def peak_memory_bytes(memory: Mapping[str, Any]) -> int:
    """The headline peak of a :meth:`MemoryProbe.read` result."""
    return int(memory.get("peak_rss_bytes") or memory.get("peak_device_used_bytes") or 0)


# --------------------------------------------------------------------------------------------
# Engine wrappers


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
        start = self.clock.mark()
        out = self.inner.infer(feeds)
        self.clock.add(self.stage, start, self.clock.mark())
        if self.memory is not None:
            self.memory.sample()
        return out

    def __getattr__(self, name: str) -> Any:
        # Backend attributes the runtime may read (device, path, ...). Only called for misses.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


@dataclass
class CallLog:
    """When each stand-in transformer call started and ended (``perf_counter_ns``) and its timestep."""

    calls: list[tuple[int, int, float]] = field(default_factory=list)

    def record(self, start_ns: int, end_ns: int, timestep: float) -> None:
        self.calls.append((start_ns, end_ns, timestep))

    def clear(self) -> None:
        self.calls = []


def step_overheads(calls: Sequence[tuple[int, int, float]]) -> list[float]:
    """Host seconds per denoising step spent outside the transformer (see the module docstring).

    Consecutive calls with the same timestep form one step (the CFG batch, then the skip-layer
    guidance pass); the last step has no successor and yields no sample.

    Args:
        calls: ``(start_ns, end_ns, timestep)`` per transformer call, in call order.

    Returns:
        One value per step but the last, in seconds.
    """
    steps: list[tuple[int, int]] = []  # (first call's start, ns inside the step's calls)
    last_key: float | None = None
    for start, end, key in calls:
        if steps and key == last_key:
            first, inside = steps[-1]
            steps[-1] = (first, inside + end - start)
        else:
            steps.append((start, end - start))
        last_key = key
    return [(nxt[0] - cur[0] - cur[1]) / 1e9 for cur, nxt in itertools.pairwise(steps)]


def _timestep_key(t: torch.Tensor) -> float:
    return float(t.reshape(-1)[0])


class InstantTransformer(Engine):
    """A transformer engine that returns a preallocated zero ``noise_pred`` at once.

    One zero tensor per input shape, allocated at its first call (the warm-up), then returned as
    is: the runtime must not write into engine outputs, and none of sd35trt's does.
    """

    def __init__(self, spec: ComponentSpec, log: CallLog) -> None:
        super().__init__(spec)
        self.log = log
        self._outputs: dict[tuple, torch.Tensor] = {}
        self._output_name = spec.output_names[0]

    def _activate_impl(self) -> None:
        pass

    def _deactivate_impl(self) -> None:
        self._outputs = {}

    def _infer_impl(self, feeds):
        start = time.perf_counter_ns()
        x = feeds["hidden_states"]  # [B, C, h, w]
        key = (tuple(x.shape), x.dtype, x.device)
        out = self._outputs.get(key)
        if out is None:
            import torch

            out = self._outputs[key] = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
        self.log.record(start, time.perf_counter_ns(), _timestep_key(feeds["timestep"]))
        return {self._output_name: out}


@contextmanager
def instant_diffusers_transformer(pipe, log: CallLog) -> Iterator[None]:
    """Replace ``pipe.transformer.forward`` by an instant stand-in for the duration of the block."""
    outputs: dict[tuple, Any] = {}

    def forward(hidden_states, timestep=None, *args, **kwargs):
        start = time.perf_counter_ns()
        key = (tuple(hidden_states.shape), hidden_states.dtype, hidden_states.device)
        out = outputs.get(key)
        if out is None:
            import torch

            out = outputs[key] = (torch.zeros_like(hidden_states),)
        log.record(start, time.perf_counter_ns(), _timestep_key(timestep))
        return out

    module = pipe.transformer
    module.forward = forward
    try:
        yield
    finally:
        del module.forward  # the class's forward again


# --------------------------------------------------------------------------------------------
# Configurations: what is benchmarked, behind one small interface


@dataclass
class RunParams:
    """What every configuration generates: the first engines directory's runtime defaults."""

    prompt: str
    negative_prompt: str
    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int
    num_images: int
    seed: int
    skip_layer_guidance: dict | None

    def to_json(self) -> dict:
        return dict(self.__dict__)

    def request(self):
        """The same generation as a runtime request."""
        from sd35trt.runtime.request import GenerationRequest

        return GenerationRequest(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            height=self.height,
            width=self.width,
            seed=self.seed,
            num_images=self.num_images,
            skip_layer_guidance=self.skip_layer_guidance is not None,
        )


class Subject:
    """One benchmarked configuration: :meth:`generate` runs once, timing stages on ``clock``."""

    label: str
    kind: str
    info: dict

    def generate(self, params: RunParams) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Free engines and modules."""


def _precision_label(manifest) -> str:
    rec = manifest.record(Component.TRANSFORMER)
    return "FP8" if rec.fp8 else rec.precision.value.upper()


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
            engines[component] = TimedEngine(engines[component], clock, component.value, memory)
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
        from sd35trt.runtime.engines import read_engine_manifest
        from sd35trt.runtime.pipeline import Sd35Runtime

        manifest = read_engine_manifest(engines_dir)
        runtime = Sd35Runtime.load(engines_dir, device=device)
        return cls(runtime, engines_label(manifest), engines_info(manifest), clock, memory)

    def generate(self, params: RunParams) -> None:
        with self.clock.time("total"):
            self.runtime.generate(params.request())

    def close(self) -> None:
        self.runtime.close()
        self.runtime = None


def engines_label(manifest) -> str:
    """``sd35trt ONNX Runtime FP8``: backend and transformer precision of an engines directory."""
    from sd35trt.runtime.backends import backend_of

    backend = backend_of(manifest.backend).label
    return f"sd35trt {backend} {_precision_label(manifest)}"


def engines_info(manifest) -> dict:
    return {
        "engines_dir": str(manifest.directory),
        "backend": manifest.backend.value,
        "precision": {c.value: r.precision.value for c, r in manifest.engines.items()},
        "transformer_fp8": manifest.record(Component.TRANSFORMER).fp8,
    }


def dtype_label(dtype: str) -> str:
    """``float32`` -> ``FP32``, ``bfloat16`` -> ``BF16``, ``float16`` -> ``FP16``."""
    return {"float32": "FP32", "bfloat16": "BF16", "float16": "FP16"}.get(dtype, dtype)


def check_reference_dir(model_dir: str | Path) -> Path:
    """Refuse a ``--reference`` that is not a diffusers pipeline directory (before any work is done).

    Raises:
        ModelError: naming the directory and what is missing.
    """
    from sd35trt.errors import ModelError

    root = Path(model_dir)
    if not (root / "model_index.json").is_file():
        raise ModelError(
            f"--reference {root} is not a diffusers pipeline directory (no model_index.json); "
            "for the tiny model it is runs/<name>/model"
        )
    return root


def load_diffusers(model_dir: str | Path, device: str, dtype: torch.dtype | None = None):
    """The diffusers pipeline in ``model_dir`` (safetensors only), progress bars off.

    ``dtype`` defaults to what calibration loads (BF16 on CUDA, FP32 on the CPU).

    Raises:
        ModelError: pickle weights, a truncated shard, or not an SD3 directory.
    """
    from diffusers import StableDiffusion3Pipeline

    from sd35trt.config import LoadDtype
    from sd35trt.errors import ModelError
    from sd35trt.model import check_weights, torch_dtype

    root = check_reference_dir(model_dir)
    check_weights(root)
    dtype = dtype or torch_dtype(LoadDtype.AUTO, device)
    try:
        pipe = StableDiffusion3Pipeline.from_pretrained(root, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load the diffusers pipeline in {root}: {err}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def diffusers_kwargs(params: RunParams) -> dict:
    """``StableDiffusion3Pipeline.__call__`` arguments for ``params`` (SLG as the engines run it)."""
    import torch

    kwargs: dict[str, Any] = {}
    slg = params.skip_layer_guidance
    if slg is not None:
        kwargs = {
            "skip_guidance_layers": list(slg["layers"]),
            "skip_layer_guidance_scale": slg["scale"],
            "skip_layer_guidance_start": slg["start"],
            "skip_layer_guidance_stop": slg["stop"],
        }
    return {
        "prompt": [params.prompt] * params.num_images,
        "negative_prompt": [params.negative_prompt] * params.num_images,
        "num_inference_steps": params.num_inference_steps,
        "guidance_scale": params.guidance_scale,
        "height": params.height,
        "width": params.width,
        "generator": torch.Generator("cpu").manual_seed(params.seed),
        "output_type": "np",
        **kwargs,
    }


class DiffusersSubject(Subject):
    """The diffusers PyTorch pipeline, its modules timed by hooks (the baseline)."""

    kind = "diffusers"

    def __init__(
        self, model_dir: Path, clock: StageClock, memory: MemoryProbe, device: str, max_sequence_length: int
    ) -> None:
        self.pipe = load_diffusers(model_dir, device)
        clock.set_device(device)
        memory.set_device(device)
        self.clock = clock
        self.memory = memory
        self.max_sequence_length = max_sequence_length
        self._handles: list[Any] = []
        self._open: dict[str, list[Any]] = {}
        modules = {
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
            start = clock.mark()
            out = decode(*args, **kwargs)
            clock.add("vae_decoder", start, clock.mark())
            memory.sample()
            return out

        vae.decode = timed_decode
        dtype = str(self.pipe.transformer.dtype).removeprefix("torch.")
        self.label = f"diffusers PyTorch {dtype_label(dtype)}"
        self.info = {"model_dir": str(model_dir), "dtype": dtype, "device": device}

    def _pre(self, stage: str) -> Callable:
        def hook(module, args):
            self._open.setdefault(stage, []).append(self.clock.mark())

        return hook

    def _post(self, stage: str) -> Callable:
        def hook(module, args, output):
            self.clock.add(stage, self._open[stage].pop(), self.clock.mark())
            self.memory.sample()

        return hook

    def generate(self, params: RunParams) -> None:
        import torch

        with torch.inference_mode(), self.clock.time("total"):
            self.pipe(max_sequence_length=self.max_sequence_length, **diffusers_kwargs(params))

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        if "decode" in self.pipe.vae.__dict__:
            del self.pipe.vae.decode
        self.pipe = None


# --------------------------------------------------------------------------------------------
# The benchmark


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_params(engines_dir: Path, prompt: str, num_images: int, seed: int) -> tuple[RunParams, int]:
    """The runtime defaults recorded with ``engines_dir`` as :class:`RunParams`, and T5's length."""
    from sd35trt.config import RuntimeSettings
    from sd35trt.guidance import applied_skip_layer_guidance
    from sd35trt.runtime.engines import read_engine_manifest

    manifest = read_engine_manifest(engines_dir)
    rt = RuntimeSettings.model_validate(manifest.runtime_defaults)
    slg = applied_skip_layer_guidance(rt.skip_layer_guidance, rt.guidance_scale)
    params = RunParams(
        prompt=prompt,
        negative_prompt=rt.negative_prompt,
        num_inference_steps=rt.num_inference_steps,
        guidance_scale=rt.guidance_scale,
        height=rt.height,
        width=rt.width,
        num_images=num_images,
        seed=seed,
        skip_layer_guidance=slg.model_dump(mode="json") if slg is not None else None,
    )
    return params, rt.max_sequence_length


def _measure(
    subject: Subject, params: RunParams, clock: StageClock, memory: MemoryProbe, runs: int, warmup: int
):
    load_before = _load_average()
    for _ in range(warmup):
        subject.generate(params)
    clock.collect()
    memory.reset()
    timed = []
    for _ in range(runs):
        subject.generate(params)
        timed.append(clock.collect())
    mem = memory.read()
    stages = stage_stats(timed, params.num_inference_steps)
    total = stages["total"]["median"]
    return {
        "label": subject.label,
        "kind": subject.kind,
        **subject.info,
        "stages": stages,
        "images_per_second": params.num_images / (total / 1e3) if total else None,
        "memory": mem,
        # Other processes' load (1-minute average) before and after: timings are noisy when high.
        "load_average_1m": [load_before, _load_average()],
    }


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def measure_overhead(runtime, pipe, params: RunParams, max_sequence_length: int, runs: int) -> dict:
    """Per-step host overhead of sd35trt and of diffusers with instant transformers (see module doc).

    Args:
        runtime: an ``Sd35Runtime``; its transformer engine is replaced by
            :class:`InstantTransformer` (and deactivated), so the runtime is for this use only.
        pipe: a diffusers ``StableDiffusion3Pipeline`` on the same device, or ``None`` to measure
            sd35trt only; its ``transformer.forward`` is swapped for the duration.
        params: generation parameters, the same on both sides.
        max_sequence_length: T5 tokens, as the engines were built.
        runs: timed generations per side, after one warm-up each.

    Returns:
        The ``overhead`` section of ``bench.json`` (per-step statistics in microseconds).
    """
    import torch

    ours_log, theirs_log = CallLog(), CallLog()
    engines = runtime.engines.engines
    real = engines[Component.TRANSFORMER]
    engines[Component.TRANSFORMER] = InstantTransformer(real.spec, ours_log)
    if real.active:
        real.deactivate()  # its memory is not needed while the stand-in runs
    request = params.request()
    samples: dict[str, list[float]] = {"sd35trt": [], "diffusers": []}
    ctx = instant_diffusers_transformer(pipe, theirs_log) if pipe is not None else _null()
    with ctx:
        for i in range(runs + 1):  # run 0 of each side warms up (allocations, caches)
            ours_log.clear()
            runtime.generate(request)
            if i:
                samples["sd35trt"].extend(step_overheads(ours_log.calls))
            if pipe is not None:
                theirs_log.clear()
                with torch.inference_mode():
                    pipe(max_sequence_length=max_sequence_length, **diffusers_kwargs(params))
                if i:
                    samples["diffusers"].extend(step_overheads(theirs_log.calls))

    ours_stats = summarize(samples["sd35trt"], "us")
    theirs_stats = summarize(samples["diffusers"], "us") if pipe is not None else None
    ratio = None
    if theirs_stats is not None and theirs_stats["median"]:
        ratio = ours_stats["median"] / theirs_stats["median"]
    return {
        "method": (
            "host time per denoising step outside the transformer call, with the transformer replaced by an "
            "instant stand-in returning a preallocated zero tensor on both sides; a step runs from the first "
            "transformer call of one timestep to the first call of the next, minus the time inside the "
            "calls; runs of the two sides alternate; the first run of each is a warm-up"
        ),
        "device": str(runtime.device),
        "num_inference_steps": params.num_inference_steps,
        "height": params.height,
        "width": params.width,
        "guidance_scale": params.guidance_scale,
        "skip_layer_guidance": params.skip_layer_guidance,
        "runs": runs,
        "sd35trt": {"per_step": ours_stats},
        "diffusers": None if theirs_stats is None else {"per_step": theirs_stats, "progress_bar": "disabled"},
        "ratio": ratio,
        "target_ratio": OVERHEAD_TARGET_RATIO,
        "meets_target": (ratio <= OVERHEAD_TARGET_RATIO) if ratio is not None else None,
        "note": None if pipe is not None else "no --reference: the diffusers side was not measured",
    }


@contextmanager
def _null() -> Iterator[None]:
    yield


def host_info(device: str) -> dict:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "timer": "CUDA events" if device.startswith("cuda") else "time.perf_counter",
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    info["load_average_1m"] = _load_average()
    return info


def bench(
    engines_dirs: Sequence[str | Path],
    reference_dir: str | Path | None,
    runs: int = 3,
    warmup: int = 1,
    out_dir: str | Path | None = None,
    *,
    overhead_runs: int = 5,
    prompt: str = DEFAULT_PROMPT,
    num_images: int = 1,
    seed: int = 0,
    device: str | None = None,
    plot: bool = True,
) -> dict:
    """Benchmark engines directories (and the diffusers pipeline) and measure the runtime overhead.

    Every configuration generates with the first engines directory's runtime defaults. Writes
    ``bench.json`` and ``bench.png`` (stages side by side, images/s, peak memory, overhead) to
    ``out_dir``.

    Args:
        engines_dirs: one or more ``engines/`` directories (e.g. FP8 and BF16 builds).
        reference_dir: a diffusers directory: benchmarked as the PyTorch baseline and used for the
            overhead comparison; ``None`` skips both.
        runs: timed generations per configuration.
        warmup: untimed generations before them.
        out_dir: where to write; default ``<first engines dir>/../bench``.
        overhead_runs: timed generations per side of the overhead measurement (0 skips it).
        prompt: the prompt of every generation.
        num_images: images per generation.
        seed: noise seed.
        device: ``cpu`` or ``cuda[:N]`` for the engines (default: the runtime's, CUDA for TensorRT
            engines, CPU for ONNX Runtime ones); the diffusers pipeline runs there too (default:
            CUDA when present).
        plot: also write ``bench.png``.

    Returns:
        The ``bench.json`` content.

    Raises:
        ConfigError: no engines directory, or runs < 1 / warmup < 0.
        ManifestError, VerificationError, IncompatibleEngineError: an engines directory is unusable.
        ModelError: the reference directory is unusable.
    """
    if not engines_dirs:
        raise ConfigError("bench needs at least one --engines directory")
    if runs < 1 or warmup < 0 or overhead_runs < 0:
        raise ConfigError(f"bench needs --runs >= 1, --warmup >= 0 (got runs {runs}, warmup {warmup})")
    if num_images < 1:
        raise ConfigError(f"num_images must be >= 1, got {num_images}")
    engines_dirs = [Path(d) for d in engines_dirs]
    reference_dir = check_reference_dir(reference_dir) if reference_dir is not None else None
    out = Path(out_dir) if out_dir is not None else engines_dirs[0].parent / "bench"
    params, max_len = run_params(engines_dirs[0], prompt, num_images, seed)

    configurations = []
    subjects: list[Callable[[StageClock, MemoryProbe], Subject]] = [
        (lambda c, m, d=d: RuntimeSubject.from_engines(d, c, m, device)) for d in engines_dirs
    ]
    if reference_dir is not None:
        ref_device = device or default_device()
        subjects.append(lambda c, m: DiffusersSubject(reference_dir, c, m, ref_device, max_len))
    for make in subjects:
        clock, memory = StageClock(), MemoryProbe()
        subject = make(clock, memory)
        try:
            configurations.append(_measure(subject, params, clock, memory, runs, warmup))
        finally:
            subject.close()
            del subject
            gc.collect()
    _dedupe_labels(configurations)

    overhead = None
    if overhead_runs:
        from sd35trt.runtime.pipeline import Sd35Runtime

        runtime = Sd35Runtime.load(engines_dirs[0], device=device)
        pipe = load_diffusers(reference_dir, str(runtime.device)) if reference_dir is not None else None
        try:
            overhead = measure_overhead(runtime, pipe, params, max_len, overhead_runs)
            overhead["sd35trt"]["engines_dir"] = str(engines_dirs[0])
            if pipe is not None:
                overhead["diffusers"]["model_dir"] = str(reference_dir)
        finally:
            runtime.close()
            del pipe
            gc.collect()

    main_device = configurations[0]["device"]
    result = {
        "schema": SCHEMA,
        "created": now_utc(),
        "host": host_info(main_device),
        "runs": runs,
        "warmup": warmup,
        "params": params.to_json(),
        "configurations": configurations,
        "overhead": overhead,
    }
    result["files"] = {"json": str(out / BENCH_JSON), "png": str(out / BENCH_PNG) if plot else None}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / BENCH_JSON, result)
    if plot:
        from sd35trt.plots import plot_bench

        plot_bench(result, out / BENCH_PNG)
    return result


def _dedupe_labels(configurations: list[dict]) -> None:
    """Make labels unique: add the run directory's name, then a number where that is not enough."""

    def counts() -> dict[str, int]:
        seen: dict[str, int] = {}
        for c in configurations:
            seen[c["label"]] = seen.get(c["label"], 0) + 1
        return seen

    seen = counts()
    for c in configurations:
        if seen[c["label"]] > 1 and "engines_dir" in c:
            c["label"] = f"{c['label']} ({Path(c['engines_dir']).parent.name})"
    seen = counts()
    number: dict[str, int] = {}
    for c in configurations:
        if seen[c["label"]] > 1:
            number[c["label"]] = number.get(c["label"], 0) + 1
            c["label"] = f"{c['label']} #{number[c['label']]}"


# --------------------------------------------------------------------------------------------
# Output


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_bench(result: Mapping) -> str:
    """``bench.json`` as a readable table (medians and p90 in ms, images/s, peak memory, overhead)."""
    rows = [("configuration", *[STAGE_LABELS[s] for s in STAGES], "img/s", "peak MiB")]
    for c in result["configurations"]:
        cells = [c["label"]]
        for s in STAGES:
            st = c["stages"][s]
            cells.append(f"{_fmt(st['median'])} / {_fmt(st['p90'])}")
        cells.append(_fmt(c["images_per_second"]))
        cells.append(f"{peak_memory_bytes(c['memory']) / 2**20:.0f}")
        rows.append(tuple(cells))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        f"device {result['host']['device']} ({result['host']['timer']}), {result['runs']} timed runs after "
        f"{result['warmup']} warm-up; stage times: median / p90 in ms",
        *["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in rows],
    ]
    o = result.get("overhead")
    if o:
        ours = o["sd35trt"]["per_step"]
        line = f"runtime overhead per step: sd35trt {_fmt(ours['median'], 1)} us (p90 {_fmt(ours['p90'], 1)})"
        if o.get("diffusers"):
            theirs = o["diffusers"]["per_step"]
            verdict = "meets" if o["meets_target"] else "misses"
            line += (
                f", diffusers {_fmt(theirs['median'], 1)} us (p90 {_fmt(theirs['p90'], 1)}); "
                f"ratio {_fmt(o['ratio'], 3)} ({verdict} the target <= {o['target_ratio']})"
            )
        lines.append(line)
    return "\n".join(lines)
