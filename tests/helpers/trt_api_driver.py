"""Runs sd35trt's TensorRT build and runtime code against fakes of one real TensorRT release.

Started by ``test_tensorrt_api.py`` in a subprocess per TensorRT version, with the bindings of
that release on ``PYTHONPATH`` and stub ``libnvinfer*`` libraries on ``LD_LIBRARY_PATH``::

    python trt_api_driver.py REQUEST.json

REQUEST names the synthetic exported run to build from, a work directory and the report to
write: one entry per scenario with ``ok``, ``error`` (``Type: message``), the API calls made and
facts the test checks.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any

import tensorrt_bindings as real  # the real extension; its C entry points are stubs
from trt_api_fakes import World, install, write_pattern

world = World(real)
trt = install(real, world)

import onnx  # noqa: E402
import torch  # noqa: E402

from sd35trt.backends.layers import quantized_linear_nodes  # noqa: E402
from sd35trt.backends.load import open_engines, verify_engines  # noqa: E402
from sd35trt.backends.machine import GpuInfo, MachineInfo  # noqa: E402
from sd35trt.backends.tensorrt import TensorRTBackend  # noqa: E402
from sd35trt.components import Component  # noqa: E402
from sd35trt.config import Backend, config_from_dict  # noqa: E402
from sd35trt.errors import BuildError  # noqa: E402
from sd35trt.stages.build import build  # noqa: E402

VERSION = real.__version__
ADA = MachineInfo(VERSION, GpuInfo("NVIDIA L4", (8, 9)))
AMPERE = MachineInfo(VERSION, GpuInfo("NVIDIA A100", (8, 0)))
_ONNX_TO_TRT = {
    onnx.TensorProto.FLOAT: real.DataType.FLOAT,
    onnx.TensorProto.FLOAT16: real.DataType.HALF,
    onnx.TensorProto.BFLOAT16: real.DataType.BF16,
    onnx.TensorProto.INT64: real.DataType.INT64,
    onnx.TensorProto.INT32: real.DataType.INT32,
}
_ITEMSIZE = {real.DataType.FLOAT: 4, real.DataType.HALF: 2, real.DataType.BF16: 2, real.DataType.INT64: 8}
OPTIONS: dict[str, Any] = {"fp8_gemms": True}


# -- the simulated TensorRT --------------------------------------------------------------------


def _state(obj) -> dict:
    props = object.__getattribute__(obj, "_fake_props")
    return props.setdefault("_sim", {})


def _io(value) -> dict:
    dims = value.type.tensor_type.shape.dim
    return {
        "name": value.name,
        "dtype": value.type.tensor_type.elem_type,
        "shape": [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims],
    }


def _parse(parser, path):
    model = onnx.load(path, load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    network = _state(parser)["network"]
    _state(network).update(
        source=path,
        inputs=[_io(v) for v in model.graph.input if v.name not in inits],
        outputs=[_io(v) for v in model.graph.output],
    )
    return True


def _build(builder, network, config):
    sim, net = _state(config), _state(network)
    monitor = object.__getattribute__(config, "_fake_props").get("progress_monitor")
    if monitor is not None:  # what TensorRT calls on the monitor sd35trt attached
        monitor.phase_start("Building engine", None, 2)
        monitor.step_complete("Building engine", 0)
        monitor.phase_finish("Building engine")
    cache = sim.get("timing_cache")
    if cache is not None:
        _state(cache)["data"] += b"+tactics"
    desc = {
        "source": net["source"],
        "inputs": net["inputs"],
        "outputs": net["outputs"],
        "weight_streaming": "WEIGHT_STREAMING" in sim.get("flags", []),
        "device_memory": 4096 * (1 + len(world.plans)),
        "quantized": quantized_linear_nodes(net["source"]),
    }
    plan = world.fake("IHostMemory")(b"PLAN " + json.dumps(desc).encode())
    world.plans[bytes(plan)] = desc
    return plan


def _layer_info(desc) -> str:
    fp8 = "Row major linear FP8 format (kLINEAR)" if OPTIONS["fp8_gemms"] else "Row major linear FP32 format"
    layers = [
        {
            "Name": f"{node} + bias",
            "LayerType": "CaskGemmMatrixMultiply",
            "Inputs": [{"Name": f"{node}_a", "Dimensions": [-1, 64], "Format/Datatype": fp8}] * 2,
            "Outputs": [
                {"Name": f"{node}_y", "Dimensions": [-1, 64], "Format/Datatype": "Row major linear FP32"}
            ],
            "TacticName": "sm89_xmma_gemm_e4m3f32_e4m3f32_f32",
            "Metadata": f"[ONNX Layer: {node}]",
        }
        for node in desc["quantized"]
    ]
    layers.append(
        {
            "Name": "output reformat",
            "LayerType": "Reformat",
            "Inputs": [{"Name": "x", "Format/Datatype": "Row major linear FP32 format"}],
            "Outputs": [{"Name": "y", "Format/Datatype": "Row major linear FP32 format"}],
        }
    )
    names = [t["name"] for t in (*desc["inputs"], *desc["outputs"])]
    if VERSION.startswith("10."):
        return json.dumps({"Layers": layers, "Bindings": names})
    io = [{"Name": n, "IOMode": "Input", "DataType": "Float", "Location": "Device"} for n in names]
    return json.dumps({"Layers": layers, "I/O Tensors": io})


def _deserialize(runtime, buffer):
    world.facts.setdefault("deserialized_from", []).append(type(buffer).__name__)
    desc = world.plans.get(bytes(memoryview(buffer)))
    return None if desc is None else world.new("ICudaEngine", _sim={"desc": desc})


def _tensors(engine) -> list[dict]:
    desc = _state(engine)["desc"]
    return [*desc["inputs"], *desc["outputs"]]


def _by_name(engine, name) -> dict:
    return next(t for t in _tensors(engine) if t["name"] == name)


def _context(engine, strategy=None):
    world.facts.setdefault("allocation_strategies", []).append(str(strategy))
    return world.new("IExecutionContext", _sim={"engine": engine, "shapes": {}, "addresses": {}})


def _output_shape(context, name) -> tuple[int, ...]:
    sim = _state(context)
    desc = _state(sim["engine"])["desc"]
    symbols = {}
    for t in desc["inputs"]:
        for d, n in zip(t["shape"], sim["shapes"].get(t["name"], ()), strict=False):
            if isinstance(d, str):
                symbols[d] = n
    out = _by_name(sim["engine"], name)
    return tuple(d if isinstance(d, int) and d > 0 else symbols.get(d, 8) for d in out["shape"])


def _execute(context, stream):
    sim = _state(context)
    engine = sim["engine"]
    world.facts["executions"] = world.facts.get("executions", 0) + 1
    for t in _state(engine)["desc"]["outputs"]:
        shape = _output_shape(context, t["name"])
        size = math.prod(shape) * _ITEMSIZE[_ONNX_TO_TRT[t["dtype"]]]
        write_pattern(sim["addresses"][t["name"]], size, 0x3F)
    return True


def _set_device_memory(context, address, size):
    world.facts.setdefault("device_memory", []).append([address, size])


def _cache(config, data):
    return world.new("ITimingCache", _sim={"data": bytes(memoryview(data))})


B = world.behaviour
B[("Builder", "create_network")] = lambda b, flags=0: world.new("INetworkDefinition", _sim={"flags": flags})
B[("Builder", "create_builder_config")] = lambda b: world.new("IBuilderConfig")
B[("Builder", "create_optimization_profile")] = lambda b: world.new("IOptimizationProfile")
B[("Builder", "build_serialized_network")] = _build
B[("OnnxParser", "__init__")] = lambda p, network, logger: _state(p).update(network=network)
B[("OnnxParser", "parse_from_file")] = _parse
B[("OnnxParser", "num_errors")] = lambda p: 0
B[("IBuilderConfig", "add_optimization_profile")] = lambda c, profile: 0
B[("IBuilderConfig", "set_flag")] = lambda c, flag: _state(c).setdefault("flags", []).append(flag.name)
B[("IBuilderConfig", "create_timing_cache")] = _cache
B[("IBuilderConfig", "set_timing_cache")] = lambda c, cache, ignore_mismatch: (
    _state(c).update(timing_cache=cache) or True
)
B[("IBuilderConfig", "get_timing_cache")] = lambda c: _state(c)["timing_cache"]
B[("ITimingCache", "serialize")] = lambda cache: world.fake("IHostMemory")(_state(cache)["data"])
B[("Runtime", "deserialize_cuda_engine")] = _deserialize
B[("ICudaEngine", "num_io_tensors")] = lambda e: len(_tensors(e))
B[("ICudaEngine", "get_tensor_name")] = lambda e, i: _tensors(e)[i]["name"]
B[("ICudaEngine", "get_tensor_mode")] = lambda e, n: (
    real.TensorIOMode.INPUT
    if n in {t["name"] for t in _state(e)["desc"]["inputs"]}
    else real.TensorIOMode.OUTPUT
)
B[("ICudaEngine", "get_tensor_dtype")] = lambda e, n: _ONNX_TO_TRT[_by_name(e, n)["dtype"]]
B[("ICudaEngine", "device_memory_size_v2")] = lambda e: _state(e)["desc"]["device_memory"]
B[("ICudaEngine", "streamable_weights_size")] = lambda e: 8192 if _state(e)["desc"]["weight_streaming"] else 0
B[("ICudaEngine", "get_weight_streaming_automatic_budget")] = lambda e: 3000
B[("ICudaEngine", "create_execution_context")] = _context
B[("ICudaEngine", "create_engine_inspector")] = lambda e: world.new("EngineInspector", _sim={"engine": e})
B[("EngineInspector", "get_engine_information")] = lambda i, fmt: _layer_info(
    _state(_state(i)["engine"])["desc"]
)
B[("IExecutionContext", "set_input_shape")] = lambda c, n, s: (
    _state(c)["shapes"].update({n: tuple(s)}) or True
)
B[("IExecutionContext", "set_tensor_address")] = lambda c, n, a: _state(c)["addresses"].update({n: a}) or True
B[("IExecutionContext", "get_tensor_shape")] = lambda c, n: real.Dims(_output_shape(c, n))
B[("IExecutionContext", "execute_async_v3")] = _execute
B[("IExecutionContext", "set_device_memory")] = _set_device_memory


class CpuStream:
    """A stream stand-in: TensorRT gets an integer handle."""

    cuda_stream = 0x5EED

    def wait_stream(self, other) -> None:
        pass


class CpuGraph:
    def __init__(self, run) -> None:
        self.run = run

    def replay(self) -> None:
        world.facts["replays"] = world.facts.get("replays", 0) + 1
        self.run()


class CpuDevice:
    """The runner's torch CUDA calls on the CPU: real host buffers, so kernels can write into them."""

    def __init__(self, device: str) -> None:
        self.device = torch.device("cpu")

    def guard(self):
        return contextlib.nullcontext()

    def new_stream(self):
        return CpuStream()

    def current_stream(self):
        return CpuStream()

    def use_stream(self, stream):
        return contextlib.nullcontext()

    def empty(self, shape, dtype):
        return torch.zeros(shape, dtype=dtype)

    def hand_over(self, tensors, stream) -> None:
        pass

    def capture(self, stream, run):
        world.facts["captures"] = world.facts.get("captures", 0) + 1
        return CpuGraph(run)


