"""The server's pure logic: log filters and formats, connection bound, error shapes, the OpenAI body."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from sd35trt.errors import ConfigError, RequestError
from sd35trt.serve.logs import REQUEST_ID, FloodFilter, JsonFormatter, RequestIdFilter, TextFormatter
from sd35trt.serve.settings import DEFAULT_MAX_CONNECTIONS, FD_RESERVE, connection_bound

fastapi = pytest.importorskip("fastapi")

from sd35trt.serve.middleware import request_id_of  # noqa: E402
from sd35trt.serve.responses import (  # noqa: E402
    OPENAI_NAMES,
    ApiError,
    ApiFlavor,
    FieldError,
    render,
    validation_errors,
)
from sd35trt.serve.schemas import OpenAIImagesBody  # noqa: E402


def record(msg: str, *args, level: int = logging.WARNING, name: str = "uvicorn.error") -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


# -- logs ---------------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_flood_filter_passes_a_burst_per_kind_and_window_then_reports_what_it_dropped():
    """faults.md case 19: an attack's thousand identical warnings become a handful of lines."""
    clock = Clock()
    f = FloodFilter(burst=3, window_s=10, clock=clock)
    passed = [f.filter(record("Invalid HTTP request received.")) for _ in range(1000)]
    assert sum(passed) == 3 and passed[:3] == [True] * 3
    assert f.filter(record("another kind %s", 1))  # kinds are counted apart
    assert f.filter(record("Invalid HTTP request received.", level=logging.INFO))  # below WARNING: always
    clock.now += 10
    first = record("Invalid HTTP request received.")
    assert f.filter(first)
    assert first.getMessage() == "Invalid HTTP request received. [997 more like this were suppressed]"
    # a %-template keeps working with the note appended
    assert f.filter(record("failed %s: %d%%", "x", 5)) and f.filter(record("failed %s: %d%%", "y", 6))
    assert f.filter(record("failed %s: %d%%", "z", 7)) and not f.filter(record("failed %s: %d%%", "w", 8))
    clock.now += 10
    again = record("failed %s: %d%%", "v", 9)
    assert f.filter(again) and again.getMessage() == "failed v: 9% [1 more like this were suppressed]"


def test_flood_filter_forgets_the_oldest_kinds_beyond_its_table():
    f = FloodFilter(burst=1, window_s=10, clock=Clock())
    for i in range(FloodFilter.MAX_KINDS + 50):
        assert f.filter(record(f"message {i}"))
    assert len(f._windows) <= FloodFilter.MAX_KINDS


def test_log_lines_carry_the_request_id_as_text_and_json():
    token = REQUEST_ID.set("rid-1")
    try:
        access = record(
            '%s - "%s %s HTTP/%s" %d', "1.2.3.4:5", "POST", "/generate", "1.1", 200, name="uvicorn.access"
        )
        access.levelno, access.levelname = logging.INFO, "INFO"
        RequestIdFilter().filter(access)
    finally:
        REQUEST_ID.reset(token)
    line = json.loads(JsonFormatter().format(access))
    assert line["request_id"] == "rid-1" and line["logger"] == "uvicorn.access"
    assert (line["method"], line["path"], line["status"], line["client"]) == (
        "POST",
        "/generate",
        200,
        "1.2.3.4:5",
    )
    assert "[rid-1]" in TextFormatter().format(access)
    outside = record("started")
    RequestIdFilter().filter(outside)
    assert json.loads(JsonFormatter().format(outside))["request_id"] is None
    assert "[-]" in TextFormatter().format(outside)


