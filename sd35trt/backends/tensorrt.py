"""TensorRT backend: the engine runner and the backend object (the builder is ``tensorrt_build``).

Loading: the plan is memory-mapped, its sha256 checked on the mapping and that same mapping
deserialized (:func:`~sd35trt.artifacts.files.map_verified`). Weight streaming budgets recorded
with the engines are applied before the execution context exists. Activations live in one device
buffer shared by every engine of the runtime (``ExecutionContextAllocationStrategy.USER_MANAGED``,
sized for the largest engine, as NVIDIA's demo/Diffusion does): the stages never run concurrently.
With CUDA graphs, a :class:`~sd35trt.backends.graphs.GraphCache` captures a shape on its second
call and replays it. ``tensorrt`` is imported inside functions only.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd35trt.artifacts.files import map_verified
from sd35trt.artifacts.repair import REBUILD, repair_hint
from sd35trt.backends.base import BuildJob, BuiltEngine, EngineBackend, OpenOptions
from sd35trt.backends.engine import Engine
from sd35trt.backends.graphs import GraphCache
from sd35trt.backends.machine import MachineInfo, same_tensorrt_version, sm_name
from sd35trt.components import Component, ComponentSpec
from sd35trt.config import Backend
from sd35trt.errors import (
    BackendUnavailableError,
    DeviceOutOfMemoryError,
    IncompatibleEngineError,
)

if TYPE_CHECKING:
    import torch

    from sd35trt.artifacts.engine_manifest import EngineManifest, EngineRecord


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    import torch

    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT8: torch.int8,
        trt.DataType.BOOL: torch.bool,
        trt.DataType.UINT8: torch.uint8,
        trt.DataType.BF16: torch.bfloat16,
        trt.DataType.INT64: torch.int64,
        trt.DataType.FP8: torch.float8_e4m3fn,
    }
    try:
        return table[dtype]
    except KeyError:
        raise TypeError(f"TensorRT dtype {dtype} has no torch equivalent") from None


class CudaDevice:
    """The torch CUDA calls of the runner, in one place (the API tests run it on a CPU stand-in)."""

    def __init__(self, device: str) -> None:
        import torch

        self.cuda = torch.cuda
        self.device = torch.device(device)

    def guard(self) -> contextlib.AbstractContextManager:
        return self.cuda.device(self.device)

    def new_stream(self) -> Any:
        return self.cuda.Stream(self.device)

    def current_stream(self) -> Any:
        return self.cuda.current_stream(self.device)

    def use_stream(self, stream: Any) -> contextlib.AbstractContextManager:
        return self.cuda.stream(stream)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        import torch

        return torch.empty(shape, dtype=dtype, device=self.device)

    def hand_over(self, tensors: Iterable[torch.Tensor], stream: Any) -> None:
        """Tell the caching allocator that ``stream`` uses ``tensors`` (no early reuse)."""
        for t in tensors:
            t.record_stream(stream)

    def capture(self, stream: Any, run: Callable[[], None]) -> Any:
        """Capture ``run``'s work on ``stream`` into a CUDA graph (``replay()`` reruns it)."""
        graph = self.cuda.CUDAGraph()
        with self.cuda.graph(graph, stream=stream):
            run()
        return graph


