"""``sd35trt triton``: a Triton Inference Server model repository for an engines directory.

Layout written (``--out REPO``, model name ``sd35trt``)::

    REPO/sd35trt/
      config.pbtxt        Python backend, inputs/outputs of sd35trt.triton.spec, dynamic batching,
                          instance groups, warm-up, parameters (engines_dir, sd35trt version)
      1/model.py          thin: binds Triton's utilities to sd35trt.triton.backend.Sd35TritonModel
      1/engines/          the engines directory (hard links where possible, else copies), unless
                          --reference names the original by its absolute path instead
      warmup/             the warm-up request's inputs (Triton's raw input format)

The model directory is assembled beside ``REPO`` and renamed into place, so a server watching
``REPO`` never sees half of it (Triton would try to load any directory inside ``REPO``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from sd35trt.config import Backend
from sd35trt.errors import ConfigError, VerificationError
from sd35trt.triton.backend import ENGINES_DIR_PARAMETER, INTRA_OP_THREADS_PARAMETER, MAX_IMAGES_PARAMETER
from sd35trt.triton.spec import INPUTS, OUTPUTS, TensorSpec, TritonType

MODEL_VERSION = "1"
WARMUP_DIR = "warmup"
ENGINES_SUBDIR = "engines"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")

MODEL_PY = '''\
"""Triton Python-backend model for sd35trt engines (written by `sd35trt triton`).

The logic is the installed sd35trt package's (sd35trt.triton.backend): the same runtime,
validation and batching as `sd35trt run` and `sd35trt serve`. Install sd35trt in the server's
Python environment.
"""

import triton_python_backend_utils as pb_utils

from sd35trt.triton.backend import Sd35TritonModel


class TritonPythonModel(Sd35TritonModel):
    pb_utils = pb_utils
'''


class EngineMode(str, Enum):
    """How the repository holds the engines."""

    COPY = "copy"  # inside the model version directory: the repository ships as one directory
    REFERENCE = "reference"  # by absolute path: no copy, the engines must exist there on the server


class TritonRepoSettings(BaseModel):
    """Options of ``sd35trt triton``.

    ``max_batch`` is Triton's ``max_batch_size``: the most prompts (batch rows) the dynamic
    batcher hands the model at once; ``None`` means the engines' batch maximum in images. The
    model splits them into engine batches of compatible rows, so a larger value is allowed.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_name: str = Field(default="sd35trt", description="model name in the repository")
    gpus: tuple[int, ...] | None = Field(
        default=None, description="TensorRT engines: GPU ids for KIND_GPU instances (default: every GPU)"
    )
    instances_per_gpu: int = Field(
        default=1, ge=1, description="model instances per GPU (ONNX Runtime engines: CPU instances)"
    )
    max_batch: int | None = Field(
        default=None,
        ge=1,
        description="Triton max_batch_size: prompts per model execution (default: engine batch)",
    )
    batch_window_ms: float = Field(
        default=10.0,
        ge=0,
        le=10_000,
        description="dynamic batcher: how long a request waits for others to join",
    )
    engines: EngineMode = EngineMode.COPY
    intra_op_threads: int | None = Field(
        default=None, ge=1, description="ONNX Runtime threads per instance (default: ONNX Runtime's)"
    )
    max_images: int | None = Field(
        default=None,
        ge=1,
        description="most images one prompt may ask for (default 16); beyond the engine batch they run as "
        "several engine batches",
    )
    force: bool = Field(default=False, description="replace the model if it exists")


@dataclass(frozen=True)
class RepositoryModel:
    """What :func:`write_repository` wrote."""

    model_dir: Path
    engines_dir: Path  # where the server will read the engines
    backend: Backend
    instance_kind: str  # KIND_GPU or KIND_CPU
    max_batch_size: int

    def layout(self) -> list[str]:
        """The model directory's files, relative to the repository (sorted)."""
        root = self.model_dir.parent
        return sorted(p.relative_to(root).as_posix() for p in self.model_dir.rglob("*") if p.is_file())


# -- config.pbtxt ------------------------------------------------------------------------------