def test_log_lines_survive_text_that_is_not_unicode():
    """faults.md case 18: a lone surrogate in a message must not break the log stream."""
    rec = record("prompt %s", "a\udcffb")
    RequestIdFilter().filter(rec)
    assert "\\udcff" in TextFormatter().format(rec)
    assert json.loads(JsonFormatter().format(rec))["message"] == "prompt a\udcffb"
    try:
        raise ValueError("boom")
    except ValueError:
        rec = logging.LogRecord("sd35trt.serve", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert "ValueError: boom" in json.loads(JsonFormatter().format(rec))["exception"]


# -- connection bound ------------------------------------------------------------------------------------


def test_the_connection_bound_stays_below_the_fd_limit():
    """faults.md case 19: the attack ran the server out of file descriptors."""
    assert connection_bound(None, limit=1024) == 1024 - FD_RESERVE
    assert connection_bound(None, limit=1_000_000) == DEFAULT_MAX_CONNECTIONS
    assert connection_bound(500, limit=1024) == 500
    with pytest.raises(ConfigError, match=r"--max-connections 900 .*limit \(1024\).*at most 768"):
        connection_bound(900, limit=1024)
    with pytest.raises(ConfigError, match=r"limit \(200\) leaves no room"):
        connection_bound(None, limit=200)


def test_request_ids_are_kept_when_safe_and_made_otherwise():
    def scope(value: bytes | None) -> dict:
        return {"headers": [(b"x-request-id", value)] if value is not None else []}

    assert request_id_of(scope(b"abc-123_./:=")) == "abc-123_./:="
    for bad in (None, b"", b"has space", b"x" * 129, b"line\r\nbreak", "é".encode()):
        made = request_id_of(scope(bad))
        assert len(made) == 32 and int(made, 16) >= 0


# -- error shapes ------------------------------------------------------------------------------------------


def test_validation_errors_never_echo_non_finite_input_or_lone_surrogates():
    """faults.md cases 17 and 18: FastAPI's own handler answered 500 to these."""
    errors = validation_errors(
        [
            {
                "type": "int_type",
                "loc": ("body", "width"),
                "msg": "Input should be a valid integer",
                "input": float("nan"),
            },
            {"type": "finite_number", "loc": ("body", "guidance_scale"), "msg": "x", "input": float("inf")},
            {
                "type": "extra_forbidden",
                "loc": ("body", "a\ud800"),
                "msg": "Extra inputs are not permitted",
                "input": 1,
            },
            {
                "type": "json_invalid",
                "loc": ("body", 12),
                "msg": "JSON decode error",
                "ctx": {"error": "Expecting value"},
            },
        ]
    )
    assert [e.field for e in errors] == ["width", "guidance_scale", "a\\ud800", "body"]
    assert errors[0].msg.startswith("width NaN is not a finite number")
    assert errors[1].msg.startswith("guidance_scale Infinity is not a finite number")
    assert errors[3].msg == "body is not valid JSON at character 12: Expecting value"
    body = render(ApiError.invalid(errors), ApiFlavor.NATIVE).body
    assert json.loads(body)["detail"][2]["loc"] == ["body", "a\\ud800"]


def test_one_error_in_both_shapes():
    err = ApiError.from_request_error(RequestError("num_images", "num_images 3 is outside 1..2"))
    native = json.loads(render(err, ApiFlavor.NATIVE).body)
    assert native == {
        "status": "error",
        "detail": [
            {"loc": ["body", "num_images"], "msg": "num_images 3 is outside 1..2", "type": "value_error"}
        ],
    }
    openai = json.loads(render(err.renamed(OPENAI_NAMES), ApiFlavor.OPENAI).body)
    assert openai == {
        "error": {
            "message": "num_images 3 is outside 1..2",
            "type": "invalid_request_error",
            "param": "n",
            "code": "invalid_request",
        }
    }
    full = render(ApiError(429, "queue_full", "the queue is full", retry_after=3), ApiFlavor.OPENAI)
    assert full.status_code == 429 and full.headers["retry-after"] == "3"
    assert json.loads(full.body)["error"]["type"] == "rate_limit_error"
    nan = json.loads(
        render(ApiError(500, "non_finite", "NaN", extra={"stage": "vae"}), ApiFlavor.NATIVE).body
    )
    assert nan == {"status": "error", "error": "non_finite", "detail": "NaN", "stage": "vae"}
    assert FieldError(("body", "x"), "x", "m").to_json() == {
        "loc": ["body", "x"],
        "msg": "m",
        "type": "value_error",
    }


# -- the OpenAI Images body ----------------------------------------------------------------------


def test_openai_body_maps_onto_our_request():
    body = OpenAIImagesBody(prompt="a cat", n=2, size="96x64", model="sd3.5", seed=3, num_inference_steps=4)
    fields = body.generation_fields()
    assert (fields["width"], fields["height"], fields["num_images"]) == (96, 64, 2)
    assert (fields["seed"], fields["num_inference_steps"], fields["prompt"]) == (3, 4, "a cat")
    auto = OpenAIImagesBody(prompt="a cat", size="auto", response_format="b64_json").generation_fields()
    assert (auto["width"], auto["height"], auto["num_images"]) == (None, None, 1)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"size": "1024"}, "size"),
        ({"size": "64 x 64"}, "size"),
        ({"size": "123456x64"}, "size"),
        ({"response_format": "url"}, "response_format"),
        ({"output_format": "jpeg"}, "output_format"),
    ],
)
def test_openai_body_refuses_what_it_cannot_serve(fields, field):
    with pytest.raises(RequestError) as err:
        OpenAIImagesBody(prompt="a cat", **fields).generation_fields()
    assert err.value.field == field


