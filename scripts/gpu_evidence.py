"""Full-size evidence on a CUDA GPU: SD3.5-shaped transformer work, measured in one bounded run.

With random weights in the published shapes (``configs/sd3.5-large-random.yaml``, then
``configs/sd3.5-medium-random.yaml`` while time is left), three steps per model, each in its
own process (``scripts/gpu_evidence_steps.py``) so that it can be stopped at its deadline, its
peak host memory is its own (``wait4``'s ``ru_maxrss``), and a crash or an out-of-memory error
does not stop the next step. On a GPU each step is a fresh interpreter (``--launch spawn``: CUDA
cannot be used in a process forked after anything initialized it, and an import may); on a CPU
the steps are forked from this process after it has imported torch, diffusers and ModelOpt
once (``--launch fork``), which saves their import time (5-10 s a step):

1. ``forward``: the BF16 transformer, PyTorch eager, at 1024x1024 and transformer batch 2 (one
   image with CFG): median of 10 passes after 3 warm-up passes, each timed with CUDA events;
   peak device memory; FLOP per pass (``torch.utils.flop_counter``).
2. ``calibrate``: calibrate's FP8 calibration (ModelOpt max calibration over diffusers' denoising
   loop) on the transformer alone, 2 prompts x 4 steps at 1024x1024: wall time, peak device
   memory, quantizer count. Its amax file feeds step 3.
3. ``export``: the export stage's FP8 ONNX export of the transformer (all blocks): wall time,
   peak host RSS as a multiple of the BF16 weight bytes (after the load phase too: random weights
   are drawn in float32 on the CPU first), ``.onnx`` and external-data sizes. At its deadline
   the process is killed and the step reports the phase it had reached and the files written
   so far. Host and device peaks are kept per phase.

Bounds: the whole run stops starting steps at ``--deadline-s`` (a step never runs past it);
each step is also capped at ``--step-deadline-s``, the export at ``--export-deadline-s``. After
every step the JSON (``gpu_evidence.json`` in ``--out``: ``$OUT`` when set, else
``runs/gpu-evidence/``) is rewritten atomically, so a run cut short keeps what it measured; the
steps' output goes to ``gpu_evidence.log`` beside it, and the table is printed at the end. Large
files (the ONNX export) go to ``--work-dir``, each model's removed after its export unless
``--keep-work``.

    scripts/gpu_evidence.sh                       # installs carried wheels (.whl/), then this
    python scripts/gpu_evidence.py --deadline-s 540
    python scripts/gpu_evidence.py --configs configs/sd3.5-large-random.yaml --steps forward
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path

import gpu_evidence_steps as steps

from sd35trt.artifacts.files import atomic_write_json
from sd35trt.config import SIZE_MULTIPLE, Config, load_config
from sd35trt.errors import Sd35TrtError

REPO = Path(__file__).resolve().parents[1]
STEP_SCRIPT = Path(steps.__file__).resolve()
RESULT_FILE = "gpu_evidence.json"
LOG_FILE = "gpu_evidence.log"
SCHEMA = "sd35trt-gpu-evidence/1"
DEFAULT_CONFIGS = ("configs/sd3.5-large-random.yaml", "configs/sd3.5-medium-random.yaml")
#: How often the parent checks a step process (s): the precision of the deadline.
POLL_S = 0.05

#: Published figures to read ours against (H100, SD3.5 Large, 1024x1024, CFG). Per MMDiT step
#: at batch 2: TensorRT FP8 about 187 ms, TensorRT BF16 about 265 ms (30-step runs). Stability
#: AI, "Stable Diffusion 3.5 Models Optimized with TensorRT Deliver 2X Faster Performance and 40%
#: Less Memory on NVIDIA RTX GPUs" (2025): 2.3x end to end over BF16 PyTorch.
#: microsoft/onnxruntime PR #22986 (H100 80GB, batch 1, 50 steps): SD3.5 Large in PyTorch 2.5.1
#: eager BF16 11.6 s end to end, i.e. at most 232 ms per step with CFG.
PUBLISHED_H100 = {
    "tensorrt_fp8_ms_per_step": 187.0,
    "tensorrt_bf16_ms_per_step": 265.0,
    "pytorch_eager_bf16_ms_per_step_at_most": 232.0,
    "claimed_speedup_tensorrt_fp8_over_pytorch_bf16": 2.3,
}


class Step(str, Enum):
    FORWARD = "forward"
    CALIBRATE = "calibrate"
    EXPORT = "export"


class Launch(str, Enum):
    """How a step's process starts (see the module docstring)."""

    AUTO = "auto"  # spawn on CUDA, fork on a CPU
    SPAWN = "spawn"
    FORK = "fork"


