"""The server's interfaces against the tiny engines on 127.0.0.1: the seeds' ``/generate`` contract,
the OpenAI Images API (with the official ``openai`` client), Prometheus ``/metrics`` (parsed with
prometheus-client's own parser), request ids in responses and JSON log lines, and input that JSON
can carry but the schema cannot hold (faults.md cases 11, 17 and 18).

One server for the module (a queue of one request, so a 429 is cheap to provoke); tests that
count use deltas between two scrapes.
"""

from __future__ import annotations

import base64
import io
import json
import re
import threading

import httpx
import openai
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from serving import SMALL, decode_png, live_server, wait_until

pytestmark = pytest.mark.slow

BODY_LIMIT = 20_000
GENERATE, OPENAI = "/generate", "/v1/images/generations"


@pytest.fixture(scope="module")
def server(runtime):
    with live_server(
        runtime,
        queue_size=1,
        batch_window_ms=0,
        timeout_s=120,
        max_body_bytes=BODY_LIMIT,
        log_level="info",
        log_format="json",
    ) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def raw_post(server, path: str, body: bytes, headers: dict | None = None, http=httpx) -> httpx.Response:
    headers = {"content-type": "application/json", **(headers or {})}
    return http.post(server.url + path, content=body, headers=headers, timeout=120)


def field_of(r: httpx.Response) -> tuple[str, str]:
    """(field, message) of a 422 in either API's shape."""
    data = r.json()
    if "error" in data and isinstance(data["error"], dict):
        return data["error"]["param"], data["error"]["message"]
    detail = data["detail"][0]
    return ".".join(str(p) for p in detail["loc"][1:]) or "body", detail["msg"]


# -- the seeds' /generate contract ------------------------------------------------------------------


def test_generate_follows_the_seeds_contract(server, runtime):
    r = httpx.post(server.url + GENERATE, json={"prompt": "a cat", "seed": 1}, timeout=120)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["status"] == "success" and isinstance(data["images"][0], str)
    png = base64.b64decode(data["images"][0])
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(png))
    recorded = json.loads(image.text["parameters"])
    assert recorded["prompt"] == "a cat" and recorded["seed"] == 1
    d = runtime.info.defaults  # omitted fields take the engines' defaults
    steps = d.num_inference_steps
    assert (recorded["width"], recorded["height"], recorded["num_inference_steps"]) == (
        d.width,
        d.height,
        steps,
    )
    assert data["parameters"]["seed"] == 1 and data["parameters"]["num_inference_steps"] == steps
    assert data["info"] == [{"index": 0, "seed": 1, "width": d.width, "height": d.height}]
    assert {"timings", "batch", "warnings"} <= set(data)
    assert httpx.get(server.url + "/health").json()["status"] == "alive"


def test_more_images_than_the_engine_batch_each_with_its_own_seed(server, runtime):
    """5 images on batch-2 engines: three engine batches (2, 2, 1); image i has seed 40 + i in its
    PNG and in ``info``, and a one-image request with that seed gives the same pixels (exactly for
    image 4, which ran alone; within the ~1/255 of another engine batch size for the others)."""
    import numpy as np

    body = {"prompt": "a lighthouse", "seed": 40, "num_images": 5, **SMALL}
    r = httpx.post(server.url + GENERATE, json=body, timeout=120)
    assert r.status_code == 200, r.text
    data = r.json()
    assert [i["seed"] for i in data["info"]] == [40, 41, 42, 43, 44]
    assert data["parameters"]["seed"] == 40 and data["parameters"]["num_images"] == 5
    images = [decode_png(b) for b in data["images"]]
    recorded = [json.loads(im.text["parameters"]) for im in images]
    assert [(m["seed"], m["image_index"], m["num_images"]) for m in recorded] == [
        (40 + i, i, 5) for i in range(5)
    ]
    assert [m["engine_batch"]["images"] for m in recorded] == [2, 2, 2, 2, 1]
    for i, meta in enumerate(recorded):
        alone = httpx.post(
            server.url + GENERATE, json={**body, "seed": meta["seed"], "num_images": 1}, timeout=120
        ).json()
        diff = np.abs(np.asarray(decode_png(alone["images"][0]), np.int16) - np.asarray(images[i], np.int16))
        assert diff.max() <= (0 if i == 4 else 1), (i, diff.max())


# -- the OpenAI Images API -----------------------------------------------------------------------------


def test_openai_client_gets_a_png_of_the_requested_size(server, client):
    response = client.images.generate(prompt="a cat", size="128x128", response_format="b64_json")
    (item,) = response.data
    image = decode_png(item.b64_json)
    assert image.size == (128, 128)
    assert response.created > 0 and response.size == "128x128"