# -- scenarios -----------------------------------------------------------------------------


def _config(**build):
    base = {
        "name": "synthetic",
        "build": {
            "batch": {"min": 1, "opt": 1, "max": 2},
            "height": {"min": 32, "opt": 64, "max": 128},
            "width": {"min": 32, "opt": 64, "max": 128},
            **build,
        },
        "runtime": {"height": 64, "width": 64, "max_sequence_length": 8},
    }
    return config_from_dict(base)


def scenario_build(req) -> dict:
    run_dir = Path(req["work"]) / "build"
    shutil.copytree(req["export_run"], run_dir)
    config = _config(workspace_gib=2, optimization_level=5, weight_streaming=True, refit=True)
    lines: list[str] = []
    build(config, run_dir, Backend.TENSORRT, machine=ADA, progress=lines.append)
    build(config, run_dir, Backend.TENSORRT, machine=ADA, progress=lines.append, force=True)
    manifest = verify_engines(run_dir / "engines", machine=ADA)
    tr = manifest.record(Component.TRANSFORMER)
    cache = run_dir / "timing_cache" / f"tensorrt-{VERSION}_nvidia-l4_sm_89.cache"
    return {
        "engines_dir": str(run_dir / "engines"),
        "transformer_layers": tr.layers.model_dump() if tr.layers else None,
        "device_memory_bytes": {c.value: r.device_memory_bytes for c, r in manifest.engines.items()},
        "streamable": tr.streamable_weights_bytes,
        "options": dict(tr.options),
        "timing_cache": cache.read_bytes().decode(),
        "progress": lines,
    }


