"""ONNX Runtime backend: offline-optimized models as engines.

Build and runtime use the same session options, at ``ORT_ENABLE_BASIC``: provider-independent
rewrites that keep FP8 Q/DQ pairs and fold weight quantization into FP8 initializers. Up to ONNX
Runtime 1.31 higher levels fused ``DequantizeLinear + MatMul`` into ``MatMulIntegerToFloat``, which
has no FP8 kernel; 1.32 runs FP8 at every level, but EXTENDED and ALL move outputs by ~1e-6 from the
validated BASIC result and measured no faster on the tiny engines (``scripts/ort_levels.py``).
Optimizing on the CPU provider keeps the saved model portable to the CUDA provider.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd35trt.artifacts.containment import check_onnx_external_data
from sd35trt.artifacts.files import check_file_digest, read_verified
from sd35trt.artifacts.repair import REBUILD, repair_hint
from sd35trt.backends.base import BuildJob, BuiltEngine, EngineBackend, OpenOptions
from sd35trt.backends.engine import Engine
from sd35trt.components import Component, ComponentSpec
from sd35trt.config import Backend
from sd35trt.errors import BuildError, EngineLoadError, WriteError, first_line, free_bytes

if TYPE_CHECKING:
    import onnxruntime
    import torch

    from sd35trt.artifacts.engine_manifest import EngineManifest

GRAPH_OPTIMIZATION_LEVEL = "ORT_ENABLE_BASIC"
CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
#: Deterministic cuDNN algorithm choice (no benchmarking search whose winner can vary run to run).
DEFAULT_CUDA_PROVIDER_OPTIONS = {"cudnn_conv_algo_search": "DEFAULT"}
#: Initializers at least this large go to the external data file when a model is saved with one.
EXTERNAL_DATA_MIN_BYTES = 1024
_BFLOAT16 = 16  # onnx.TensorProto.BFLOAT16


def session_options(intra_op_threads: int | None = None) -> onnxruntime.SessionOptions:
    """Session options shared by the offline optimization and the runtime sessions."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, GRAPH_OPTIMIZATION_LEVEL)
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    if intra_op_threads is not None:
        so.intra_op_num_threads = intra_op_threads
    so.use_deterministic_compute = True
    # Spinning worker threads keep cores busy between engine calls and starve the torch work of
    # the denoising loop on small machines (measured on 2 cores: 700 -> 290 ms per tiny image).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3  # errors only: ORT's warnings would drown the progress lines
    return so


def _ort_errors() -> tuple[type[Exception], ...]:
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidGraph", "InvalidArgument", "InvalidProtobuf", "NoSuchFile", "NotImplemented")
    return tuple(getattr(state, n) for n in names if hasattr(state, n))


def cuda_provider_available() -> bool:
    """Whether onnxruntime-gpu's CUDA provider is installed (no device query)."""
    import onnxruntime as ort

    return CUDA_PROVIDER in ort.get_available_providers()


def optimize_model(
    source: Path, target: Path, *, external_data: bool, intra_op_threads: int | None = None
) -> dict[str, Any]:
    """Save the ``ORT_ENABLE_BASIC``-optimized form of ``source`` as ``target`` (the engine).

    ``external_data``: write initializers to ``<target>.data`` (models over protobuf's 2 GB limit).

    Returns:
        The options to record in the engine manifest (level, providers, CUDA provider options).

    Raises:
        BuildError: ONNX Runtime cannot load or optimize the model (its message, first line).
        WriteError: ONNX Runtime could not save the optimized model (a full disk: the file is named).
    """
    import onnxruntime as ort

    so = session_options(intra_op_threads)
    so.optimized_model_filepath = str(target)
    if external_data:
        so.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", target.name + ".data"
        )
        so.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", str(EXTERNAL_DATA_MIN_BYTES)
        )
    try:
        ort.InferenceSession(str(source), so, providers=[CPU_PROVIDER])
    except _ort_errors() as err:
        first = first_line(err)
        if "serialization failed" in first.lower():  # writing the optimized model, not reading the source
            free = free_bytes(target.parent)
            raise WriteError(
                f"cannot write {target}: ONNX Runtime could not save the optimized model "
                f"({free} bytes free there; a full disk?): {first}"
            ) from None
        raise BuildError(f"ONNX Runtime could not optimize {source}: {first}") from None
    if not target.is_file():
        raise BuildError(f"ONNX Runtime did not write the optimized model {target}")
    return {
        "graph_optimization_level": GRAPH_OPTIMIZATION_LEVEL,
        "optimized_with": [CPU_PROVIDER],
        "onnxruntime_version": ort.__version__,
        "cuda_provider_options": dict(DEFAULT_CUDA_PROVIDER_OPTIONS) if cuda_provider_available() else None,
    }