def test_openai_client_n_and_sd35_extras(server, client):
    response = client.images.generate(
        prompt="two boats",
        n=2,
        size="96x64",
        extra_body={"seed": 7, "num_inference_steps": 2, "guidance_scale": 3.0, "negative_prompt": "fog"},
    )
    images = [decode_png(d.b64_json) for d in response.data]
    assert [i.size for i in images] == [(96, 64)] * 2
    recorded = json.loads(images[1].text["parameters"])
    # image 1 of a request seeded 7 is drawn from seed 8, and its PNG says so
    assert (recorded["seed"], recorded["num_inference_steps"], recorded["guidance_scale"]) == (8, 2, 3.0)
    assert recorded["negative_prompt"] == "fog" and recorded["image_index"] == 1
    # the same request on /generate gives the same bytes
    same = httpx.post(
        server.url + GENERATE,
        json={
            "prompt": "two boats",
            "num_images": 2,
            "width": 96,
            "height": 64,
            "seed": 7,
            "num_inference_steps": 2,
            "guidance_scale": 3.0,
            "negative_prompt": "fog",
        },
        timeout=120,
    ).json()
    assert [base64.b64decode(b) for b in same["images"]] == [
        base64.b64decode(d.b64_json) for d in response.data
    ]


@pytest.mark.parametrize(
    ("openai_fields", "generate_fields", "param"),
    [
        ({"size": "100x64"}, {"width": 100, "height": 64}, "size"),
        ({"size": "64x512"}, {"width": 64, "height": 512}, "size"),
        ({"n": 17}, {"num_images": 17}, "n"),  # beyond max_images (16)
        ({"extra_body": {"num_inference_steps": 0}}, {"num_inference_steps": 0}, "num_inference_steps"),
        ({"extra_body": {"seed": -1}}, {"seed": -1}, "seed"),
    ],
    ids=["width", "height", "n", "steps", "seed"],
)
def test_openai_errors_have_the_openai_shape_and_our_messages(
    server, client, openai_fields, generate_fields, param
):
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.images.generate(prompt="a cat", **openai_fields)
    ours = httpx.post(server.url + GENERATE, json={"prompt": "a cat", **generate_fields}, timeout=30)
    assert ours.status_code == 422
    assert err.value.body["param"] == param
    assert err.value.body["message"] == ours.json()["detail"][0]["msg"]
    assert err.value.body["type"] == "invalid_request_error"


def test_openai_edits_give_the_bytes_of_generate_with_the_same_init_image(server, client):
    """``/v1/images/edits`` (OpenAI's multipart form) is ``/generate`` with ``init_image``."""
    buf = io.BytesIO()
    Image.new("RGB", (80, 72), (200, 120, 40)).save(buf, format="PNG")
    response = client.images.edit(
        image=("start.png", buf.getvalue(), "image/png"),
        prompt="a boat",
        size="64x64",
        extra_body={"seed": 5, "steps": 2, "strength": 0.5},
    )
    same = httpx.post(
        server.url + GENERATE,
        json={
            "prompt": "a boat",
            "width": 64,
            "height": 64,
            "seed": 5,
            "num_inference_steps": 2,
            "strength": 0.5,
            "init_image": base64.b64encode(buf.getvalue()).decode(),
        },
        timeout=120,
    )
    assert same.status_code == 200, same.text
    assert base64.b64decode(same.json()["images"][0]) == base64.b64decode(response.data[0].b64_json)
    assert json.loads(decode_png(response.data[0].b64_json).text["parameters"])["strength"] == 0.5


@pytest.mark.parametrize(
    ("fields", "param", "needle"),
    [
        ({"size": "big"}, "size", "WIDTHxHEIGHT"),
        ({"response_format": "url"}, "response_format", "b64_json"),
        ({"output_format": "webp"}, "output_format", "png"),
        ({"style": "cartoon"}, "style", "'vivid' or 'natural'"),
        ({"colour": "red"}, "colour", "Extra inputs are not permitted"),
        ({"n": 1.5}, "n", "integer"),
    ],
)
def test_openai_requests_we_cannot_serve_are_refused_naming_the_parameter(server, fields, param, needle):
    r = httpx.post(server.url + OPENAI, json={"prompt": "a cat", **fields}, timeout=30)
    assert r.status_code == 422, r.text
    assert field_of(r)[0] == param and needle in field_of(r)[1]


# -- what JSON can carry and the schema cannot hold (faults.md cases 17 and 18) -------------------------

GENERATE_FIELDS = [
    "prompt",
    "negative_prompt",
    "width",
    "height",
    "num_inference_steps",
    "guidance_scale",
    "num_images",
    "seed",
    "skip_layer_guidance",
]
OPENAI_FIELDS = [
    "prompt",
    "model",
    "n",
    "size",
    "response_format",
    "output_format",
    "user",
    "negative_prompt",
    "seed",
    "num_inference_steps",
    "guidance_scale",
    "skip_layer_guidance",
]
NON_FINITE = ["NaN", "Infinity", "-Infinity", "1e309"]


