"""``sd35trt triton`` against a real tritonserver: the tiny ONNX Runtime engines, HTTP and gRPC.

One server for the module (the ``tritonserver`` bundled in nvidia-pytriton, started by
:class:`~sd35trt.triton.local.LocalTritonServer` on 127.0.0.1 and free ports), stopped by the
fixture whatever happens; the last test stops it itself and checks that it stopped cleanly.
Clients are closed after each test: Triton waits for open HTTP connections when it stops.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import time
import urllib.request
from pathlib import Path

import bad_images
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException
from typer.testing import CliRunner

from sd35trt.cli import app
from sd35trt.errors import ConfigError, RequestError
from sd35trt.triton.local import LocalTritonServer
from sd35trt.triton.spec import INPUTS, OUTPUTS

pytestmark = pytest.mark.slow

MODEL = "sd35trt"
SMALL = {"width": 64, "height": 64, "num_inference_steps": 2}
PROTOCOLS = ("http", "grpc")
SPECS = {t.name: t for t in INPUTS}


@pytest.fixture(scope="module")
def repository(built_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("triton") / "repository"
    args = ["triton", str(built_run / "engines"), "--out", str(out), "--batch-window-ms", "100"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def server(repository, tmp_path_factory):
    log = tmp_path_factory.mktemp("triton-log") / "tritonserver.log"
    s = LocalTritonServer(repository, log_path=log, exit_timeout_s=15)
    s.start(timeout_s=300)
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def generator(built_run):
    """``sd35trt serve``'s validation over the same engines: the messages Triton must give."""
    from sd35trt.runtime.pipeline import Sd35Runtime
    from sd35trt.serve.runtime_adapter import RuntimeGenerator

    runtime = Sd35Runtime.load(built_run / "engines")
    yield RuntimeGenerator(runtime)
    runtime.close()


@contextlib.contextmanager
def client(server: LocalTritonServer, protocol: str, **options):
    c = (
        thttp.InferenceServerClient(server.http_url, **options)
        if protocol == "http"
        else tgrpc.InferenceServerClient(server.grpc_url)
    )
    try:
        yield c
    finally:
        c.close()


def inputs(protocol: str, rows: list[dict]) -> list:
    """Input tensors ``[len(rows), 1]`` for the fields the rows give (all rows give the same ones)."""
    module = thttp if protocol == "http" else tgrpc
    out = []
    for name in rows[0]:
        spec = SPECS[name]
        dtype = {"BYTES": np.object_, "INT32": np.int32, "INT64": np.int64, "FP64": np.float64}.get(
            spec.dtype.kserve, np.bool_
        )
        values = [r[name].encode() if isinstance(r[name], str) else r[name] for r in rows]
        array = np.array([[v] for v in values], dtype=dtype)
        tensor = module.InferInput(name, list(array.shape), spec.dtype.kserve)
        tensor.set_data_from_numpy(array)
        out.append(tensor)
    return out


def infer(c, protocol: str, *rows: dict):
    return c.infer(MODEL, inputs(protocol, list(rows)))


# -- the repository (no server) --------------------------------------------------------------