def pbtxt_string(text: str) -> str:
    """``text`` as a protobuf text-format string literal (UTF-8 bytes outside ASCII as octal escapes)."""
    out = []
    for byte in text.encode("utf-8"):
        ch = chr(byte)
        if ch in "\\\"'":
            out.append("\\" + ch)
        elif 0x20 <= byte < 0x7F:
            out.append(ch)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def _tensor(t: TensorSpec, is_input: bool) -> str:
    dims = ", ".join(str(d) for d in t.dims)
    lines = [f"    name: {pbtxt_string(t.name)}", f"    data_type: {t.dtype.value}", f"    dims: [ {dims} ]"]
    if is_input and t.optional:
        lines.append("    optional: true")
    return "  {\n" + "\n".join(lines) + "\n  }"


@dataclass(frozen=True)
class WarmupInput:
    """One input of the warm-up request: a value written to ``warmup/<name>``."""

    name: str
    dtype: TritonType
    value: str | int

    def raw(self) -> bytes:
        """Triton's raw input format: strings as a 4-byte little-endian length + UTF-8 bytes."""
        if self.dtype is TritonType.STRING:
            data = str(self.value).encode()
            return struct.pack("<I", len(data)) + data
        fmt = {TritonType.INT32: "<i", TritonType.INT64: "<q"}[self.dtype]
        return struct.pack(fmt, int(self.value))


#: The warm-up request: one denoising step at the engines' default size and guidance, as
#: ``sd35trt serve`` warms up, so the first client does not pay for lazy initialisation.
WARMUP = (
    WarmupInput("prompt", TritonType.STRING, "warm-up"),
    WarmupInput("num_inference_steps", TritonType.INT32, 1),
    WarmupInput("seed", TritonType.INT64, 0),
)


def render_config(
    settings: TritonRepoSettings,
    *,
    backend: Backend,
    max_batch_size: int,
    engines_dir: str,
    header: Iterable[str] = (),
) -> str:
    """The model's ``config.pbtxt`` (protobuf text format of Triton's ``ModelConfig``).

    TensorRT engines get KIND_GPU instances (on ``settings.gpus``, or every visible GPU), ONNX
    Runtime engines KIND_CPU ones; ``header``: comment lines for the top of the file.

    Raises:
        ConfigError: GPUs were listed for ONNX Runtime engines.
    """
    if backend is Backend.TENSORRT:
        gpus = f"\n    gpus: [ {', '.join(str(g) for g in settings.gpus)} ]" if settings.gpus else ""
        group = f"    count: {settings.instances_per_gpu}\n    kind: KIND_GPU{gpus}"
    else:
        if settings.gpus:
            raise ConfigError(
                f"--gpus {','.join(map(str, settings.gpus))} applies to TensorRT engines; these are "
                f"{backend.value} engines, served by CPU instances (KIND_CPU): leave --gpus out"
            )
        group = f"    count: {settings.instances_per_gpu}\n    kind: KIND_CPU"
    parameters = {ENGINES_DIR_PARAMETER: engines_dir}
    if settings.intra_op_threads is not None:
        parameters[INTRA_OP_THREADS_PARAMETER] = str(settings.intra_op_threads)
    if settings.max_images is not None:
        parameters[MAX_IMAGES_PARAMETER] = str(settings.max_images)
    warmup_inputs = "\n".join(
        f"    inputs {{\n      key: {pbtxt_string(w.name)}\n      value {{\n"
        f"        data_type: {w.dtype.value}\n        dims: [ 1 ]\n"
        f"        input_data_file: {pbtxt_string(w.name)}\n      }}\n    }}"
        for w in WARMUP
    )
    parts = [
        *(f"# {line}" for line in header),
        f"name: {pbtxt_string(settings.model_name)}",
        'backend: "python"',
        f"max_batch_size: {max_batch_size}",
        "input [\n" + ",\n".join(_tensor(t, True) for t in INPUTS) + "\n]",
        "output [\n" + ",\n".join(_tensor(t, False) for t in OUTPUTS) + "\n]",
        f"dynamic_batching {{\n  max_queue_delay_microseconds: {round(settings.batch_window_ms * 1000)}\n}}",
        "instance_group [\n  {\n" + group + "\n  }\n]",
        *(
            f"parameters {{\n  key: {pbtxt_string(k)}\n  value {{ string_value: {pbtxt_string(v)} }}\n}}"
            for k, v in parameters.items()
        ),
        'model_warmup [\n  {\n    name: "one step at the default size"\n    batch_size: 1\n'
        + warmup_inputs
        + "\n  }\n]",
    ]
    return "\n".join(parts) + "\n"


