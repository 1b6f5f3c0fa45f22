"""The measured steps of ``scripts/gpu_evidence.py``, each run by :func:`run` in its own process.

``gpu_evidence.py`` starts one process per step: ``python gpu_evidence_steps.py JOB.json``
(``JOB.json`` holds :class:`Job`'s fields), or a fork of itself after :func:`preload`. The step
appends one JSON line per phase to ``job.phases`` as it starts it (time since the
step started, current and peak host RSS, peak device memory since the previous line), so a
step stopped at its deadline still says how far it got, then writes its figures to
``job.result`` (atomically). An error is written there too (type, message, last traceback
lines).

Every step uses the project's own code: the stages' loader (:func:`sd35trt.models.loading.load_model`,
which draws random weights on the CPU, then moves them), calibrate's
:func:`sd35trt.stages.calibrate.calibrate_transformer` and the export stage's
:func:`sd35trt.stages.export.export_component`.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sd35trt.artifacts.files import atomic_write_json
from sd35trt.components import Component, ModelDims, spec
from sd35trt.config import Config, Precision, load_config

if TYPE_CHECKING:
    import torch

#: The calibration file the calibrate step leaves for the export step, in the model's work dir.
CALIBRATION_FILE = "amax.safetensors"
#: The export step's output directory, in the model's work dir.
ONNX_DIR = "onnx"
#: Export phases up to and including loading the weights; the export's own memory comes after.
EXPORT_LOAD_PHASES = ("started", "model", "sized", "load")


@dataclass(frozen=True)
class Job:
    """What one step process is asked to do (written as JSON by ``gpu_evidence.py``).

    Attributes:
        step: ``forward``, ``calibrate`` or ``export``.
        config: the sd35trt YAML config of the model (``model.source`` tiny or random).
        work: the model's work directory (model configs, calibration file, ONNX output).
        phases: JSON-lines file of phase marks.
        result: JSON file of the step's figures.
        device: ``cuda`` or ``cpu``.
        height, width: image size in pixels (latents are 1/8 of it).
        batch: transformer batch of the forward step (2 = one image with CFG).
        iterations, warmup: timed and untimed forward passes.
        calibrate_prompts, calibrate_steps: the calibration set and its denoising steps.
    """

    step: str
    config: str
    work: str
    phases: str
    result: str
    device: str
    height: int
    width: int
    batch: int
    iterations: int
    warmup: int
    calibrate_prompts: int
    calibrate_steps: int


def rss_bytes() -> tuple[int, int]:
    """Current and peak resident set size of this process, in bytes (Linux ``/proc``)."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024  # kB
    return fields.get("VmRSS", 0), fields.get("VmHWM", 0)