# -- the CLI's serve options ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "said"),
    [
        (
            "--log-level",
            "verbose",
            "'verbose': Input should be 'critical', 'error', 'warning', 'info', 'debug' or 'trace'",
        ),
        ("--log-format", "yaml", "'yaml': Input should be 'text' or 'json'"),
        # the settings' own bounds (the options once re-spelled them and missed these: a traceback)
        ("--queue-size", "200000", "200000: Input should be less than or equal to 100000"),
        ("--batch-window-ms", "20000", "20000.0: Input should be less than or equal to 10000"),
        ("--timeout", "0", "0.0: Input should be greater than 0"),
        ("--timeout", "inf", "inf: Input should be a finite number"),  # was an OverflowError traceback
    ],
)
def test_serve_with_an_option_out_of_bounds_is_one_line_and_exit_1(tmp_path, option, value, said):
    """Issue: `serve --log-level verbose` gave a KeyError traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "sd35trt.cli", "serve", "--engines", str(tmp_path), option, value],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: {option} {said}"


def test_serve_options_are_the_settings_fields():
    """Every ServeSettings field the CLI takes is an option; help shows the fields' defaults and bounds."""
    from typer.testing import CliRunner

    from sd35trt.cli import app
    from sd35trt.cli_options import settings_flag
    from sd35trt.serve.settings import ServeSettings

    text = CliRunner().invoke(app, ["serve", "--help"], terminal_width=200).output
    for name in ServeSettings.model_fields:
        if name != "warmup":
            assert settings_flag(name) in text, name
    assert "[default: 16777216]" in text and "[>= 1, <= 100000]" in text and "[> 0]" in text


def test_serve_on_an_address_in_use_or_unknown_is_one_line_and_exit_1(tmp_path):
    """faults.md: a user error is one line and exit 1: the port is taken, or the host is not ours.

    Checked before any engine loads (the engines directory here is empty)."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        cases = {
            ("--port", str(port)): f"error: cannot listen on 127.0.0.1:{port}: address already in use",
            ("--host", "999.1.1.1"): "error: --host '999.1.1.1' is not an address of this machine",
        }
        for (option, value), expected in cases.items():
            proc = subprocess.run(
                [sys.executable, "-m", "sd35trt.cli", "serve", "--engines", str(tmp_path), option, value],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
            assert len(proc.stderr.strip().splitlines()) == 1
            assert proc.stderr.startswith(expected), proc.stderr