def scenario_partial_fp8(req) -> dict:
    OPTIONS["fp8_gemms"] = False
    try:
        run_dir = Path(req["work"]) / "partial"
        shutil.copytree(req["export_run"], run_dir)
        out: dict[str, Any] = {}
        try:
            build(_config(), run_dir, Backend.TENSORRT, machine=ADA, progress=lambda _: None)
        except BuildError as err:
            out["error"] = str(err)
        out["published"] = (run_dir / "engines").exists()
        lines: list[str] = []
        build(
            _config(), run_dir, Backend.TENSORRT, machine=ADA, progress=lines.append, allow_partial_fp8=True
        )
        out["warnings"] = [line for line in lines if "warning" in line]
        return out
    finally:
        OPTIONS["fp8_gemms"] = True


def scenario_no_fp8_gpu(req) -> dict:
    run_dir = Path(req["work"]) / "ampere"
    shutil.copytree(req["export_run"], run_dir)
    try:
        build(_config(), run_dir, Backend.TENSORRT, machine=AMPERE, progress=lambda _: None)
    except BuildError as err:
        return {"error": str(err), "published": (run_dir / "engines").exists()}
    return {"error": None}


def _feeds(spec, batch: int, latent: int) -> dict:
    sizes = {
        "batch": batch,
        "latent_height": latent,
        "latent_width": latent,
        "height": latent * 8,  # the VAE encoder's image, 8x the latent
        "width": latent * 8,
        "t5_length": 8,
        "text_length": 85,
    }
    feeds = {}
    for t in spec.inputs:
        shape = tuple(sizes[d] if isinstance(d, str) else d for d in t.shape)
        feeds[t.name] = torch.zeros(shape, dtype=torch.int64 if t.dtype.value == "int64" else torch.float32)
    return feeds