def _torch_dtypes() -> dict[str, torch.dtype]:
    import torch

    return {
        "tensor(float)": torch.float32,
        "tensor(float16)": torch.float16,
        "tensor(bfloat16)": torch.bfloat16,
        "tensor(double)": torch.float64,
        "tensor(int64)": torch.int64,
        "tensor(int32)": torch.int32,
        "tensor(bool)": torch.bool,
    }


class OrtEngine(Engine):
    """One component's ONNX Runtime engine (an offline-optimized ONNX model).

    Inputs of any device and dtype are converted to the model's input dtypes on the CPU (the CUDA
    provider copies them in); outputs come back on ``device``. ``activate`` reads the model once,
    checks its sha256 and hands those bytes to ONNX Runtime; external weights (``<model>.data``)
    are hashed just before ONNX Runtime opens them by path, which it insists on doing itself.
    """

    def __init__(
        self,
        spec: ComponentSpec,
        path: str | Path,
        *,
        sha256: str | None = None,
        extra_files: Sequence[tuple[Path, str]] = (),
        device: str = "cpu",
        intra_op_threads: int | None = None,
        cuda_provider_options: Mapping[str, Any] | None = None,
    ) -> None:
        """``sha256`` (when given) and ``extra_files`` (``(path, sha256)`` of the external weights)
        are checked before ONNX Runtime reads them; ``device`` ``cuda[:N]`` uses the CUDA provider
        where onnxruntime-gpu has it, with ``cuda_provider_options`` as recorded at build time."""
        super().__init__(spec)
        self.path = Path(path)
        self.sha256 = sha256
        self.extra_files = tuple((Path(p), d) for p, d in extra_files)
        self.device = device
        self.intra_op_threads = intra_op_threads
        self.cuda_provider_options = dict(cuda_provider_options or DEFAULT_CUDA_PROVIDER_OPTIONS)
        self._session: onnxruntime.InferenceSession | None = None
        self._input_types: dict[str, str] = {}

    def providers(self) -> list:
        """Providers for this engine's device, CUDA only where onnxruntime-gpu offers it."""
        if self.device.startswith("cuda") and cuda_provider_available():
            index = self.device.partition(":")[2] or "0"
            return [(CUDA_PROVIDER, {**self.cuda_provider_options, "device_id": index}), CPU_PROVIDER]
        return [CPU_PROVIDER]

    def _activate_impl(self) -> None:
        import onnxruntime as ort

        so = session_options(self.intra_op_threads)
        fix = repair_hint(self.path)  # rebuild in a run directory, re-copy and verify elsewhere
        for data_path, digest in self.extra_files:
            check_file_digest(data_path, digest, "engine manifest", fix)
        if self.sha256 is None:
            source: str | bytes = str(self.path)
        elif self.extra_files:
            # ONNX Runtime resolves external data only for a model opened by path.
            check_file_digest(self.path, self.sha256, "engine manifest", fix)
            source = str(self.path)
        else:
            source = read_verified(self.path, self.sha256, "engine manifest", fix)
            # From bytes, ONNX Runtime resolves an external-data reference against the working
            # directory: pin it to the engine's own directory (escapes and symlinks are refused).
            so.add_session_config_entry(
                "session.model_external_initializers_file_folder_path", str(self.path.parent.absolute())
            )
        # ONNX Runtime before 1.32 follows ``../secret.bin``: refuse locations that leave the directory
        check_onnx_external_data(self.path, source if isinstance(source, bytes) else None)
        try:
            session = ort.InferenceSession(source, so, providers=self.providers())
        except _ort_errors() as err:
            raise EngineLoadError(
                f"engine {self.path} matches its record, but ONNX Runtime cannot load it "
                f"({first_line(err)}); {REBUILD}"
            ) from None
        self._input_types = {i.name: i.type for i in session.get_inputs()}
        self._check_io(self.path, self._input_types, [o.name for o in session.get_outputs()])
        self._session = session

    def _infer_impl(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        import onnxruntime as ort
        import torch

        assert self._session is not None  # the base class calls this only when active
        dtypes = _torch_dtypes()
        binding = self._session.io_binding()
        keep = []  # OrtValues borrow the numpy buffers: keep both alive until the run ends
        for name in self.spec.input_names:
            t = feeds[name].detach().to("cpu", dtypes[self._input_types[name]]).contiguous()
            if t.dtype == torch.bfloat16:
                array = t.view(torch.int16).numpy()
                value = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array, _BFLOAT16)
            else:
                array = t.numpy()
                value = ort.OrtValue.ortvalue_from_numpy(array)
            keep.append((array, value))
            binding.bind_ortvalue_input(name, value)
        for name in self.spec.output_names:
            binding.bind_output(name, "cpu")
        self._session.run_with_iobinding(binding)
        values = binding.get_outputs()
        out = {name: _to_torch(v) for name, v in zip(self.spec.output_names, values, strict=True)}
        if self.device != "cpu":
            out = {name: t.to(self.device) for name, t in out.items()}
        return out

    def _deactivate_impl(self) -> None:
        self._session = None
        self._input_types = {}


