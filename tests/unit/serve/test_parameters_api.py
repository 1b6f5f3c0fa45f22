"""The declared parameters over HTTP, on a real server on 127.0.0.1: aliases (``steps``), OpenAI's
``quality`` / ``style`` (accepted, reported as without effect), ``GET /v1/models`` and
``POST /v1/images/edits`` (OpenAI's multipart form, sent by the official ``openai`` client).

The server is the real app with the real ``RuntimeGenerator`` and the real request validation
(:func:`resolve_request` against the tiny model's profiles); only the engines are replaced: an
engine batch returns the initial image (image-to-image) or a flat image of the requested size.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass

import httpx
import pytest
from serving import live_server

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from request_fakes import CONFIG, limits  # noqa: E402

from sd35trt.runtime.request import RequestLimits, resolve_request  # noqa: E402

GENERATE, OPENAI, EDITS, MODELS = "/generate", "/v1/images/generations", "/v1/images/edits", "/v1/models"


@dataclass
class _Info:
    limits: RequestLimits
    defaults: object
    model: dict


class FakeEngineRuntime:
    """``Sd35Runtime``'s interface with real validation and no engines."""

    def __init__(self) -> None:
        runtime = CONFIG.runtime.model_copy(update={"skip_layer_guidance": None})
        self.info = _Info(limits(slg=False), runtime, {"hub": {"repo_id": "someone/sd3.5-tiny"}})
        self.seen: list = []

    def validate(self, request):
        return resolve_request(request, self.info.limits, self.info.defaults)

    def generate_batch(self, batch):
        from PIL import Image

        from sd35trt.runtime.pipeline import GenerationResult, Timings

        self.seen.extend(batch)
        out = []
        for p in batch:
            image = (
                p.image
                if p.image is not None
                else Image.new("RGB", (p.width, p.height), (p.seed % 256, 0, 0))
            )
            out.append(GenerationResult([image] * p.num_images, p, Timings(), tuple(p.warnings), "fake"))
        return out


@pytest.fixture(scope="module")
def runtime():
    return FakeEngineRuntime()


@pytest.fixture(scope="module")
def server(runtime):
    with live_server(runtime, batch_window_ms=0, timeout_s=30) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def _png(width: int, height: int, color=(10, 200, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def _recorded(b64: str) -> dict:
    from PIL import Image

    return json.loads(Image.open(io.BytesIO(base64.b64decode(b64))).text["parameters"])


def test_generate_takes_steps_and_guidance_as_aliases(server, runtime):
    r = httpx.post(server.url + GENERATE, json={"prompt": "a cat", "steps": 3, "guidance": 2.0, "seed": 1})
    assert r.status_code == 200, r.text
    assert r.json()["parameters"]["num_inference_steps"] == 3 and runtime.seen[-1].guidance_scale == 2.0
    assert _recorded(r.json()["images"][0])["num_inference_steps"] == 3


def test_a_parameter_under_two_names_is_refused_naming_it(server):
    r = httpx.post(server.url + GENERATE, json={"prompt": "a cat", "steps": 3, "num_inference_steps": 3})
    assert r.status_code == 422, r.text
    (detail,) = r.json()["detail"]
    assert detail["loc"] == ["body", "num_inference_steps"]
    assert "num_inference_steps and steps are the same parameter" in detail["msg"]


def test_an_alias_is_checked_like_its_parameter(server):
    r = httpx.post(server.url + GENERATE, json={"prompt": "a cat", "steps": 0})
    assert r.status_code == 422
    assert r.json()["detail"][0]["msg"] == "num_inference_steps 0 is outside 1..500"


def test_openai_takes_steps_and_reports_quality_and_style_as_without_effect(server, client):
    response = client.images.generate(
        prompt="a cat", size="64x64", quality="hd", style="vivid", extra_body={"steps": 2, "seed": 4}
    )
    assert _recorded(response.data[0].b64_json)["num_inference_steps"] == 2
    warnings = response.model_extra["warnings"]
    assert any(w.startswith("quality 'hd' has no effect") for w in warnings)
    assert any(w.startswith("style 'vivid' has no effect") for w in warnings)
    r = httpx.post(server.url + OPENAI, json={"prompt": "a cat", "quality": "ultra"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "quality"


def test_v1_models_lists_the_served_model(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["someone/sd3.5-tiny"]
    assert models.data[0].object == "model" and models.data[0].created > 1_700_000_000


def test_v1_images_edits_runs_image_to_image_with_the_uploaded_file(server, client, runtime):
    response = client.images.edit(
        image=("start.png", _png(96, 80), "image/png"),
        prompt="a cat",
        n=2,
        size="64x64",
        extra_body={"strength": 0.5, "steps": 4, "seed": 9},
    )
    assert len(response.data) == 2 and response.size == "64x64"
    used = runtime.seen[-1]
    assert (used.strength, used.num_inference_steps, used.num_images) == (0.5, 4, 2)
    assert used.image.size == (64, 64) and used.image.getpixel((5, 5)) == (10, 200, 30)
    recorded = _recorded(response.data[1].b64_json)
    assert recorded["strength"] == 0.5 and len(recorded["init_image_sha256"]) == 64


PNG = ("s.png", _png(64, 64), "image/png")


@pytest.mark.parametrize(
    ("files", "data", "param", "needle"),
    [
        ({"prompt": (None, "a cat")}, {}, "image", "exactly one image file (got 0)"),
        ({"image": PNG, "mask": PNG}, {"prompt": "a cat"}, "mask", "mask is not served"),
        ({"image": PNG}, {"prompt": "a cat", "n": "two"}, "n", "'two' is not an integer"),
        (
            {"image": PNG},
            {"prompt": "a cat", "strength": "1.5"},
            "strength",
            "strength 1.5 is outside (0, 1]",
        ),
        ({"image": PNG}, {"prompt": "a cat", "colour": "red"}, "colour", "Extra inputs are not permitted"),
        (
            {"image": ("s.png", b"not a png", "image/png")},
            {"prompt": "a cat"},
            "image",
            "is not a PNG, JPEG or WebP image",
        ),
    ],
    ids=["no-image", "mask", "n", "strength", "unknown", "not-an-image"],
)
def test_v1_images_edits_refuses_what_it_cannot_serve_naming_the_field(server, files, data, param, needle):
    r = httpx.post(server.url + EDITS, files=files, data=data, timeout=30)  # multipart: files are given
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"] == param and needle in error["message"], error


def test_v1_images_edits_wants_a_form(server):
    r = httpx.post(server.url + EDITS, json={"prompt": "a cat"})
    assert r.status_code == 422 and "multipart/form-data" in r.json()["error"]["message"]


def test_unknown_paths_and_methods_answer_the_common_error_body(server):
    """faults.md #50: 404 and 405 in the body every other error has (were FastAPI's ``{"detail": ...}``)."""
    r = httpx.get(server.url + "/nope")
    assert r.status_code == 404
    assert r.json() == {"status": "error", "error": "not_found", "detail": "GET /nope: Not Found"}
    r = httpx.get(server.url + GENERATE)
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json()["error"] == "method_not_allowed"
    r = httpx.get(server.url + "/v1/images/nope")  # the OpenAI routes answer in OpenAI's shape
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