def scenario_runtime(req, engines_dir: str) -> dict:
    TensorRTBackend.cuda_device = CpuDevice
    manifest = verify_engines(engines_dir, machine=ADA)
    engines = open_engines(manifest, device="cuda", use_cuda_graph=True)
    out: dict[str, Any] = {"outputs": {}}
    for engine in engines.values():
        engine.activate()
    for component, engine in engines.items():
        result = engine.infer(_feeds(engine.spec, 1, 8))
        out["outputs"][component.value] = {
            n: [list(t.shape), str(t.dtype), bytes(t.numpy().tobytes()[:4]).hex()] for n, t in result.items()
        }
    # One execution per first call: engines run once per image are never run twice.
    out["first_call_executions"] = world.facts.get("executions", 0)
    transformer = engines[Component.TRANSFORMER]
    world.facts["executions"] = 0
    for batch in (2, 1, 2, 1, 2, 1, 2):  # CFG pass, skip pass, alternating inside the SLG window
        transformer.infer(_feeds(transformer.spec, batch, 8))
    out["graph_captures"] = transformer.graphs.captures
    out["loop_executions"] = world.facts["executions"]
    out["weight_streaming_budget"] = transformer.weight_streaming_budget
    out["shared_activation_bytes"] = transformer.activation_memory.size_bytes
    for engine in engines.values():
        engine.deactivate()
    out["activation_memory_after"] = transformer.activation_memory.size_bytes
    return out


def scenario_removed_apis(req) -> dict:
    """The harness itself: removed or misused APIs must fail loudly."""
    builder = trt.Builder(trt.Logger(trt.Logger.WARNING))
    config = builder.create_builder_config()
    results = {}
    probes = {
        "BuilderFlag.FP8": lambda: config.set_flag(trt.BuilderFlag.FP8),
        "max_workspace_size": lambda: setattr(config, "max_workspace_size", 1 << 30),
        "set_timing_cache without ignore_mismatch": lambda: config.set_timing_cache(
            config.create_timing_cache(b"")
        ),
        "parse_from_file(Path)": lambda: trt.OnnxParser(
            builder.create_network(0), trt.Logger()
        ).parse_from_file(Path("x.onnx")),
        "builder_optimization_level = '4'": lambda: setattr(config, "builder_optimization_level", "4"),
        "set_tensor_address(float)": lambda: world.new("IExecutionContext").set_tensor_address("x", 1.5),
    }
    for name, probe in probes.items():
        try:
            probe()
            results[name] = None
        except (AttributeError, TypeError) as err:
            results[name] = f"{type(err).__name__}: {err}"
    return results


def main() -> None:
    req = json.loads(Path(sys.argv[1]).read_text())
    report: dict[str, Any] = {"version": VERSION}
    scenarios = [
        ("build", scenario_build),
        ("partial_fp8", scenario_partial_fp8),
        ("no_fp8_gpu", scenario_no_fp8_gpu),
        ("removed_apis", scenario_removed_apis),
    ]
    for name, fn in scenarios:
        world.calls.clear()
        world.facts = {}
        try:
            facts = fn(req)
            report[name] = {"ok": True, "facts": facts}
        except Exception as err:  # reported to the test, which fails on it
            report[name] = {
                "ok": False,
                "error": f"{type(err).__name__}: {err}",
                "trace": traceback.format_exc(),
            }
        report[name]["calls"] = [list(c) for c in world.calls]
        report[name]["world"] = dict(world.facts)
    engines_dir = (report["build"].get("facts") or {}).get("engines_dir")
    world.calls.clear()
    world.facts = {}
    if engines_dir:
        try:
            report["runtime"] = {"ok": True, "facts": scenario_runtime(req, engines_dir)}
        except Exception as err:
            report["runtime"] = {
                "ok": False,
                "error": f"{type(err).__name__}: {err}",
                "trace": traceback.format_exc(),
            }
    else:
        report["runtime"] = {"ok": False, "error": "no engines: the build scenario failed"}
    report["runtime"]["calls"] = [list(c) for c in world.calls]
    report["runtime"]["world"] = dict(world.facts)
    Path(req["out"]).write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