def _to_torch(value: Any) -> torch.Tensor:
    """A CPU OrtValue as a torch tensor (a copy); bfloat16 has no numpy type, so it is read raw."""
    import numpy as np
    import torch

    if value.data_type() != "tensor(bfloat16)":
        return torch.from_numpy(np.array(value.numpy(), copy=True))
    shape = tuple(value.shape())
    raw = (ctypes.c_uint16 * math.prod(shape)).from_address(value.data_ptr())
    array = np.frombuffer(raw, dtype=np.int16).reshape(shape).copy()
    return torch.from_numpy(array).view(torch.bfloat16)


class OnnxRuntimeBackend(EngineBackend):
    """ONNX Runtime engines: machine-independent offline-optimized models, CPU or CUDA provider."""

    backend = Backend.ONNXRUNTIME
    label = "ONNX Runtime"
    suffix = ".onnx"
    default_device = "cpu"

    def runtime_problems(self) -> list[str]:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return ["the engines need ONNX Runtime, which is not installed (pip install onnxruntime)"]
        return []

    def build(self, job: BuildJob) -> BuiltEngine:
        options = optimize_model(job.source, job.target, external_data=job.external_data)
        # ONNX Runtime writes the data file only when some initializer reaches its size threshold.
        data_file = job.target.with_name(job.target.name + ".data")
        return BuiltEngine(extra_files=(data_file,) if data_file.is_file() else (), options=options)

    def open(
        self, manifest: EngineManifest, components: Iterable[Component], options: OpenOptions
    ) -> dict[Component, Engine]:
        device = self.device_for(options.device)
        engines: dict[Component, Engine] = {}
        for component in components:
            rec = manifest.record(component)
            engines[component] = OrtEngine(
                manifest.spec(component),
                manifest.directory / rec.file.path,
                sha256=rec.file.sha256,
                extra_files=[(manifest.directory / f.path, f.sha256) for f in rec.extra_files],
                device=device,
                intra_op_threads=options.intra_op_threads,
                cuda_provider_options=rec.options.get("cuda_provider_options"),
            )
        return engines
