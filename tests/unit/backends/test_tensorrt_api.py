"""Every TensorRT call sd35trt makes, checked against the real TensorRT 10.x and 11.x Python API.

TensorRT's libraries cannot be installed here, but its Python bindings can: the
``tensorrt-cu12-bindings`` wheel of each release in :data:`RELEASES` (the newest 10.x and 11.x,
pinned so that a new release cannot turn CI red overnight: bump them by hand) is downloaded once (cached under
``~/.cache/sd35trt-tests``), and stub ``libnvinfer`` / ``libnvinfer_plugin`` / ``libnvonnxparser``
libraries exporting the extension's few C entry points (read with ``nm -D --undefined-only``) are
compiled with the system C compiler. The real extension then imports, with every real class, enum
and pybind11 signature; nothing in it can run (the stubs create nothing).

``trt_api_driver.py`` runs, in a subprocess per release, sd35trt's real build stage and TensorRT
runtime against fakes derived from those classes (``trt_api_fakes.py``): every attribute must exist
on the real class, every call must bind to a real signature with arguments of the right types,
every property set must be a real setter. A removed API (``BuilderFlag.FP8`` in 11.x) fails here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.unit.backends.test_build_ort import _config, make_export_run

HERE = Path(__file__).resolve().parents[2] / "helpers"  # trt_api_driver.py, trt_api_fakes.py
REPO = HERE.parents[1]
#: The bindings checked: the newest 10.x and 11.x on the package index when last updated.
RELEASES = {"10": "10.16.1.11", "11": "11.4.0.106"}
MAJORS = tuple(RELEASES)
PACKAGE = "tensorrt-cu12-bindings"
LIBRARIES = ("nvinfer", "nvinfer_plugin", "nvonnxparser")
#: The C entry points the extension links (TensorRT 10.x and 11.x); nm adds any new one.
ENTRY_POINTS = (
    "createInferBuilder_INTERNAL",
    "createInferRuntime_INTERNAL",
    "createInferRefitter_INTERNAL",
    "getPluginRegistry",
    "getBuilderPluginRegistry",
    "getInferLibVersion",
    "initLibNvInferPlugins",
    "createNvOnnxParser_INTERNAL",
    "createNvOnnxParserRefitter_INTERNAL",
    "getNvOnnxParserVersion",
)


def _cache_dir() -> Path:
    root = os.environ.get("SD35TRT_TEST_CACHE") or Path.home() / ".cache" / "sd35trt-tests"
    return Path(root) / "tensorrt-bindings"


def _bindings(major: str) -> Path:
    """The pinned ``major``.x bindings wheel, downloaded once and unpacked into the cache."""
    cache = _cache_dir()
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    version = RELEASES[major]
    spec = f"{PACKAGE}=={version}"
    found = list(wheels.glob(f"tensorrt_cu12_bindings-{version}-*.whl"))
    if found:
        return _unpacked(cache, found[0])
    download = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            "-d",
            str(wheels),
            spec,
        ],
        capture_output=True,
        text=True,
    )
    found = list(wheels.glob(f"tensorrt_cu12_bindings-{version}-*.whl"))
    if not found:
        pytest.skip(f"no {spec} wheel could be downloaded (no package index?): {download.stderr[-300:]}")
    return _unpacked(cache, found[0])


def _unpacked(cache: Path, wheel: Path) -> Path:
    """``wheel`` unpacked under ``cache`` (once; a private temporary name, then a rename)."""
    target = cache / wheel.stem
    if not (target / "tensorrt_bindings" / "__init__.py").is_file():
        tmp = cache / f".{wheel.stem}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        with zipfile.ZipFile(wheel) as z:
            z.extractall(tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    return target


def _entry_points(extension: Path) -> list[str]:
    """The extension's undefined symbols that TensorRT's libraries provide (nm, else the list)."""
    nm = shutil.which("nm")
    names = set(ENTRY_POINTS)
    if nm:
        out = subprocess.run([nm, "-D", "--undefined-only", str(extension)], capture_output=True, text=True)
        for line in out.stdout.splitlines():
            parts = line.split()
            if (
                len(parts) == 2
                and parts[0] == "U"
                and "@" not in parts[1]
                and not parts[1].startswith(("Py", "_Py"))
            ) and parts[1] not in ("dlopen", "dlsym", "dlclose"):
                names.add(parts[1])
    return sorted(names)


def _stubs(major: str, bindings: Path, out: Path) -> Path:
    """``lib<name>.so.<major>`` stubs exporting the entry points; each returns null."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the TensorRT stub libraries")
    symbols = _entry_points(bindings / "tensorrt_bindings" / "tensorrt.so")
    source = out / "stub.c"
    source.write_text("".join(f"void *{s}(void) {{ return 0; }}\n" for s in symbols))
    for lib in LIBRARIES:
        so = f"lib{lib}.so.{major}"
        subprocess.run(
            [cc, "-shared", "-fPIC", f"-Wl,-soname,{so}", "-o", str(out / so), str(source)], check=True
        )
    return out


@pytest.fixture(scope="session")
def synthetic_export(tmp_path_factory) -> Path:
    return make_export_run(tmp_path_factory.mktemp("trt-api-export"), _config())


_REPORTS: dict[str, dict] = {}


