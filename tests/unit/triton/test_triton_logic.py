"""``sd35trt.triton`` logic on fabricated inputs: grouping, row parsing, config text, launcher env."""

from __future__ import annotations

import struct
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from sd35trt.config import Backend
from sd35trt.errors import BackendUnavailableError, ConfigError, RequestError
from sd35trt.serve.generator import Prepared
from sd35trt.triton.backend import engine_batches, read_rows
from sd35trt.triton.local import BackendEnvironment, LocalTritonServer
from sd35trt.triton.repository import WARMUP, TritonRepoSettings, pbtxt_string, render_config
from sd35trt.triton.spec import INPUT_NAMES, TritonType


def row(key: str, size: int = 1, capacity: int = 2, max_requests: int = 2) -> Prepared:
    return Prepared(key=key, size=size, capacity=capacity, max_requests=max_requests, params={}, native=None)


def test_engine_batches_group_compatible_rows_in_arrival_order():
    items = [row("a"), row("b"), row("a"), row("a"), row("b")]
    assert engine_batches(items) == [[0, 2], [1, 4], [3]]


def test_engine_batches_respect_images_and_prompt_limits():
    # capacity in images: a 2-image row fills the batch; max_requests caps prompts (CFG rows)
    assert engine_batches([row("a", 2), row("a"), row("a")]) == [[0], [1, 2]]
    assert engine_batches([row("a", capacity=4, max_requests=1)] * 3) == [[0], [1], [2]]
    assert engine_batches([row("a", 1, 3), row("a", 2, 3), row("a", 1, 3)]) == [[0, 1], [2]]
    assert engine_batches([]) == []


def test_read_rows_gives_serve_fields_per_row_and_names_bad_text():
    columns = {
        "prompt": np.array([[b"a cat"], ["un caf\u00e9".encode()]], dtype=object),
        "width": np.array([[64], [128]], dtype=np.int32),
        "guidance_scale": np.array([[3.7], [1.0]]),
        "skip_layer_guidance": np.array([[True], [False]]),
    }
    rows = read_rows(columns, 2)
    assert rows == [
        {"prompt": "a cat", "width": 64, "guidance_scale": 3.7, "skip_layer_guidance": True},
        {"prompt": "un café", "width": 128, "guidance_scale": 1.0, "skip_layer_guidance": False},
    ]
    assert type(rows[0]["width"]) is int and type(rows[0]["guidance_scale"]) is float
    with pytest.raises(RequestError) as err:
        read_rows({"negative_prompt": np.array([[b"\xc3"]], dtype=object)}, 1)
    assert err.value.field == "negative_prompt" and "UTF-8" in str(err.value)


def test_controlnet_inputs_take_one_value_per_control_image():
    columns = {
        "control_type": np.array([[b"canny", b"blur"]], dtype=object),
        "controlnet_conditioning_scale": np.array([[0.5]]),
    }
    assert read_rows(columns, 1) == [
        {"control_type": ["canny", "blur"], "controlnet_conditioning_scale": 0.5}
    ]
    with pytest.raises(RequestError) as err:
        read_rows({"width": np.array([[64, 64]], dtype=np.int32)}, 1)  # not a ControlNet field
    assert err.value.field == "width" and "expected [1, 1]" in str(err.value)
    with pytest.raises(RequestError) as err:
        read_rows({"control_type": np.zeros((1, 0), dtype=object)}, 1)
    assert err.value.field == "control_type"


def test_inputs_are_the_fields_of_serve_and_their_aliases():
    from sd35trt.parameters import BY_WIRE_NAME
    from sd35trt.serve.schemas import SCHEDULING_FIELDS, GenerateBody

    assert {BY_WIRE_NAME[n].wire for n in INPUT_NAMES} == set(GenerateBody.model_fields) - set(
        SCHEDULING_FIELDS
    )
    assert {"steps", "guidance"} <= set(INPUT_NAMES)


def test_an_alias_input_reaches_the_runtime_under_its_parameter_name():
    rows = read_rows({"prompt": np.array([[b"a"], [b"b"]], dtype=object), "steps": np.array([[3], [4]])}, 2)
    assert [r["num_inference_steps"] for r in rows] == [3, 4] and "steps" not in rows[0]
    both = {
        "prompt": np.array([[b"a"]], dtype=object),
        "steps": np.array([[3]]),
        "num_inference_steps": np.array([[3]]),
    }
    with pytest.raises(RequestError, match="num_inference_steps and steps are the same parameter") as err:
        read_rows(both, 1)
    assert err.value.field == "num_inference_steps"


def parse(text: str):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_tensorrt_engines_get_gpu_instances_on_the_listed_gpus():
    settings = TritonRepoSettings(gpus=(0, 3), instances_per_gpu=2, batch_window_ms=2.5)
    text = render_config(settings, backend=Backend.TENSORRT, max_batch_size=4, engines_dir="engines")
    config = parse(text)
    group = config.instance_group[0]
    assert (group.kind, list(group.gpus), group.count) == (group.KIND_GPU, [0, 3], 2)
    assert config.max_batch_size == 4 and config.dynamic_batching.max_queue_delay_microseconds == 2500
    every_gpu = render_config(
        TritonRepoSettings(), backend=Backend.TENSORRT, max_batch_size=1, engines_dir="e"
    )
    assert list(parse(every_gpu).instance_group[0].gpus) == []  # Triton: one group per visible GPU


def test_onnxruntime_engines_refuse_gpus():
    with pytest.raises(ConfigError, match="--gpus 1 applies to TensorRT engines"):
        render_config(
            TritonRepoSettings(gpus=(1,)), backend=Backend.ONNXRUNTIME, max_batch_size=2, engines_dir="e"
        )


def test_parameters_survive_any_path_text():
    path = '/srv/mod\u00e8les/"quoted" \\ dir'
    assert parse(f"name: {pbtxt_string(path)}").name == path
    config = parse(
        render_config(TritonRepoSettings(), backend=Backend.ONNXRUNTIME, max_batch_size=2, engines_dir=path)
    )
    assert config.parameters["engines_dir"].string_value == path


def test_warmup_files_use_tritons_raw_format():
    raw = {w.name: w.raw() for w in WARMUP}
    assert raw["prompt"] == struct.pack("<I", 7) + b"warm-up"
    assert raw["num_inference_steps"] == struct.pack("<i", 1)
    assert raw["seed"] == struct.pack("<q", 0)
    assert {w.dtype for w in WARMUP} <= set(TritonType)


def test_launcher_points_the_stub_at_this_interpreter_and_the_backend_environment(tmp_path):
    env = BackendEnvironment(tmp_path / "env")
    server = LocalTritonServer(tmp_path / "repo", env=env)
    variables = server.environment()
    assert variables["LD_LIBRARY_PATH"].split(":")[0] == sysconfig.get_config_var("LIBDIR")
    assert variables["PATH"].split(":")[0] == str(tmp_path / "env" / "bin")
    with pytest.raises(BackendUnavailableError, match=f"no Triton backend environment at {tmp_path / 'env'}"):
        env.check()


def test_link_project_adds_this_environment_after_the_backend_one(tmp_path):
    pth = BackendEnvironment(tmp_path / "env").link_project()
    root = str(tmp_path / "env")
    assert pth.parent == Path(sysconfig.get_path("purelib", vars={"base": root, "platbase": root}))
    assert repr(sysconfig.get_path("purelib")) in pth.read_text()
    assert sys.prefix not in str(pth)