@pytest.mark.parametrize(("path", "fields"), [(GENERATE, GENERATE_FIELDS), (OPENAI, OPENAI_FIELDS)])
def test_non_finite_numbers_in_any_field_get_422_naming_the_field(server, path, fields):
    """faults.md case 17: NaN, Infinity and 1e309 (read as infinity) in every field of both APIs."""
    before = len(server.log.getvalue())
    wrong = []
    http = httpx.Client()  # one kept-alive connection for the ~50 requests
    for field in fields:
        for literal in NON_FINITE:
            others = {"prompt": "a cat", **SMALL} if path == GENERATE else {"prompt": "a cat"}
            others.pop(field, None)
            items = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in others.items()]
            body = "{" + ", ".join([*items, f'"{field}": {literal}']) + "}"
            r = raw_post(server, path, body.encode(), http=http)
            if r.status_code != 422 or field_of(r)[0] != field or "finite" not in field_of(r)[1]:
                wrong.append((field, literal, r.status_code, r.text[:200]))
    # nested, and the whole body
    for body in (b'{"prompt": "a", "extra": [NaN]}', b"NaN", b"[Infinity]"):
        r = raw_post(server, path, body, http=http)
        if r.status_code != 422:
            wrong.append((body, r.status_code, r.text[:200]))
    http.close()
    assert wrong == []
    assert "Traceback" not in server.log.getvalue()[before:]


@pytest.mark.parametrize("path", [GENERATE, OPENAI])
@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_a_lone_surrogate_in_a_prompt_gets_422_naming_the_field(server, path, field):
    """faults.md case 18: "\\ud800" in JSON is a lone UTF-16 surrogate, not text."""
    body = {"prompt": "a cat", field: "a \\ud800 b"} | ({} if path == OPENAI else SMALL)
    text = json.dumps(body).replace("\\\\ud800", "\\ud800")  # the JSON escape itself, unpaired
    assert "\\ud800" in text and "\\\\ud800" not in text
    r = raw_post(server, path, text.encode())
    assert r.status_code == 422, r.text
    name, msg = field_of(r)
    assert name == field and "lone surrogate" in msg and "\\ud800" in msg


@pytest.mark.parametrize("path", [GENERATE, OPENAI])
def test_text_that_is_not_unicode_anywhere_in_the_body_gets_422(server, path):
    """faults.md case 18: invalid UTF-8 bytes, a surrogate in a key, an integer Python cannot read."""
    before = len(server.log.getvalue())
    for body in (
        b'{"prompt": "a \xff cat"}',
        b'{"prompt": "a cat", "\\udc80": 1}',
        b'{"prompt": "a cat", "seed": ' + b"9" * 5000 + b"}",
    ):
        r = raw_post(server, path, body)
        assert r.status_code == 422, (body[:40], r.text)
        assert field_of(r)[0] in ("body", "seed")
    assert "Traceback" not in server.log.getvalue()[before:]


def test_truncation_warnings_are_capped_whatever_the_prompt_length(server):
    """faults.md case 11 (and issue: a 64 KB prompt gave a 400 KB response): each warning quotes
    at most 80 dropped characters and counts the rest."""
    prompt = "a garden with many flowers " * 700  # ~19 kB, just under the body limit
    r = httpx.post(server.url + GENERATE, json={"prompt": prompt, **SMALL}, timeout=120)
    assert r.status_code == 200, r.text
    data = r.json()
    warnings = data["warnings"]
    assert len(warnings) == 3 and all(len(w) < 300 for w in warnings), warnings
    assert all("characters in all" in w for w in warnings)
    # the prompt is in the response twice (`parameters`, and the PNG's text chunk), not once per warning
    assert data["parameters"]["prompt"] == prompt
    assert len(r.content) < len(prompt) + len(data["images"][0]) + 4096


# -- request ids and log lines ----------------------------------------------------------------------------