def test_repository_holds_config_thin_model_engines_and_warmup(repository, built_run):
    model = repository / MODEL
    config = text_format.Parse((model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.backend == "python" and config.max_batch_size == 2  # the tiny engines' batch
    assert [i.name for i in config.input] == [t.name for t in INPUTS]
    assert [o.name for o in config.output] == [t.name for t in OUTPUTS]
    assert [i.name for i in config.input if not i.optional] == ["prompt"]
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert config.dynamic_batching.max_queue_delay_microseconds == 100_000
    assert config.parameters["engines_dir"].string_value == "engines"
    warm = config.model_warmup[0]
    assert {k for k in warm.inputs} == {"prompt", "num_inference_steps", "seed"}
    assert all((model / "warmup" / v.input_data_file).is_file() for v in warm.inputs.values())
    code = (model / "1" / "model.py").read_text()
    assert "from sd35trt.triton.backend import Sd35TritonModel" in code and len(code.splitlines()) < 20
    # the engines travel inside the repository, byte for byte
    src = built_run / "engines"
    for f in src.rglob("*"):
        if f.is_file():
            assert (model / "1" / "engines" / f.relative_to(src)).read_bytes() == f.read_bytes()


def test_triton_verb_refuses_gpus_for_onnxruntime_engines_and_an_existing_model(built_run, repository):
    runner = CliRunner()
    engines = str(built_run / "engines")
    r = runner.invoke(app, ["triton", engines, "--out", str(repository), "--gpus", "0,1", "--force"])
    assert isinstance(r.exception, ConfigError) and "--gpus 0,1" in str(r.exception)
    assert "KIND_CPU" in str(r.exception)
    r = runner.invoke(app, ["triton", engines, "--out", str(repository)])
    assert isinstance(r.exception, ConfigError) and "--force" in str(r.exception)
    assert not [p for p in repository.parent.iterdir() if ".tmp-" in p.name]  # nothing left half-written


# -- the live server -----------------------------------------------------------------------------


def test_server_and_model_are_ready_over_http_and_grpc(server):
    with urllib.request.urlopen(f"http://{server.http_url}/v2/health/ready", timeout=10) as r:
        assert r.status == 200
    for protocol in PROTOCOLS:
        with client(server, protocol) as c:
            assert c.is_server_ready() and c.is_model_ready(MODEL)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_prompt_gives_a_png_and_the_parameters_used(server, protocol):
    from PIL import Image

    with client(server, protocol) as c:
        r = infer(c, protocol, {"prompt": "a red fox in the snow", **SMALL, "seed": 5})
    images = r.as_numpy("images")
    assert images.shape == (1, 1)
    import io

    image = Image.open(io.BytesIO(images[0, 0]))
    assert image.format == "PNG" and image.size == (64, 64)
    params = json.loads(r.as_numpy("parameters")[0, 0])
    assert params["prompt"] == "a red fox in the snow" and params["seed"] == 5
    assert params["num_inference_steps"] == 2 and params["guidance_scale"] == 4.5  # engine default
    assert json.loads(r.as_numpy("warnings")[0, 0]) == []


def test_same_seed_gives_the_bytes_of_sd35trt_run(server, built_run, tmp_path):
    out = tmp_path / "run.png"
    args = ["run", "a lighthouse at dusk", "--engines", str(built_run / "engines"), "--steps", "2"]
    args += ["--width", "64", "--height", "64", "--seed", "11", "-o", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    expected = out.read_bytes()
    for protocol in PROTOCOLS:
        with client(server, protocol) as c:
            r = infer(c, protocol, {"prompt": "a lighthouse at dusk", **SMALL, "seed": 11})
        assert r.as_numpy("images")[0, 0] == expected, protocol
    with client(server, "http") as c:  # another seed, another image
        r = infer(c, "http", {"prompt": "a lighthouse at dusk", **SMALL, "seed": 12})
    assert r.as_numpy("images")[0, 0] != expected


def test_more_images_than_the_engine_batch_each_with_its_own_seed(server, built_run, tmp_path):
    """3 images on batch-2 engines: two engine batches; image i is seed 20 + i in its PNG, and
    image 2 (alone in its engine batch) has the bytes of `sd35trt run` for one image, seed 22."""
    import io

    from PIL import Image

    with client(server, "http") as c:
        r = infer(c, "http", {"prompt": "a lighthouse at dusk", **SMALL, "seed": 20, "num_images": 3})
    images = r.as_numpy("images")
    assert images.shape == (1, 3)
    recorded = [json.loads(Image.open(io.BytesIO(images[0, i])).text["parameters"]) for i in range(3)]
    assert [(m["seed"], m["image_index"], m["num_images"]) for m in recorded] == [
        (20 + i, i, 3) for i in range(3)
    ]
    out = tmp_path / "alone.png"
    args = ["run", "a lighthouse at dusk", "--engines", str(built_run / "engines"), "--steps", "2"]
    args += ["--width", "64", "--height", "64", "--seed", "22", "-o", str(out)]
    assert CliRunner().invoke(app, args).exit_code == 0
    alone = Image.open(out)
    assert np.array_equal(np.asarray(alone), np.asarray(Image.open(io.BytesIO(images[0, 2]))))


def test_triton_serve_answers_tritonclient_and_stops_on_sigint(repository, tmp_path):
    """`sd35trt triton serve REPO`: the local tritonserver with its backend environment, the URLs
    printed, a request answered, and Ctrl-C (SIGINT) stopping it cleanly with exit status 0."""
    import signal
    import subprocess
    import sys

    from sd35trt.triton.local import TritonPorts

    ports = TritonPorts.free()
    cmd = [sys.executable, "-m", "sd35trt.cli", "triton", "serve", str(repository)]
    cmd += ["--http-port", str(ports.http), "--grpc-port", str(ports.grpc)]
    cmd += ["--metrics-port", str(ports.metrics), "--log", str(tmp_path / "triton.log")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and (line := proc.stdout.readline()):
            lines.append(line)
            if line.startswith("Ctrl-C stops it"):
                break
        output = "".join(lines)
        assert f"HTTP     http://127.0.0.1:{ports.http}" in output, output
        assert f"gRPC     127.0.0.1:{ports.grpc}" in output
        c = thttp.InferenceServerClient(f"127.0.0.1:{ports.http}")
        try:
            r = infer(c, "http", {"prompt": "a cat", **SMALL, "seed": 3})
        finally:
            c.close()
        assert r.as_numpy("images").shape == (1, 1)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output + rest
    assert "tritonserver stopped (exit status 0)" in rest
    assert f"successfully unloaded '{MODEL}'" in (tmp_path / "triton.log").read_text(errors="replace")


def test_triton_serve_on_a_port_in_use_is_one_line_naming_the_ports(repository, tmp_path):
    """faults.md #53: Triton's 25-line log (mostly its option table) was printed instead."""
    import socket
    import subprocess
    import sys

    from sd35trt.triton.local import TritonPorts

    ports = TritonPorts.free()
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", ports.http))
        taken.listen()
        cmd = [sys.executable, "-m", "sd35trt.cli", "triton", "serve", str(repository)]
        cmd += ["--http-port", str(ports.http), "--grpc-port", str(ports.grpc)]
        cmd += ["--metrics-port", str(ports.metrics), "--log", str(tmp_path / "triton.log")]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: tritonserver could not listen: a port is already in use (HTTP {ports.http}, gRPC "
        f"{ports.grpc}, metrics {ports.metrics}); choose free ones with --http-port/--grpc-port/"
        f"--metrics-port (log: {tmp_path / 'triton.log'})"
    ]


BAD = [
    ("http", {"width": 1000}, "width"),
    ("grpc", {"width": 1000}, "width"),
    ("http", {"height": 48}, "height"),
    ("http", {"num_inference_steps": 0}, "num_inference_steps"),
    ("grpc", {"guidance_scale": math.nan}, "guidance_scale"),
    ("http", {"guidance_scale": -1.0}, "guidance_scale"),
    ("http", {"seed": -1}, "seed"),
    ("http", {"prompt": "   "}, "prompt"),
    ("http", {"num_images": 17}, "num_images"),  # beyond max_images (16)
    # faults.md #33: a corrupt PNG (SyntaxError) and a DDS (NotImplementedError) were 500 with a file path
    ("http", {"init_image": base64.b64encode(bad_images.broken_chunk_png()).decode()}, "init_image"),
    ("grpc", {"init_image": base64.b64encode(bad_images.dds()).decode()}, "init_image"),
]


@pytest.mark.parametrize(("protocol", "change", "field"), BAD)
def test_bad_input_fails_with_the_message_of_serve_naming_the_field(
    server, generator, protocol, change, field
):
    fields = {"prompt": "a cat", **SMALL, "seed": 1, **change}
    with pytest.raises(RequestError) as serve_error:
        generator.prepare(fields)
    assert serve_error.value.field == field
    with client(server, protocol) as c, pytest.raises(InferenceServerException) as err:
        infer(c, protocol, fields)
    assert err.value.message() == str(serve_error.value)  # e.g. "width 1000 is not a multiple of 16; ..."
    assert err.value.message().startswith(field)
    if protocol == "http":
        assert err.value.status() == "400"  # INVALID_ARG, HTTP's 400 (serve: 422)
    else:
        assert "INVALID_ARGUMENT" in err.value.status()


def test_text_that_is_not_utf8_fails_naming_the_field(server):
    with client(server, "http") as c:
        tensor = thttp.InferInput("prompt", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[b"a \xff cat"]], dtype=np.object_))
        with pytest.raises(InferenceServerException) as err:
            c.infer(MODEL, [tensor])
    assert err.value.message().startswith("prompt is not valid UTF-8")


def test_concurrent_requests_are_batched(server):
    def stats(c) -> tuple[int, int]:
        s = c.get_inference_statistics(MODEL)["model_stats"][0]
        return int(s["inference_count"]), int(s["execution_count"])

    n = 6
    # guidance 1 turns CFG off: the tiny engines then take 2 prompts per engine batch
    rows = [{"prompt": f"a boat #{i}", **SMALL, "guidance_scale": 1.0, "seed": 100 + i} for i in range(n)]
    with client(server, "http", concurrency=n) as c:
        before = stats(c)
        pending = [c.async_infer(MODEL, inputs("http", [row])) for row in rows]
        results = [p.get_result() for p in pending]
        # Triton updates its statistics just after it answers: wait (bounded) until they count all.
        deadline = time.monotonic() + 10
        while (after := stats(c))[0] - before[0] < n and time.monotonic() < deadline:
            time.sleep(0.05)
    inferences, executions = after[0] - before[0], after[1] - before[1]
    assert inferences == n
    assert executions < n, f"{executions} executions for {n} requests: nothing was batched"
    batches = [json.loads(r.as_numpy("batch")[0, 0]) for r in results]
    assert max(b["requests"] for b in batches) == 2  # rows of one execution shared an engine batch
    seeds = [json.loads(r.as_numpy("parameters")[0, 0])["seed"] for r in results]
    assert seeds == [100 + i for i in range(n)]  # every request got its own result back


def test_metrics_port_answers_with_the_queue_metrics(server):
    with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
        text = r.read().decode()
    assert f'nv_inference_request_success{{model="{MODEL}",version="1"}}' in text
    assert f'nv_inference_queue_duration_us{{model="{MODEL}",version="1"}}' in text


def test_the_server_stops_cleanly(server):
    """Last in the module: SIGTERM unloads the model (finalize) and exits 0."""
    pid = server.process.pid
    assert server.stop() == 0, server.log_tail()
    log = server.log_path.read_text(errors="replace")
    assert f"successfully unloaded '{MODEL}'" in log
    assert "Non-graceful termination" not in log
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