@pytest.fixture(params=MAJORS, ids=[f"tensorrt-{m}.x" for m in MAJORS])
def report(request, synthetic_export, tmp_path_factory) -> dict:
    """The driver's report for one TensorRT release (run once per session and release)."""
    major = request.param
    if major not in _REPORTS:
        bindings = _bindings(major)
        work = tmp_path_factory.mktemp(f"trt-api-{major}")
        libs = _stubs(major, bindings, work)
        req = {"export_run": str(synthetic_export), "work": str(work), "out": str(work / "report.json")}
        (work / "request.json").write_text(json.dumps(req))
        env = {
            **os.environ,
            "LD_LIBRARY_PATH": os.pathsep.join([str(libs), os.environ.get("LD_LIBRARY_PATH", "")]),
            "PYTHONPATH": os.pathsep.join([str(bindings), str(REPO), str(HERE)]),
        }
        proc = subprocess.run(
            [sys.executable, str(HERE / "trt_api_driver.py"), str(work / "request.json")],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, f"driver failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        _REPORTS[major] = json.loads((work / "report.json").read_text())
    return _REPORTS[major]


def _ok(report: dict, scenario: str) -> dict:
    entry = report[scenario]
    assert entry["ok"], (
        f"TensorRT {report['version']}, {scenario}: {entry['error']}\n{entry.get('trace', '')}"
    )
    return entry


def test_the_real_bindings_are_loaded(report):
    major = report["version"].split(".")[0]
    assert report["version"] == RELEASES[major]


def test_build_stage_uses_only_the_real_api(report):
    entry = _ok(report, "build")
    calls = {(c[0], c[1]): c[2] for c in entry["calls"]}
    # Strongly typed: the creation flag on 10.x, none on 11.x (always strongly typed there).
    assert calls[("Builder", "create_network")] == ("2" if report["version"].startswith("10.") else "0")
    flags = [c[2] for c in entry["calls"] if c[1] == "set_flag"]
    assert flags and set(flags) == {"BuilderFlag.WEIGHT_STREAMING", "BuilderFlag.REFIT"}
    assert calls[("IBuilderConfig", "profiling_verbosity=")] == "ProfilingVerbosity.DETAILED"
    assert calls[("IBuilderConfig", "builder_optimization_level=")] == "5"
    assert calls[("IBuilderConfig", "set_memory_pool_limit")] == f"MemoryPoolType.WORKSPACE, {2 << 30}"
    assert calls[("EngineInspector", "get_engine_information")] == "LayerInformationFormat.JSON"
    facts = entry["facts"]
    # Each build reuses the cache the previous one saved (2 builds x 6 engines).
    assert facts["timing_cache"] == "+tactics" * 12
    assert facts["options"]["timing_cache_reused"] is True
    assert any("Building engine 1/2" in line for line in facts["progress"])  # the monitor ran


def test_build_records_what_each_engine_runs(report):
    facts = _ok(report, "build")["facts"]
    layers = facts["transformer_layers"]
    assert (layers["quantized_linear"], layers["fp8_gemms"], layers["fell_back"]) == (1, 1, [])
    assert layers["by_precision"] == {"fp8": 1, "fp32": 1}
    assert min(facts["device_memory_bytes"].values()) > 0 and facts["streamable"] == 8192


def test_fp8_layers_that_fall_back_fail_the_build_unless_allowed(report):
    facts = _ok(report, "partial_fp8")["facts"]
    assert facts["error"].startswith("the transformer engine has 0 FP8 GEMM layers for 1 FP8-quantized")
    assert "(/text/MatMul)" in facts["error"] and "--allow-partial-fp8" in facts["error"]
    assert facts["published"] is False
    assert len(facts["warnings"]) == 1 and "allowed by --allow-partial-fp8" in facts["warnings"][0]


def test_gpu_without_fp8_and_no_unquantized_export_publishes_nothing(report):
    facts = _ok(report, "no_fp8_gpu")["facts"]
    assert "NVIDIA A100 (sm_80) has no FP8" in facts["error"] and facts["published"] is False


def test_runtime_loads_checked_mappings_into_one_shared_activation_buffer(report):
    entry = _ok(report, "runtime")
    world, facts = entry["world"], entry["facts"]
    assert world["deserialized_from"] == ["mmap"] * 6  # the hashed mapping itself (6 engines), no copy
    assert set(world["allocation_strategies"]) == {"ExecutionContextAllocationStrategy.USER_MANAGED"}
    addresses = {a for a, _ in world["device_memory"]}
    assert len(addresses) == 1 and facts["shared_activation_bytes"] == max(
        s for _, s in world["device_memory"]
    )
    assert facts["activation_memory_after"] == 0  # freed with the last engine
    assert facts["weight_streaming_budget"] == 3000  # TensorRT's automatic budget: none configured
    for outputs in facts["outputs"].values():  # what the kernels wrote at the bound addresses
        assert all(pattern == "3f3f3f3f" for _, _, pattern in outputs.values())


def test_cuda_graphs_keep_both_slg_shapes_and_never_rerun_first_calls(report):
    facts = _ok(report, "runtime")["facts"]
    assert facts["first_call_executions"] == 6  # one per engine (6): no warm-up run
    assert facts["graph_captures"] == 2  # batch 2N and N, each captured once
    assert facts["loop_executions"] == 7


def test_the_harness_rejects_removed_and_misused_apis(report):
    facts = _ok(report, "removed_apis")["facts"]
    if report["version"].startswith("11."):
        assert "has no attribute 'FP8'" in facts["BuilderFlag.FP8"]
    else:
        assert facts["BuilderFlag.FP8"] is None  # still there in 10.x
    assert "not a settable property" in facts["max_workspace_size"]  # removed in 10.0
    assert (
        "missing a required argument: 'ignore_mismatch'" in facts["set_timing_cache without ignore_mismatch"]
    )
    assert "is not str" in facts["parse_from_file(Path)"]
    assert "is not typing.SupportsInt" in facts["builder_optimization_level = '4'"]
    assert "is not typing.SupportsInt" in facts["set_tensor_address(float)"]