class Status(str, Enum):
    OK = "ok"
    ERROR = "error"
    DEADLINE = "deadline"  # stopped at its deadline; ``phase`` says how far it got
    SKIPPED = "skipped"


@dataclass
class StepRecord:
    """One step of one model, as the JSON keeps it (times in s, sizes in bytes)."""

    model: str
    step: Step
    status: Status
    deadline_s: float | None = None
    wall_s: float | None = None  # process start to exit, interpreter start and imports included
    phase: str | None = None  # the last phase the step started
    phases: list[dict] = field(default_factory=list)
    peak_host_rss_bytes: int | None = None  # the step process's peak RSS
    host_peak_by_phase_bytes: dict[str, int] = field(default_factory=dict)
    exit_code: int | None = None
    result: dict | None = None
    error: str | None = None
    reason: str | None = None  # why a step was skipped

    def to_json(self) -> dict:
        data = asdict(self)
        data["step"], data["status"] = self.step.value, self.status.value
        return data


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), help="model configs, in order")
    p.add_argument("--steps", nargs="+", choices=[s.value for s in Step], default=[s.value for s in Step])
    p.add_argument("--deadline-s", type=float, default=540.0, help="the whole run (s)")
    p.add_argument("--step-deadline-s", type=float, default=300.0, help="any one step (s)")
    p.add_argument("--export-deadline-s", type=float, help="the export step (s; default --step-deadline-s)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument(
        "--launch",
        type=Launch,
        choices=[m.value for m in Launch],
        default=Launch.AUTO,
        help="step processes: fresh interpreters, or forks after one import (auto: spawn on CUDA)",
    )
    p.add_argument("--height", type=int, default=1024, help="image height (pixels)")
    p.add_argument("--width", type=int, default=1024, help="image width (pixels)")
    p.add_argument("--batch", type=int, default=2, help="transformer batch of the forward step (2 = CFG)")
    p.add_argument("--iterations", type=int, default=10, help="timed forward passes")
    p.add_argument("--warmup", type=int, default=3, help="untimed forward passes first")
    p.add_argument("--calibrate-prompts", type=int, default=2)
    p.add_argument("--calibrate-steps", type=int, default=4)
    default_out = Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "runs" / "gpu-evidence"
    p.add_argument(
        "--out", type=Path, default=default_out, help="JSON and log ($OUT, else runs/gpu-evidence)"
    )
    p.add_argument("--work-dir", type=Path, default=REPO / "runs" / "gpu-evidence-work", help="large files")
    p.add_argument("--keep-work", action="store_true", help="keep the work directory (ONNX files)")
    args = p.parse_args(argv)
    if args.export_deadline_s is None:
        args.export_deadline_s = args.step_deadline_s
    for name in ("deadline_s", "step_deadline_s", "export_deadline_s"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in ("height", "width"):
        if getattr(args, name) % SIZE_MULTIPLE or getattr(args, name) <= 0:
            p.error(f"--{name} must be a positive multiple of {SIZE_MULTIPLE}, got {getattr(args, name)}")
    for name in ("batch", "iterations", "calibrate_prompts", "calibrate_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    return args


def cuda_available() -> bool:
    """Whether torch sees a GPU, asked in a throwaway process so this one never holds CUDA."""
    probe = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


def read_phases(path: Path) -> list[dict]:
    """The phase marks a step process wrote (a line cut short by a kill is dropped)."""
    if not path.is_file():
        return []
    marks = []
    for line in path.read_text().splitlines():
        try:
            marks.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return marks


def fork_step(job: steps.Job, log) -> int:
    """Fork a process that runs ``job`` with its output in ``log``; returns its pid."""
    sys.stdout.flush()
    sys.stderr.flush()
    log.flush()
    with warnings.catch_warnings():
        # Python 3.12 warns on fork in a process with threads; the only ones here are OpenBLAS's,
        # which OpenBLAS re-creates after a fork.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid:
        return pid
    code = 70
    try:
        os.setsid()  # its own process group: the kill reaches anything it starts
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        code = steps.run(job)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def spawn_step(job: steps.Job, log) -> int:
    """Start ``python gpu_evidence_steps.py JOB`` with its output in ``log``; returns its pid."""
    job_file = Path(job.work) / f"{job.step}.job.json"
    job_file.write_text(json.dumps(asdict(job)))
    log.flush()
    proc = subprocess.Popen(
        [sys.executable, str(STEP_SCRIPT), str(job_file)],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the kill reaches anything it starts
    )
    return proc.pid  # reaped below with wait4, for its rusage


def run_step(job: steps.Job, deadline_s: float, log, launch: Launch) -> tuple[int | None, bool, float, int]:
    """Run one step in its own process; kill its process group at ``deadline_s``.

    Returns:
        (exit code, or None when killed; whether it was killed at the deadline; wall seconds;
        peak RSS in bytes from ``wait4``; a forked step's includes the imports it shares with
        this process).
    """
    start = time.monotonic()
    pid = fork_step(job, log) if launch is Launch.FORK else spawn_step(job, log)
    killed = False
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() - start >= deadline_s:
            os.killpg(pid, signal.SIGKILL)
            _, status, usage = os.wait4(pid, 0)
            killed = True
            break
        time.sleep(POLL_S)
    wall = time.monotonic() - start
    code = os.waitstatus_to_exitcode(status)
    return (None if killed else code), killed, wall, usage.ru_maxrss * 1024  # KiB on Linux


def files_below(path: Path) -> dict[str, int]:
    """Sizes of the files below ``path`` (what a stopped export had written)."""
    if not path.is_dir():
        return {}
    return {p.relative_to(path).as_posix(): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}


def measure(
    args: argparse.Namespace, config_path: str, config: Config, step: Step, deadline_s: float, log
) -> StepRecord:
    """Run ``step`` for one model and turn its process's traces into a record."""
    work = args.work_dir / config.name
    work.mkdir(parents=True, exist_ok=True)
    job = steps.Job(
        step=step.value,
        config=config_path,
        work=str(work),
        phases=str(work / f"{step.value}.phases.jsonl"),
        result=str(work / f"{step.value}.result.json"),
        device=args.device,
        height=args.height,
        width=args.width,
        batch=args.batch,
        iterations=args.iterations,
        warmup=args.warmup,
        calibrate_prompts=args.calibrate_prompts,
        calibrate_steps=args.calibrate_steps,
    )
    for path in (job.phases, job.result):
        Path(path).unlink(missing_ok=True)
    log.write(f"\n==== {config.name} {step.value} (deadline {deadline_s:.1f} s) ====\n")
    log.flush()
    code, killed, wall, rss = run_step(job, deadline_s, log, args.launch)
    phases = read_phases(Path(job.phases))
    # The step resets its peak RSS at each phase line, so wait4's figure is its last phase's.
    host = steps.phase_peaks(phases, "rss_peak_bytes", last=rss)
    record = StepRecord(
        config.name,
        step,
        Status.DEADLINE if killed else Status.OK,
        deadline_s=round(deadline_s, 3),
        wall_s=round(wall, 3),
        phase=phases[-1]["phase"] if phases else None,
        phases=phases,
        peak_host_rss_bytes=max([rss, *host.values(), *(m["rss_peak_bytes"] for m in phases)]),
        host_peak_by_phase_bytes=host,
        exit_code=code,
    )
    result_file = Path(job.result)
    outcome = json.loads(result_file.read_text()) if result_file.is_file() else {}
    if killed:
        record.error = f"stopped at its {deadline_s:.1f} s deadline in phase {record.phase or 'start-up'}"
        if step is Step.EXPORT:
            record.result = {
                "files_so_far": files_below(work / steps.ONNX_DIR),
                "device_peak_by_phase_bytes": steps.phase_peaks(phases, "device_peak_bytes") or None,
            }
            sized = next((m for m in phases if "weights_bf16_bytes" in m), None)
            if sized:
                record.result["weights_bf16_bytes"] = sized["weights_bf16_bytes"]
    elif "result" in outcome:
        record.result = outcome["result"]
        record.result["environment"] = outcome.get("environment")
    else:
        record.status = Status.ERROR
        record.error = outcome.get("error") or f"the step process exited with code {code} and no result"
    if step is Step.EXPORT and record.result and record.result.get("weights_bf16_bytes"):
        export_memory(record, phases)
    if step is Step.EXPORT and not args.keep_work:
        # Tens of GB at full size: free the disk before the next model's export.
        shutil.rmtree(work / steps.ONNX_DIR, ignore_errors=True)
    return record


def export_memory(record: StepRecord, phases: list[dict]) -> None:
    """Host memory of an export against its BF16 weight bytes, into ``record.result``.

    The whole process's peak includes drawing random weights in float32 (a checkpoint loads
    straight in BF16); the peak after the load phase is the export's own.
    """
    res = record.result
    weights = res["weights_bf16_bytes"]
    res["peak_host_rss_over_weights"] = round(record.peak_host_rss_bytes / weights, 3)
    after = [v for k, v in record.host_peak_by_phase_bytes.items() if k not in steps.EXPORT_LOAD_PHASES]
    if after:
        res["peak_host_rss_after_load_bytes"] = max(after)
        res["peak_host_rss_after_load_over_weights"] = round(max(after) / weights, 3)
    start = next((m["rss_bytes"] for m in phases if m["phase"] == "sized"), None)
    if start is not None:
        res["rss_before_load_bytes"] = start


class Report:
    """The JSON document, rewritten atomically after every step."""

    def __init__(self, args: argparse.Namespace, path: Path) -> None:
        self.path = path
        self.steps: list[StepRecord] = []
        self.doc = {
            "schema": SCHEMA,
            "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "finished": None,
            "complete": False,
            "args": {k: jsonable(v) for k, v in vars(args).items()},
            "commit": git_commit(),
            "published_h100": PUBLISHED_H100,
            "environment": None,
            "steps": [],
        }

    def add(self, record: StepRecord) -> None:
        self.steps.append(record)
        if self.doc["environment"] is None and record.result and record.result.get("environment"):
            self.doc["environment"] = record.result.pop("environment")
        elif record.result:
            record.result.pop("environment", None)
        self.write()

    def write(self, complete: bool = False) -> None:
        self.doc["steps"] = [r.to_json() for r in self.steps]
        if complete:
            self.doc["complete"] = True
            self.doc["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        atomic_write_json(self.path, self.doc)


def jsonable(value):
    if isinstance(value, Enum):
        return value.value
    return str(value) if isinstance(value, Path) else value


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def flop_rate(per_s: float) -> str:
    return f"{per_s / 1e12:.0f} TFLOP/s" if per_s >= 1e12 else f"{per_s / 1e9:.1f} GFLOP/s"


def gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def summary(r: StepRecord) -> str:
    """The step's headline figures, one line."""
    res = r.result or {}
    if r.status is Status.SKIPPED:
        return r.reason or ""
    if r.status is Status.ERROR:
        return (r.error or "")[:100]
    if r.step is Step.FORWARD and r.status is Status.OK:
        return (
            f"median {res['median_ms']:.1f} ms/pass (min {res['min_ms']:.1f}, n={len(res['times_ms'])}, "
            f"{res['timer']}), batch {res['shapes']['hidden_states'][0]}, {flop_rate(res['flop_per_s'])}"
        )
    if r.step is Step.CALIBRATE and r.status is Status.OK:
        return (
            f"{res['prompts']} prompts x {res['steps']} steps in {res['seconds']:.1f} s "
            f"({res['transformer_passes']} passes), {res['quantizers_enabled']} FP8 quantizers"
        )
    if r.step is Step.EXPORT:
        ratio = res.get("peak_host_rss_after_load_over_weights")
        rss = f"RSS after load {ratio:.2f}x BF16 weights" if ratio is not None else ""
        if r.status is Status.OK:
            return (
                f"{res['seconds']:.1f} s, .onnx {res['onnx_bytes'] / 2**20:.1f} MiB + data "
                f"{res['external_data_bytes'] / 2**30:.2f} GiB, {rss}"
            )
        so_far = sum(res.get("files_so_far", {}).values())
        return f"{r.error}; {so_far / 2**30:.2f} GiB written; {rss}"
    return r.error or ""


def table(steps: list[StepRecord]) -> str:
    """The run as a text table, then the published H100 figures beside the forward medians."""
    rows = [("model", "step", "status", "wall s", "dev GiB", "host GiB", "figures")]
    for r in steps:
        dev = (r.result or {}).get("peak_device_memory_bytes")
        wall = "-" if r.wall_s is None else f"{r.wall_s:.1f}"
        rows.append(
            (r.model, r.step.value, r.status.value, wall, gib(dev), gib(r.peak_host_rss_bytes), summary(r))
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1] for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    forward = [r for r in steps if r.step is Step.FORWARD and r.status is Status.OK]
    if forward:
        p = PUBLISHED_H100
        lines.append("")
        lines.append(
            "published, H100, SD3.5 Large, batch 2 (CFG), per step: "
            f"TensorRT FP8 {p['tensorrt_fp8_ms_per_step']:.0f} ms, "
            f"TensorRT BF16 {p['tensorrt_bf16_ms_per_step']:.0f} ms, "
            f"PyTorch eager BF16 <= {p['pytorch_eager_bf16_ms_per_step_at_most']:.0f} ms (end to end / steps)"
        )
        for r in forward:
            median = r.result["median_ms"]
            lines.append(
                f"measured, {r.model}: PyTorch eager BF16 {median:.1f} ms per step = "
                f"{median / p['tensorrt_fp8_ms_per_step']:.2f}x the published TensorRT FP8 step, "
                f"{median / p['tensorrt_bf16_ms_per_step']:.2f}x the TensorRT BF16 one"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the planned steps within the deadlines; returns 0 when every step measured, else 1.

    Raises:
        ConfigError: a config file is missing or invalid (checked before any step runs).
    """
    args = parse_args(argv)
    t0 = time.monotonic()
    args.configs = [str(Path(c).resolve()) for c in args.configs]
    args.out, args.work_dir = args.out.resolve(), args.work_dir.resolve()
    configs = {path: load_config(path) for path in args.configs}
    if args.device == "auto":
        args.device = "cuda" if cuda_available() else "cpu"
    if args.launch is Launch.AUTO:
        args.launch = Launch.SPAWN if args.device == "cuda" else Launch.FORK
    os.chdir(REPO)  # config paths (prompt files) are relative to the repository
    if args.launch is Launch.FORK:
        steps.preload(args.steps, quantize=any(c.export.quantize for c in configs.values()))
    args.out.mkdir(parents=True, exist_ok=True)
    report = Report(args, args.out / RESULT_FILE)
    report.write()
    calibrated: set[str] = set()
    with open(args.out / LOG_FILE, "a") as log:
        for config_path, config in configs.items():
            for step in (s for s in Step if s.value in args.steps):
                left = args.deadline_s - (time.monotonic() - t0)
                if left <= 0:
                    reason = f"no time left of --deadline-s {args.deadline_s:g}"
                    record = StepRecord(config.name, step, Status.SKIPPED, reason=reason)
                elif step is Step.EXPORT and config.export.quantize and config.name not in calibrated:
                    reason = "needs the calibration of this run's calibrate step"
                    record = StepRecord(config.name, step, Status.SKIPPED, reason=reason)
                else:
                    cap = args.export_deadline_s if step is Step.EXPORT else args.step_deadline_s
                    record = measure(args, config_path, config, step, min(cap, left), log)
                    if step is Step.CALIBRATE and record.status is Status.OK:
                        calibrated.add(config.name)
                report.add(record)
                print(f"[{record.model}] {step.value}: {record.status.value} - {summary(record)}", flush=True)
    if not args.keep_work:
        shutil.rmtree(args.work_dir, ignore_errors=True)
    report.write(complete=True)
    print()
    print(table(report.steps))
    print(f"\n{args.out / RESULT_FILE} ({time.monotonic() - t0:.1f} s)")
    return 0 if all(r.status is Status.OK for r in report.steps) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Sd35TrtError as err:
        if os.environ.get("SD35TRT_DEBUG") == "1":
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
