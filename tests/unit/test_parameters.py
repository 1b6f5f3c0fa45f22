"""The declared generation parameters and what each surface derives from them."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from sd35trt.cli import app
from sd35trt.cli_options import generation_options
from sd35trt.errors import RequestError
from sd35trt.parameters import GENERATION_PARAMS, PARAMS, canonical_fields, check_value
from sd35trt.runtime.request import GenerationRequest


def test_every_declared_parameter_is_a_field_of_the_request_and_back():
    assert [p.name for p in GENERATION_PARAMS] == [f.name for f in dataclasses.fields(GenerationRequest)]


def test_serve_and_triton_take_the_declared_names_and_aliases():
    pytest.importorskip("fastapi")
    from sd35trt.serve.schemas import SCHEDULING_FIELDS, GenerateBody, OpenAIImagesBody
    from sd35trt.triton.spec import INPUTS, TritonType

    assert [n for n in GenerateBody.model_fields if n not in SCHEDULING_FIELDS] == [
        p.wire for p in GENERATION_PARAMS
    ]
    steps = GenerateBody.model_fields["num_inference_steps"]
    assert steps.validation_alias.choices == ["num_inference_steps", "steps"]
    assert steps.description.startswith(PARAMS["num_inference_steps"].help)
    assert {"negative_prompt", "num_inference_steps", "strength"} <= set(OpenAIImagesBody.model_fields)
    triton = {t.name: t for t in INPUTS}
    assert (
        triton["seed"].dtype is TritonType.INT64 and triton["num_inference_steps"].dtype is TritonType.INT32
    )
    assert triton["steps"].dtype is TritonType.INT32 and triton["init_image"].dtype is TritonType.STRING
    assert [t.name for t in INPUTS if not t.optional] == ["prompt"]


def test_canonical_fields_maps_aliases_and_refuses_both_spellings():
    assert canonical_fields({"prompt": "a", "steps": 3, "guidance": None, "batch": "alone"}) == {
        "prompt": "a",
        "num_inference_steps": 3,
        "batch": "alone",
    }
    assert canonical_fields({"init_image": "x"}) == {"init_image": "x"}
    assert canonical_fields({"init_image": "x"}, wire=False) == {"image": "x"}
    with pytest.raises(RequestError, match=r"^guidance_scale and guidance are the same parameter") as err:
        canonical_fields({"guidance": 2.0, "guidance_scale": 3.0})
    assert err.value.field == "guidance_scale"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("num_inference_steps", 0, "num_inference_steps 0 is outside 1..500"),
        ("num_inference_steps", np.bool_(True), "num_inference_steps np.True_ is not an integer"),
        ("guidance_scale", math.inf, "guidance_scale inf is not a finite number; use 0..100"),
        ("strength", 0.0, r"strength 0 is outside \(0, 1\]"),
        ("seed", 2**63, "seed 9223372036854775808 is outside 0..9223372036854775807"),
        ("skip_layer_guidance", 1, "skip_layer_guidance 1 is not true or false"),
        ("prompt", " ", "prompt is empty"),
    ],
)
def test_check_value_names_the_parameter_the_value_and_the_bounds(name, value, message):
    with pytest.raises(RequestError, match=message) as err:
        check_value(name, value)
    assert err.value.field == name


def test_check_value_returns_plain_python_values():
    assert type(check_value("seed", np.int64(7))) is int and check_value("strength", np.float32(0.5)) == 0.5
    assert check_value("strength", 1) == 1.0 and type(check_value("strength", 1)) is float


def test_a_command_gets_the_declared_options_with_their_aliases():
    probe = typer.Typer(rich_markup_mode=None, pretty_exceptions_enable=False)
    seen = {}

    @probe.command()
    @generation_options("prompt", "num_inference_steps", "guidance_scale", "skip_layer_guidance", "image")
    def go(generation: dict, count: int = 1) -> None:
        seen.update(generation, count=count)

    result = CliRunner().invoke(
        probe, ["a cat", "--steps", "3", "--guidance", "2.5", "--no-skip-layer-guidance"]
    )
    assert result.exit_code == 0, result.output
    assert seen == {
        "prompt": "a cat",
        "num_inference_steps": 3,
        "guidance_scale": 2.5,
        "skip_layer_guidance": False,
        "image": None,
        "count": 1,
    }
    bad = CliRunner().invoke(probe, ["a cat", "--steps", "three"])
    assert bad.exit_code == 2 and "'--steps'" in bad.output
    both = CliRunner().invoke(probe, ["a cat", "--steps", "3", "--num-inference-steps", "4"])
    assert "--num-inference-steps and --steps are the same parameter" in str(both.exception)


@pytest.mark.parametrize("command", ["run", "bench", "reference"])
def test_run_bench_and_reference_show_the_declared_help(command):
    result = CliRunner().invoke(app, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "--steps <int> Same as --num-inference-steps." in " ".join(result.output.split())
    assert "--guidance <float> Same as --guidance-scale." in " ".join(result.output.split())
    help_words = PARAMS["num_inference_steps"].help[1:20]
    assert help_words in result.output
    if command == "bench":
        assert "--prompt" in result.output and "--num-images" in result.output


def test_controlnet_options_repeat_and_pair_in_order():
    probe = typer.Typer(rich_markup_mode=None, pretty_exceptions_enable=False)
    seen = {}
    names = ("prompt", "control_image", "control_type", "controlnet_conditioning_scale")

    @probe.command()
    @generation_options(*names)
    def go(generation: dict) -> None:
        seen.clear()
        seen.update(generation)

    two = ["p", "--control-image", "a.png", "--control-type", "canny", "--control-image", "b.png"]
    result = CliRunner().invoke(
        probe, [*two, "--control-type", "blur", "--controlnet-conditioning-scale", "0.5"]
    )
    assert result.exit_code == 0, result.output
    assert seen == {
        "prompt": "p",
        "control_image": [Path("a.png"), Path("b.png")],
        "control_type": ["canny", "blur"],
        "controlnet_conditioning_scale": 0.5,  # one value: for every control image
    }
    result = CliRunner().invoke(probe, ["p", "--control-image", "a.png"])
    assert result.exit_code == 0, result.output
    assert seen["control_image"] == Path("a.png") and seen["control_type"] is None


def test_controlnet_fields_take_lists_over_http_and_name_the_index():
    from pydantic import ValidationError

    from sd35trt.serve.schemas import GenerateBody

    body = GenerateBody.model_validate(
        {"prompt": "p", "control_image": ["YQ==", "Yg=="], "controlnet_conditioning_scale": [1.0, 0.5]}
    )
    fields = body.generation_fields()
    assert fields["control_image"] == ["YQ==", "Yg=="] and fields["controlnet_conditioning_scale"] == [
        1.0,
        0.5,
    ]
    assert GenerateBody.model_validate({"prompt": "p", "control_type": "canny"}).control_type == "canny"
    with pytest.raises(ValidationError, match="control_guidance_end"):
        GenerateBody.model_validate({"prompt": "p", "control_guidance_end": ["late"]})
    with pytest.raises(RequestError) as err:
        check_value("control_guidance_end", 1.5, 1)
    assert err.value.field == "control_guidance_end" and str(err.value).startswith(
        "control_guidance_end[1] 1.5"
    )