def test_request_ids_are_returned_and_written_in_every_log_line_of_the_request(server):
    start = len(server.log.getvalue())
    given = httpx.post(
        server.url + GENERATE, json={"prompt": "a cat", **SMALL}, headers={"X-Request-ID": "rid-abc.123"}
    )
    made = httpx.post(server.url + GENERATE, json={"prompt": "a dog", **SMALL})
    invalid = httpx.post(server.url + GENERATE, json={"prompt": "a cat", "width": 100})
    forged = httpx.get(server.url + "/health", headers={"X-Request-ID": "x" * 200})
    too_big = raw_post(
        server, OPENAI, b'{"prompt": "' + b"x" * BODY_LIMIT + b'"}', {"X-Request-ID": "rid-big"}
    )
    assert [r.status_code for r in (given, made, invalid, forged, too_big)] == [200, 200, 422, 200, 413]
    ids = [r.headers["X-Request-ID"] for r in (given, made, invalid, forged, too_big)]
    assert ids[0] == "rid-abc.123" and ids[4] == "rid-big"
    for generated in (ids[1], ids[2], ids[3]):  # none given, or one that was not acceptable
        assert re.fullmatch("[0-9a-f]{32}", generated)
    assert len(set(ids)) == 5

    def lines_written() -> list[dict]:
        return [json.loads(line) for line in server.log.getvalue()[start:].splitlines()]

    wait_until(lambda: len(lines_written()) >= 5, 10, "the access lines")
    lines = lines_written()
    assert {line["request_id"] for line in lines} == set(ids)  # every line names its request
    by_id = {i: [line for line in lines if line["request_id"] == i] for i in ids}
    assert {line["logger"] for line in by_id[ids[0]]} == {"sd35trt.serve", "uvicorn.access"}
    access = next(line for line in by_id[ids[0]] if line["logger"] == "uvicorn.access")
    assert (access["method"], access["path"], access["status"]) == ("POST", GENERATE, 200)
    assert [line["status"] for line in by_id[ids[4]]] == [413]


# -- /metrics ----------------------------------------------------------------------------------------------


def scrape(server) -> dict[tuple, float]:
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def test_metrics_parse_and_count_what_was_sent(server, client):
    before = scrape(server)
    batches_before = server.batcher.stats().batches
    sent = {
        (GENERATE, "200"): 0,
        (GENERATE, "422"): 0,
        (GENERATE, "413"): 0,
        (GENERATE, "429"): 0,
        (OPENAI, "200"): 0,
        (OPENAI, "422"): 0,
    }
    for seed in (1, 2):
        assert (
            httpx.post(server.url + GENERATE, json={"prompt": "a", **SMALL, "seed": seed}).status_code == 200
        )
        sent[GENERATE, "200"] += 1
    client.images.generate(prompt="b", n=2, size="64x64", extra_body={"num_inference_steps": 2})
    sent[OPENAI, "200"] += 1
    assert httpx.post(server.url + GENERATE, json={"prompt": "a", "width": 100}).status_code == 422
    sent[GENERATE, "422"] += 1
    with pytest.raises(openai.UnprocessableEntityError):
        client.images.generate(prompt="b", size="100x100")
    sent[OPENAI, "422"] += 1
    assert raw_post(server, GENERATE, b'{"prompt": "' + b"x" * BODY_LIMIT + b'"}').status_code == 413
    sent[GENERATE, "413"] += 1
    # a queue of one: a second request while one waits gets 429
    server.batcher.pause()
    with httpx.Client(timeout=120) as http:
        queued: dict = {}
        t = threading.Thread(
            target=lambda: queued.update(r=http.post(server.url + GENERATE, json={"prompt": "q", **SMALL}))
        )
        t.start()
        wait_until(lambda: server.batcher.stats().queued == 1, 30, "a queued request")
        assert httpx.post(server.url + GENERATE, json={"prompt": "r", **SMALL}).status_code == 429
        server.batcher.resume()
        t.join(120)
    assert queued["r"].status_code == 200
    sent[GENERATE, "200"] += 1
    sent[GENERATE, "429"] += 1

    after = scrape(server)

    def delta(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    for (endpoint, status), n in sent.items():
        got = delta("sd35trt_http_requests_total", endpoint=endpoint, method="POST", status=status)
        assert got == n, (endpoint, status, got, n)
    assert delta("sd35trt_http_requests_total", endpoint="/metrics", method="GET", status="200") == 1
    assert delta("sd35trt_requests_rejected_total", reason="queue_full") == 1
    assert delta("sd35trt_requests_rejected_total", reason="body_too_large") == 1
    assert delta("sd35trt_requests_rejected_total", reason="invalid") == 2
    assert delta("sd35trt_images_generated_total") == 2 + 2 + 1
    batches = server.batcher.stats().batches - batches_before
    assert batches == 4  # no merging: one request at a time
    assert delta("sd35trt_engine_batch_images_count") == batches
    assert delta("sd35trt_engine_batch_images_sum") == 5
    assert delta("sd35trt_engine_batch_requests_sum") == 4
    for stage in ("text_encoding", "denoise", "decode", "engine_total"):
        assert delta("sd35trt_stage_duration_seconds_count", stage=stage) == batches
        assert delta("sd35trt_stage_duration_seconds_sum", stage=stage) > 0
    assert delta("sd35trt_queue_wait_seconds_count") == 4
    assert after[("sd35trt_queue_depth", ())] == 0 and after[("sd35trt_ready", ())] == 1
    assert after[("sd35trt_connections_open", ())] >= 1  # the scrape's own
    assert any(name.startswith("process_") for name, _ in after)