# -- writing the repository ----------------------------------------------------------------------


def _copy_engines(src: Path, dst: Path) -> None:
    for path in sorted(src.rglob("*")):
        if path.is_symlink():
            raise VerificationError(
                f"{path} is a symbolic link; the repository must hold the engines themselves"
            )
        if path.is_file():
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, target)  # engines are large and never rewritten in place (builds rename)
            except OSError:
                shutil.copy2(path, target)


def write_repository(
    engines_dir: str | Path, out: str | Path, settings: TritonRepoSettings
) -> RepositoryModel:
    """Write a Triton model repository serving the engines in ``engines_dir``.

    The engines' files are checked against their manifest (sizes and sha256) first; whether this
    machine can load them is not (the server checks at model load, as ``run`` does). Other
    models in ``out`` are left alone.

    Raises:
        ConfigError: a bad model name, ``--gpus`` for ONNX Runtime engines, or the model
            directory exists already without ``force``.
        ManifestError / VerificationError: the engines are missing or damaged (named).
    """
    from sd35trt.artifacts.engine_manifest import read_engine_manifest
    from sd35trt.artifacts.files import verify_files
    from sd35trt.runtime.request import RequestLimits

    if not _NAME.fullmatch(settings.model_name):
        raise ConfigError(
            f"--model-name {settings.model_name!r} is not a Triton model name: use letters, digits, "
            "'_', '.' and '-', not starting with '.' or '-'"
        )
    engines_dir, out = Path(engines_dir).absolute(), Path(out).absolute()
    manifest = read_engine_manifest(engines_dir)
    files = [f for rec in manifest.engines.values() for f in rec.files] + list(manifest.support_files)
    verify_files(manifest.directory, files, what=f"engines in {engines_dir} (rebuild with `sd35trt build`)")
    limits = RequestLimits.from_manifest(manifest, skip_layer_guidance=False)  # SLG only raises the minimum
    max_batch = settings.max_batch or max(limits.images(True)[1], limits.images(False)[1])
    final = out / settings.model_name
    if final.exists() and not settings.force:
        raise ConfigError(f"{final} exists already: pass --force to replace it")
    reference = settings.engines is EngineMode.REFERENCE
    from sd35trt import __version__

    config = render_config(
        settings,
        backend=manifest.backend,
        max_batch_size=max_batch,
        engines_dir=str(engines_dir) if reference else ENGINES_SUBDIR,
        header=[
            f"written by sd35trt {__version__} (`sd35trt triton`) for {engines_dir}",
            f"{manifest.backend.value} engines; inputs and outputs: sd35trt.triton.spec",
        ],
    )
    out.mkdir(parents=True, exist_ok=True)
    # Assembled beside the repository: Triton loads every directory inside it, hidden ones too.
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.{settings.model_name}.tmp-", dir=out.parent))
    try:
        (stage / MODEL_VERSION).mkdir()
        (stage / "config.pbtxt").write_text(config)
        (stage / MODEL_VERSION / "model.py").write_text(MODEL_PY)
        (stage / WARMUP_DIR).mkdir()
        for w in WARMUP:
            (stage / WARMUP_DIR / w.name).write_bytes(w.raw())
        if not reference:
            _copy_engines(engines_dir, stage / MODEL_VERSION / ENGINES_SUBDIR)
        os.chmod(stage, 0o755)
        _publish(stage, final)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return RepositoryModel(
        model_dir=final,
        engines_dir=engines_dir if reference else final / MODEL_VERSION / ENGINES_SUBDIR,
        backend=manifest.backend,
        instance_kind="KIND_GPU" if manifest.backend is Backend.TENSORRT else "KIND_CPU",
        max_batch_size=max_batch,
    )


def _publish(stage: Path, final: Path) -> None:
    """Rename ``stage`` to ``final``, replacing an existing model directory."""
    old = None
    if final.exists():
        old = final.parent.parent / f".{final.parent.name}.{final.name}.old-{os.getpid()}"
        os.replace(final, old)
    try:
        os.replace(stage, final)
    except BaseException:
        if old is not None:
            os.replace(old, final)
        raise
    if old is not None:
        with contextlib.suppress(OSError):
            shutil.rmtree(old)