def reset_peak_rss() -> bool:
    """Restart this process's peak RSS (VmHWM) from its current RSS; False where Linux refuses.

    Linux's ``/proc/self/clear_refs`` value 5. ``wait4``'s ``ru_maxrss`` then also covers only
    the time since the last reset, so the whole process's peak is the maximum of the phases'.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


class Phases:
    """Appends a JSON line per phase to the job's phase file as the phase starts.

    A line holds ``rss_peak_bytes``, the peak RSS of the phase that ends there (the peak is
    reset at each line; with ``rss_peak_reset`` false it is the process's peak so far), and on
    CUDA ``device_peak_bytes``, the phase's peak allocated device memory. :func:`phase_peaks`
    turns the lines into a peak per phase.
    """

    def __init__(self, path: Path, device: str) -> None:
        self.path = Path(path)
        self.cuda = device.startswith("cuda")
        self.start = time.perf_counter()
        self.marks: list[dict] = []

    def __call__(self, name: str, **extra) -> None:
        rss, hwm = rss_bytes()
        mark = {"phase": name, "t_s": round(time.perf_counter() - self.start, 3), "rss_bytes": rss}
        mark["rss_peak_bytes"] = hwm
        mark["rss_peak_reset"] = reset_peak_rss()
        if self.cuda and "torch" in sys.modules:
            import torch

            if torch.cuda.is_initialized():
                # The peak of the phase that ends here; the next one starts from zero.
                mark["device_peak_bytes"] = torch.cuda.max_memory_allocated()
                torch.cuda.reset_peak_memory_stats()
        mark.update(extra)
        self.marks.append(mark)
        with open(self.path, "a") as f:
            f.write(json.dumps(mark) + "\n")


def phase_peaks(marks: list[dict], key: str, last: int | None = None) -> dict[str, int]:
    """A peak per phase (bytes) from the phase lines' ``key`` (``rss_peak_bytes``, ``device_peak_bytes``).

    Each line carries the peak of the phase before it; the last phase started gets ``last``
    (for host memory, ``wait4``'s ``ru_maxrss``, which covers the time since the last reset).
    """
    peaks = {
        before["phase"]: after[key]
        for before, after in itertools.pairwise(marks)
        if after.get(key) is not None
    }
    if marks and last is not None:
        peaks[marks[-1]["phase"]] = last
    return peaks


def model_root(config: Config, job: Job, mark: Phases) -> Path:
    """The model's diffusers directory (tiny pipeline, or a random architecture's configs).

    The first step of a model writes it (``sd35trt.models.loading.model_dir``); later ones reuse it.
    """
    from sd35trt.models.loading import model_dir

    mark("model")
    return model_dir(config, job.work)


def transformer_parameters(root: Path) -> int:
    """Parameters of the transformer ``root/transformer/config.json`` describes (built on meta: no memory)."""
    import torch
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        model = SD3Transformer2DModel.from_config(SD3Transformer2DModel.load_config(root / "transformer"))
    return sum(p.numel() for p in model.parameters())


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def environment(device: str) -> dict:
    """Versions (``sd35trt info``) and, on CUDA, the device's name, capability and memory."""
    import torch

    from sd35trt.info import collect_info

    info = collect_info()
    info["device"] = device
    info["torch"] = torch.__version__
    info["cpu_count"] = os.cpu_count()
    return info


def forward(job: Job, config: Config, mark: Phases) -> dict:
    """BF16 eager forward latency of the transformer at the job's size and batch.

    Inputs follow the transformer spec (``[B, 16, H/8, W/8]`` latents, ``[B, 77 + L, 4096]`` text,
    ``[B, 2048]`` pooled, ``[B]`` timesteps). After ``warmup`` passes, each of ``iterations`` passes
    is timed with its own pair of CUDA events (``time.perf_counter`` on a CPU); FLOP per pass are
    counted once by ``torch.utils.flop_counter`` (2 FLOP per multiply-add).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from sd35trt.models.loading import load_model
    from sd35trt.models.modules import wrap
    from sd35trt.stages.export import tracing

    root = model_root(config, job, mark)
    dims = ModelDims.from_model_dir(root)
    mark("load")
    t0 = time.perf_counter()
    raw = load_model(root, Component.TRANSFORMER, torch.bfloat16, device=job.device, model=config.model)
    module = wrap(Component.TRANSFORMER, raw)
    synchronize(job.device)
    load_s = time.perf_counter() - t0
    parameters = sum(p.numel() for p in module.parameters())
    sp = spec(Component.TRANSFORMER, dims)
    latent = (job.height // dims.vae_scale_factor, job.width // dims.vae_scale_factor)
    text = dims_text_length(config)
    shapes = {
        "hidden_states": (job.batch, dims.latent_channels, *latent),
        "encoder_hidden_states": (job.batch, text, dims.joint_attention_dim),
        "pooled_projections": (job.batch, dims.pooled_projection_dim),
        "timestep": (job.batch,),
    }
    inputs = tracing.make_inputs(sp, shapes, Precision.BF16, case=0, device=job.device)
    cuda = job.device.startswith("cuda")
    mark("warmup")
    with torch.inference_mode():
        for _ in range(job.warmup):
            module(*inputs)
        synchronize(job.device)
        mark("time")
        times_ms = []
        for _ in range(job.iterations):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = module(*inputs)
                end.record()
                end.synchronize()
                times_ms.append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                out = module(*inputs)
                times_ms.append((time.perf_counter() - t) * 1e3)
        peak = torch.cuda.max_memory_allocated() if cuda else None
        mark("flops")
        with FlopCounterMode(display=False) as counter:
            module(*inputs)
        flops = counter.get_total_flops()
    if not torch.isfinite(out.float()).all():
        raise FloatingPointError("the transformer output has NaN or inf")
    median = statistics.median(times_ms)
    return {
        "dtype": "bfloat16",
        "shapes": {k: list(v) for k, v in shapes.items()},
        "parameters": parameters,
        "weights_bytes": sum(p.numel() * p.element_size() for p in module.parameters()),
        "load_s": round(load_s, 3),
        "warmup": job.warmup,
        "timer": "cuda events" if cuda else "time.perf_counter",
        "times_ms": [round(t, 3) for t in times_ms],
        "median_ms": round(median, 3),
        "min_ms": round(min(times_ms), 3),
        "max_ms": round(max(times_ms), 3),
        "peak_device_memory_bytes": peak,
        "flop_per_pass": flops,
        "flop_per_s": round(flops / (median / 1e3)),
    }


def dims_text_length(config: Config) -> int:
    """Text tokens the transformer sees: 77 CLIP + ``runtime.max_sequence_length`` T5 (333 for SD3.5)."""
    from sd35trt.components import CLIP_MAX_LENGTH

    return CLIP_MAX_LENGTH + config.runtime.max_sequence_length


def random_batches(config: Config, dims: ModelDims, device: str, dtype: torch.dtype) -> list:
    """The calibration prompts in batches, with seeded random embeddings in place of encoded ones.

    The weights are random, so real text encoders would give random embeddings too; this keeps
    the text encoders (T5-XXL alone is 9.5 GB in BF16) out of the measurement. Shapes are the
    encoders' (``[b, 333, 4096]``, ``[b, 2048]``); the negative branch exists when CFG is on.
    """
    import torch

    from sd35trt.models.reference import PromptBatch
    from sd35trt.stages.calibrate import read_prompts

    s = config.calibrate
    prompts = read_prompts(s.prompts, s.num_prompts, "prompts")
    text = dims_text_length(config)
    batches = []
    for i, start in enumerate(range(0, len(prompts), s.batch_size)):
        chunk = tuple(prompts[start : start + s.batch_size])
        gen = torch.Generator("cpu").manual_seed(s.seed + i)

        def draw(*shape: int, gen=gen) -> torch.Tensor:
            return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)

        cfg = s.guidance_scale > 1.0
        n = len(chunk)
        batches.append(
            PromptBatch(
                prompts=chunk,
                seed=s.seed + i,
                prompt_embeds=draw(n, text, dims.joint_attention_dim),
                pooled_prompt_embeds=draw(n, dims.pooled_projection_dim),
                negative_prompt_embeds=draw(n, text, dims.joint_attention_dim) if cfg else None,
                negative_pooled_prompt_embeds=draw(n, dims.pooled_projection_dim) if cfg else None,
            )
        )
    return batches


def calibrate_config(config: Config, job: Job) -> Config:
    """``config`` with the job's calibration set size, steps and image size."""
    cal = config.calibrate.model_copy(
        update={
            "num_prompts": job.calibrate_prompts,
            "steps": job.calibrate_steps,
            "height": job.height,
            "width": job.width,
        }
    )
    return config.model_copy(update={"calibrate": cal})


def calibrate(job: Job, config: Config, mark: Phases) -> dict:
    """FP8 calibration of the transformer alone, over diffusers' denoising loop; saves the amax file."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from sd35trt.models.loading import load_model, torch_dtype
    from sd35trt.models.quantize import save_calibration
    from sd35trt.stages.calibrate import calibrate_transformer

    config = calibrate_config(config, job)
    s = config.calibrate
    root = model_root(config, job, mark)
    dims = ModelDims.from_model_dir(root)
    dtype = torch_dtype(s.dtype, job.device)
    mark("load")
    t0 = time.perf_counter()
    transformer = load_model(root, Component.TRANSFORMER, dtype, device=job.device, model=config.model)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(root, subfolder="scheduler")
    none = dict.fromkeys(
        ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
    )
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, **none)
    pipe.set_progress_bar_config(disable=True)
    batches = random_batches(config, dims, job.device, dtype)
    synchronize(job.device)
    load_s = time.perf_counter() - t0
    mark("calibrate")
    t0 = time.perf_counter()
    summary = calibrate_transformer(pipe, batches, s)
    synchronize(job.device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if job.device.startswith("cuda") else None
    mark("save")
    path = Path(job.work) / CALIBRATION_FILE
    staged = path.with_name(f".{path.name}.tmp")
    save_calibration(transformer, staged)
    os.replace(staged, path)
    cfg_on = s.guidance_scale > 1.0
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "prompts": s.num_prompts,
        "batch_size": s.batch_size,
        "steps": s.steps,
        "guidance_scale": s.guidance_scale,
        "height": s.height,
        "width": s.width,
        "transformer_passes": len(batches) * s.steps,
        "transformer_batch": [len(b.prompts) * (2 if cfg_on else 1) for b in batches],
        "load_s": round(load_s, 3),
        "seconds": round(seconds, 3),
        "peak_device_memory_bytes": peak,
        "quantizers_enabled": sum(summary.enabled.values()),
        "quantizers": summary.to_json(),
        "calibration_file": path.name,
        "calibration_file_bytes": path.stat().st_size,
    }


def export(job: Job, config: Config, mark: Phases) -> dict:
    """The export stage's transformer export (FP8 Q/DQ when ``export.quantize``) into ``work/onnx``.

    The export raises when validation fails, so a graph it returns either passed validation or
    was not validated (ONNX Runtime's CPU provider runs no BF16 graph; the reason is recorded).
    """
    import shutil

    import onnx

    from sd35trt.stages.export import export_component

    root = model_root(config, job, mark)
    parameters = transformer_parameters(root)
    # Marked before anything heavy, so a step stopped at its deadline still knows the model size.
    mark("sized", parameters=parameters, weights_bf16_bytes=2 * parameters)
    out = Path(job.work) / ONNX_DIR
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    calibration = Path(job.work) / CALIBRATION_FILE if config.export.quantize else None
    t0 = time.perf_counter()
    lines: list[str] = []
    written = export_component(
        config,
        root,
        Component.TRANSFORMER,
        out,
        calibration=calibration,
        progress=lambda line: (lines.append(line), print(line)),
        phase=mark,
        device=job.device,
    )
    seconds = time.perf_counter() - t0
    mark("done")
    peaks = phase_peaks(mark.marks, "device_peak_bytes")
    # Random weights are drawn in float32 first (a checkpoint loads straight in BF16), so the
    # load phase's peak is reported apart from the export's own.
    after_load = [v for k, v in peaks.items() if k not in EXPORT_LOAD_PHASES]
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    graphs = {p.name: onnx.load(str(p), load_external_data=False) for p in written}
    unvalidated = next(
        (line.split("not validated: ", 1)[1] for line in lines if "not validated: " in line), None
    )
    return {
        "precision": config.export.precision.transformer.value,
        "quantized": config.export.quantize,
        "opset": config.export.opset,
        "parameters": parameters,
        "weights_bf16_bytes": 2 * parameters,
        "seconds": round(seconds, 3),
        "peak_device_memory_bytes": max(after_load) if after_load else None,
        "device_peak_by_phase_bytes": peaks or None,
        "files": files,
        "onnx_bytes": sum(v for k, v in files.items() if k.endswith(".onnx")),
        "external_data_bytes": sum(v for k, v in files.items() if k.endswith(".data")),
        "qdq_pairs": {
            name: sum(n.op_type == "QuantizeLinear" for n in g.graph.node) for name, g in graphs.items()
        },
        "validation": "passed" if unvalidated is None else f"skipped: {unvalidated}",
    }


STEPS = {"forward": forward, "calibrate": calibrate, "export": export}


def preload(steps: Collection[str], quantize: bool = True) -> None:
    """Import what ``steps`` use, so that each forked step process starts at once.

    ``quantize``: whether an export step will quantize (and so needs ModelOpt).

    Nothing here touches CUDA: a process forked after CUDA is initialized cannot use it. ONNX
    Runtime is left out because importing it starts a thread of its own; OpenBLAS's threads
    (numpy) are made fork-safe by OpenBLAS itself.
    """
    import torch  # noqa: F401
    from diffusers import SD3Transformer2DModel  # noqa: F401

    import sd35trt.info
    import sd35trt.models.loading
    import sd35trt.stages.export.tracing

    if "calibrate" in steps or ("export" in steps and quantize):
        import modelopt.torch.quantization  # noqa: F401

        import sd35trt.models.quantize
    if "calibrate" in steps:
        from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline  # noqa: F401

        import sd35trt.stages.calibrate
    if "export" in steps:
        import onnx  # noqa: F401

        import sd35trt.stages.export.onnx_tools  # noqa: F401


def run(job: Job) -> int:
    """Run ``job``'s step; its figures or its error go to ``job.result``. Returns the exit code."""
    mark = Phases(Path(job.phases), job.device)
    mark("started")
    try:
        config = load_config(job.config)
        if job.device.startswith("cuda"):
            import torch

            torch.cuda.reset_peak_memory_stats()
        figures = STEPS[job.step](job, config, mark)
        atomic_write_json(job.result, {"result": figures, "environment": environment(job.device)})
        return 0
    except Exception as err:  # a measurement harness: the error is the result, the run goes on
        lines = traceback.format_exception(err)
        atomic_write_json(
            job.result,
            {
                "error": f"{type(err).__name__}: {err}".splitlines()[0][:2000],
                "traceback": "".join(lines)[-4000:],
            },
        )
        traceback.print_exception(err)
        return 1


def main(argv: list[str]) -> int:
    """``gpu_evidence_steps.py JOB.json``: run the step the job file describes."""
    if len(argv) != 1:
        raise SystemExit("usage: gpu_evidence_steps.py JOB.json (written by gpu_evidence.py)")
    job = Job(**json.loads(Path(argv[0]).read_text()))
    if job.step not in STEPS:
        raise SystemExit(f"unknown step {job.step!r}; steps are {', '.join(STEPS)}")
    return run(job)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