class ActivationMemory:
    """One device buffer for the activations of every engine that attaches to it.

    At least ``reserve`` bytes (the largest recorded engine), grown if an engine reports more;
    growing re-points every attached context through its ``bind`` callback. Freed when the last
    engine detaches.
    """

    def __init__(self, device: CudaDevice, reserve: int = 0) -> None:
        self.device = device
        self.reserve = reserve
        self._buffer: torch.Tensor | None = None
        self._users: dict[str, tuple[int, Callable[[int, int], None]]] = {}
        self.size_bytes = 0  # current buffer size (0: none allocated)
        self.peak_bytes = 0

    def attach(self, name: str, size: int, bind: Callable[[int, int], None]) -> None:
        """Give ``name`` the buffer: ``bind(address, size)`` now and whenever it moves."""
        import torch

        self._users[name] = (size, bind)
        if self._buffer is None or size > self.size_bytes:
            want = max(size, self.reserve, *(s for s, _ in self._users.values()))
            self._buffer = None  # free the old buffer before allocating the larger one
            try:
                self._buffer = self.device.empty((max(want, 1),), torch.uint8)
            except torch.cuda.OutOfMemoryError:
                self._users.pop(name)
                raise DeviceOutOfMemoryError(
                    f"out of memory allocating {want / 2**20:.0f} MiB of shared activation memory"
                ) from None
            self.size_bytes = want
            self.peak_bytes = max(self.peak_bytes, want)
            for user_size, user_bind in self._users.values():
                user_bind(self._buffer.data_ptr(), user_size)
        else:
            bind(self._buffer.data_ptr(), size)

    def detach(self, name: str) -> None:
        self._users.pop(name, None)
        if not self._users:
            self._buffer = None
            self.size_bytes = 0


@dataclass(frozen=True)
class WeightStreaming:
    """Weight streaming at run time: ``budget_bytes`` of streamable weights kept on the device.

    ``None`` asks TensorRT for its automatic budget (``get_weight_streaming_automatic_budget``).
    """

    budget_bytes: int | None = None


def apply_weight_streaming(engine: Any, setting: WeightStreaming) -> int | None:
    """Set the engine's weight streaming budget; must precede its execution contexts.

    Returns:
        The budget set in bytes, or ``None`` when the plan has no streamable weights.
    """
    streamable = int(engine.streamable_weights_size)
    if streamable <= 0:
        return None
    if setting.budget_bytes is None:
        budget = int(engine.get_weight_streaming_automatic_budget())
    else:
        budget = min(setting.budget_bytes, streamable)
    engine.weight_streaming_budget_v2 = budget
    return budget


@dataclass
class _Graph:
    graph: Any
    inputs: dict[str, Any]
    outputs: dict[str, Any]


