"""What ``bench`` generates: the engines' recorded defaults, replaced by the declared options."""

from __future__ import annotations

import json

import pytest
from request_fakes import CONFIG, engines_manifest
from typer.testing import CliRunner

from sd35trt.artifacts.engine_manifest import ENGINE_MANIFEST_NAME, read_engine_manifest
from sd35trt.bench.benchmark import DEFAULT_PROMPT, BenchOptions, run_params
from sd35trt.cli import app
from sd35trt.components import Component
from sd35trt.errors import ConfigError, RequestError


def test_the_engine_manifest_is_read_typed_and_in_execution_order(tmp_path):
    engines = engines_manifest(tmp_path / "engines")
    path = engines / ENGINE_MANIFEST_NAME
    data = json.loads(path.read_text())
    data["engines"] = dict(reversed(data["engines"].items()))
    path.write_text(json.dumps(data))
    manifest = read_engine_manifest(engines)
    assert manifest.runtime_defaults == CONFIG.runtime  # typed, not a mapping each reader re-validates
    assert list(manifest.engines) == list(Component)
    assert manifest.to_json()["runtime_defaults"] == CONFIG.runtime.model_dump(mode="json")


def test_bench_generates_with_the_recorded_defaults(tmp_path):
    params, max_len = run_params(engines_manifest(tmp_path / "engines"))
    rt = CONFIG.runtime
    assert (params.prompt, params.seed, params.num_images) == (DEFAULT_PROMPT, 0, 1)
    assert (params.num_inference_steps, params.guidance_scale, params.height) == (
        rt.num_inference_steps,
        rt.guidance_scale,
        rt.height,
    )
    assert params.skip_layer_guidance == rt.skip_layer_guidance and max_len == rt.max_sequence_length


def test_bench_options_replace_them_under_any_spelling_and_are_checked(tmp_path):
    engines = engines_manifest(tmp_path / "engines")
    params, _ = run_params(engines, {"steps": 3, "guidance": 1.0, "num_images": 2, "prompt": "a fox"})
    assert (params.num_inference_steps, params.guidance_scale, params.num_images) == (3, 1.0, 2)
    assert params.negative_prompt is None and params.skip_layer_guidance is None  # no CFG: neither is used
    with pytest.raises(
        RequestError, match=r"width 1000 is not a multiple of 16; these engines accept 64\.\.192"
    ):
        run_params(engines, {"width": 1000})


def test_bench_command_parses_the_declared_options_and_refuses_bad_ones(tmp_path):
    engines = engines_manifest(tmp_path / "engines")
    result = CliRunner().invoke(app, ["bench", "--engines", str(engines), "--steps", "0"])
    assert isinstance(result.exception, RequestError), result.output
    assert str(result.exception) == "num_inference_steps 0 is outside 1..500"
    with pytest.raises(ConfigError, match="--runs >= 1"):
        BenchOptions(runs=0)