class TrtEngine(Engine):
    """One component's TensorRT engine, run on torch CUDA tensors on one stream.

    Subclasses for another TensorRT library set :attr:`module` and :attr:`library` and may
    override :meth:`_new_context` (TensorRT-RTX: a runtime config).
    """

    #: The library's Python module and its name for people.
    module = "tensorrt"
    library = "TensorRT"
    #: The library captures CUDA graphs itself (TensorRT-RTX), so no :class:`GraphCache` is kept.
    builtin_cuda_graphs = False

    def __init__(
        self,
        spec: ComponentSpec,
        path: str | Path,
        sha256: str,
        size: int,
        *,
        device: str = "cuda",
        use_cuda_graph: bool = False,
        weight_streaming: WeightStreaming | None = None,
        activation_memory: ActivationMemory | None = None,
        cuda: CudaDevice | None = None,
    ) -> None:
        """``sha256`` and ``size`` (bytes) are the engine manifest's; ``weight_streaming``
        ``None``: off; ``activation_memory`` ``None``: the context allocates its own; ``cuda``:
        the torch CUDA calls (default :class:`CudaDevice` of ``device``)."""
        super().__init__(spec)
        self.path = Path(path)
        self.sha256 = sha256
        self.size = size
        self.device = device
        self.use_cuda_graph = use_cuda_graph
        self.weight_streaming = weight_streaming
        self.activation_memory = activation_memory
        self._cuda = cuda
        self._loaded: tuple[Any, ...] = ()  # logger, runtime, engine: kept alive with the context
        self._context: Any = None
        self._stream: Any = None
        self._dtypes: dict[str, torch.dtype] = {}
        self.graphs: GraphCache[_Graph] | None = None
        self.weight_streaming_budget: int | None = None

    def _activate_impl(self) -> None:
        # Hashed before tensorrt is even imported; the mapping hashed is the buffer deserialized.
        fix = repair_hint(self.path)  # rebuild in a run directory, re-copy and verify elsewhere
        with map_verified(self.path, self.sha256, self.size, "engine manifest", fix) as plan:
            self._load(plan)

    def _load(self, plan: Any) -> None:
        trt = importlib.import_module(self.module)
        cuda = self._cuda = self._cuda or CudaDevice(self.device)
        logger = trt.Logger(trt.Logger.WARNING)
        with cuda.guard():
            runtime = trt.Runtime(logger)
            engine = runtime.deserialize_cuda_engine(plan)
            if engine is None:
                raise IncompatibleEngineError(
                    f"{self.library} {trt.__version__} could not deserialize {self.path.name}: {REBUILD}"
                )
            names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
            inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
            self._check_io(self.path, inputs, [n for n in names if n not in inputs])
            if self.weight_streaming is not None:
                self.weight_streaming_budget = apply_weight_streaming(engine, self.weight_streaming)
            self._context = self._create_context(trt, engine)
            self._loaded, self._stream = (logger, runtime, engine), cuda.new_stream()
            self._dtypes = {n: _torch_dtype(trt, engine.get_tensor_dtype(n)) for n in names}
        own_graphs = self.use_cuda_graph and not self.builtin_cuda_graphs
        self.graphs = GraphCache(self._capture) if own_graphs else None

    def _new_context(self, trt: Any, engine: Any, user_managed: bool) -> Any:
        """The execution context; ``user_managed``: its activations go where it is told."""
        if not user_managed:
            return engine.create_execution_context()
        return engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)

    def _create_context(self, trt: Any, engine: Any) -> Any:
        context = self._new_context(trt, engine, self.activation_memory is not None)
        if context is None:
            raise DeviceOutOfMemoryError(f"out of memory creating the execution context of {self.path.name}")
        if self.activation_memory is not None:

            def bind(address: int, size: int) -> None:
                context.set_device_memory(address, size)
                if self.graphs is not None:
                    self.graphs.clear()  # captured kernels point at the old buffer

            self.activation_memory.attach(self.name, int(engine.device_memory_size_v2), bind)
        return context

    def _bind(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Set shapes and addresses for ``inputs``; allocate and bind the outputs."""
        context = self._context
        for name, t in inputs.items():
            if not context.set_input_shape(name, tuple(t.shape)):
                raise ValueError(
                    f"engine {self.name}: input {name} shape {tuple(t.shape)} is outside its profile"
                )
            context.set_tensor_address(name, t.data_ptr())
        outputs = {}
        for name in self.spec.output_names:
            shape = tuple(context.get_tensor_shape(name))
            outputs[name] = self._cuda.empty(shape, self._dtypes[name])
            context.set_tensor_address(name, outputs[name].data_ptr())
        return outputs

    def _execute(self) -> None:
        if not self._context.execute_async_v3(self._stream.cuda_stream):
            raise RuntimeError(f"engine {self.name}: execute_async_v3 failed (see the TensorRT log)")

    def _infer_impl(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        cuda, stream = self._cuda, self._stream
        with cuda.guard():
            current = cuda.current_stream()
            inputs = {
                n: feeds[n].detach().to(device=cuda.device, dtype=self._dtypes[n]).contiguous()
                for n in self.spec.input_names
            }
            stream.wait_stream(current)
            key = tuple(tuple(t.shape) for t in inputs.values())
            graph = self.graphs.lookup(key) if self.graphs is not None else None
            with cuda.use_stream(stream):
                if graph is None:
                    outputs = self._bind(inputs)
                    self._execute()
                else:
                    for n, t in inputs.items():
                        graph.inputs[n].copy_(t, non_blocking=True)
                    graph.graph.replay()
                    outputs = {n: t.clone() for n, t in graph.outputs.items()}
            cuda.hand_over((*inputs.values(), *outputs.values()), stream)
            current.wait_stream(stream)
        return outputs

    def _capture(self, key: Hashable) -> _Graph:
        """Static buffers of shapes ``key`` bound to the context, and a graph of one execution."""
        cuda, stream = self._cuda, self._stream
        shapes = dict(zip(self.spec.input_names, key, strict=True))
        with cuda.use_stream(stream):
            static_in = {n: cuda.empty(shapes[n], self._dtypes[n]) for n in self.spec.input_names}
            static_out = self._bind(static_in)
            graph = cuda.capture(stream, self._execute)
        return _Graph(graph, static_in, static_out)

    def _deactivate_impl(self) -> None:
        if self.graphs is not None:
            self.graphs.clear()
        self.graphs = None
        if self.activation_memory is not None:
            self.activation_memory.detach(self.name)
        self._loaded, self._context, self._stream = (), None, None


class TensorRTBackend(EngineBackend):
    """TensorRT plans: tied to the TensorRT release and GPU compute capability that built them."""

    backend = Backend.TENSORRT
    label = "TensorRT"
    suffix = ".plan"
    default_device = "cuda"
    requirements = "TensorRT and a CUDA GPU"
    needs_machine_check = True
    #: The torch CUDA calls the engines make (the API tests put a CPU stand-in here).
    cuda_device: Callable[[str], CudaDevice] = CudaDevice
    engine_class: type[TrtEngine] = TrtEngine

    def missing(self, machine: MachineInfo) -> list[str]:
        return [
            what
            for what, absent in (
                ("TensorRT (import tensorrt failed)", not machine.tensorrt_version),
                ("CUDA GPU", not machine.gpu),
            )
            if absent
        ]

    def describe(self, machine: MachineInfo) -> str:
        gpu = machine.gpu
        return f"TensorRT {machine.tensorrt_version} on {gpu.name} ({gpu.sm})" if gpu else self.label

    def runs_fp8(self, machine: MachineInfo) -> bool:
        return machine.gpu is None or machine.gpu.has_fp8

    def recorded_machine(self, machine: MachineInfo) -> MachineInfo:
        return machine

    def built_for(self, record: EngineRecord) -> str:
        sm = sm_name(record.compute_capability) if record.compute_capability else "an unknown GPU"
        return f"{sm} / TensorRT {record.tensorrt_version}"

    def incompatibility(self, record: EngineRecord, machine: MachineInfo) -> str | None:
        if machine.tensorrt_version is None or machine.gpu is None:
            missing = " and no ".join(
                w
                for w, gone in (("TensorRT", not machine.tensorrt_version), ("CUDA GPU", not machine.gpu))
                if gone
            )
            return f"this machine has no {missing} (the onnxruntime backend runs without them)"
        same = (
            record.compute_capability == machine.gpu.compute_capability
            and record.tensorrt_version is not None
            and same_tensorrt_version(record.tensorrt_version, machine.tensorrt_version)
        )
        return None if same else f"this GPU is {machine.gpu.sm} / TensorRT {machine.tensorrt_version}"

    def device_for(self, requested: str | None) -> str:
        device = requested or self.default_device
        if not device.startswith("cuda"):
            raise BackendUnavailableError(f"TensorRT plans run on a CUDA device, not {device!r}")
        return device

    def build(self, job: BuildJob) -> BuiltEngine:
        from sd35trt.backends.tensorrt_build import build_plan

        return build_plan(job)

    def open(
        self, manifest: EngineManifest, components: Iterable[Component], options: OpenOptions
    ) -> dict[Component, Engine]:
        device = self.device_for(options.device)
        cuda = self.cuda_device(device)
        selected = list(components)
        sizes = [manifest.record(c).device_memory_bytes or 0 for c in selected]
        shared = ActivationMemory(cuda, reserve=max(sizes, default=0))
        engines: dict[Component, Engine] = {}
        for component in selected:
            rec = manifest.record(component)
            streaming = None
            if rec.options.get("weight_streaming"):
                streaming = WeightStreaming(rec.options.get("weight_streaming_budget_bytes"))
            engines[component] = self.engine_class(
                manifest.spec(component),
                manifest.directory / rec.file.path,
                rec.file.sha256,
                rec.file.size,
                device=device,
                use_cuda_graph=options.use_cuda_graph,
                weight_streaming=streaming,
                activation_memory=shared,
                cuda=cuda,
                **self.engine_options(manifest, component),
            )
        return engines

    def engine_options(self, manifest: EngineManifest, component: Component) -> dict[str, Any]:
        """Keyword arguments of :attr:`engine_class` that only a subclass's engines take."""
        return {}
