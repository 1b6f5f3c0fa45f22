"""The generation endpoints: ``POST /generate`` and the OpenAI-compatible ``POST /v1/images/generations``,
``POST /v1/images/edits`` (image-to-image, a multipart form) and ``GET /v1/models``.

All run one path (:func:`generate_images`): validate against the engines, queue for a merged
engine batch, wait, encode PNGs. Failures are :class:`~sd35trt.serve.responses.ApiError`s, answered
in each endpoint's own error shape with the same messages (faults.md cases 9 to 14):

- 422: a field is invalid (named, with the allowed range);
- 413: the body is larger than ``max_body_bytes``; 408: the body did not arrive in time;
- 429 + ``Retry-After``: ``queue_size`` requests are waiting already;
- 503 + ``Retry-After``: not ready yet, shutting down, or the device ran out of memory; 503 also
  when the engine files went away under a ``--low-vram`` server (``/ready`` then says 503 too);
- 504: the request did not finish within ``timeout_s``;
- 500: a stage produced NaN/inf (``stage`` named) or an unexpected error; the server stays ready.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from pydantic import ValidationError

from sd35trt.errors import RequestError, VerificationError
from sd35trt.serve.batcher import BatchInfo, Job, QueueFullError, ShuttingDownError
from sd35trt.serve.forms import parse_multipart, typed_fields
from sd35trt.serve.generator import ImageSet, Prepared
from sd35trt.serve.logs import REQUEST_ID
from sd35trt.serve.responses import OPENAI_NAMES, ApiError, validation_errors
from sd35trt.serve.schemas import (
    GenerateBody,
    GenerateResponse,
    ImageInfo,
    OpenAIImage,
    OpenAIImagesBody,
    OpenAIImagesResponse,
    OpenAIModel,
    OpenAIModelList,
)
from sd35trt.serve.state import DECODE_SLOTS, ServerState

log = logging.getLogger("sd35trt.serve")

#: How often a queued request checks whether its client is still connected.
DISCONNECT_POLL_S = 0.25

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    408: {"description": "the body did not arrive within the read timeout"},
    413: {"description": "body too large"},
    422: {"description": "invalid field (named, with the allowed range)"},
    429: {"description": "queue full (Retry-After)"},
    500: {"description": "a stage produced NaN/inf (stage named)"},
    503: {"description": "not ready, shutting down, or out of device memory (Retry-After)"},
    504: {"description": "timed out"},
}


@dataclass(frozen=True)
class Generated:
    """One request's outcome: its PNG files (the parameters in their text chunk) and how it ran."""

    prepared: Prepared
    result: ImageSet
    batch: BatchInfo
    pngs: list[bytes]
    encode_s: float
    total_s: float

    def timings(self) -> dict[str, Any]:
        """Milliseconds: queue wait, engine batch, PNG encoding, total, and the engine stages."""
        ms = lambda s: round(s * 1000, 2)  # noqa: E731
        return {
            "queue_ms": ms(self.batch.queue_s),
            "batch_ms": ms(self.batch.run_s),
            "encode_ms": ms(self.encode_s),
            "total_ms": ms(self.total_s),
            "stages_ms": {
                k: ms(v)
                for k, v in self.result.timings.items()
                if isinstance(v, int | float) and math.isfinite(v)
            },
        }


async def _prepare(state: ServerState, fields: dict[str, Any]) -> Prepared:
    """Validate a request; images are decoded on a worker thread, at most :data:`DECODE_SLOTS` at
    a time, so a large image never blocks the event loop (``/health``).

    Raises:
        RequestError: a field is invalid.
        ApiError: 429 when :data:`DECODE_SLOTS` decodes run and ``queue_size`` more wait.
    """
    if fields.get("init_image") is None and fields.get("control_image") is None:
        return state.generator.prepare(fields)
    if state.decoding >= DECODE_SLOTS + state.settings.queue_size:
        raise ApiError(
            429,
            "queue_full",
            f"{state.decoding} image decodes are running or waiting; retry later",
            retry_after=1,
        )
    state.decoding += 1
    try:
        async with state.decode_slots:
            return await asyncio.to_thread(state.generator.prepare, fields)
    finally:
        state.decoding -= 1


async def generate_images(state: ServerState, fields: dict[str, Any], request: Request) -> Generated:
    """Validate, queue, run and encode one request (``fields`` in ``/generate``'s terms).

    Raises:
        ApiError: the answer to give instead (status, code, message; the field for 422s).
    """
    t0 = time.perf_counter()
    _check_ready(state)
    try:
        prepared = await _prepare(state, fields)
    except RequestError as err:
        raise ApiError.from_request_error(err) from None
    jobs = _submit(state, prepared)
    done = await _wait(state, jobs, request)
    result, info = ImageSet.joined([r for r, _ in done]), done[0][1]
    t_enc = time.perf_counter()
    pngs = await asyncio.to_thread(lambda: [result.png(im, i) for i, im in enumerate(result.images)])
    now = time.perf_counter()
    state.metrics.observe_request(len(pngs), info.queue_s, now - t_enc)
    p = prepared.params
    log.info(
        "generated %d image(s) %sx%s, %s steps, seed %s, in batch %d of %d request(s); %.0f ms",
        len(pngs),
        p.get("width"),
        p.get("height"),
        p.get("num_inference_steps"),
        p.get("seed"),
        info.id,
        info.requests,
        (now - t0) * 1000,
    )
    return Generated(prepared, result, info, pngs, encode_s=now - t_enc, total_s=now - t0)


def _check_ready(state: ServerState) -> None:
    """Raises ApiError 503 while the server is draining, still loading, or failed to load its engines."""
    if state.draining:
        raise ApiError(503, "shutting_down", "the server is shutting down", retry_after=5)
    if not state.is_ready or state.batcher is None or state.generator is None:
        if state.load_error:
            raise ApiError(503, "not_ready", f"the engines failed to load: {state.load_error}")
        raise ApiError(503, "not_ready", "the engines are still loading", retry_after=2)


def _submit(state: ServerState, prepared: Prepared) -> list[Job]:
    """Queue ``prepared``, in parts when one engine batch cannot hold its images (each keeping its
    seed; the queue limit counts requests, so later parts are admitted with the first).

    Raises:
        ApiError: 429 when the queue is full, 503 when the server is shutting down (no part queued).
    """
    batcher = state.batcher
    capacity = min(prepared.capacity, state.settings.max_batch or prepared.capacity)
    pieces = prepared.split(capacity) if prepared.size > capacity and prepared.split else [prepared]
    jobs = []
    try:
        for piece in pieces:
            jobs.append(
                batcher.submit(
                    piece,
                    piece.key,
                    piece.size,
                    piece.capacity,
                    piece.max_requests,
                    tag=REQUEST_ID.get(),
                    admitted=bool(jobs),
                )
            )
    except (QueueFullError, ShuttingDownError) as err:
        for job in jobs:
            batcher.cancel(job)
        if isinstance(err, QueueFullError):
            raise ApiError(429, "queue_full", str(err), retry_after=err.retry_after_s) from None
        raise ApiError(503, "shutting_down", str(err), retry_after=5) from None
    return jobs


async def _wait(state: ServerState, jobs: list[Job], request: Request) -> list[tuple[ImageSet, BatchInfo]]:
    """Wait for every part's ``(ImageSet, BatchInfo)``; drop the parts if the client leaves while queued.

    Raises:
        ApiError: 499 when the client disconnected, 503 when the engine files changed or went away
            (the server is not ready any more), else the failure's own status.
    """
    batcher = state.batcher
    waiter = asyncio.ensure_future(
        asyncio.gather(*(batcher.wait(job, state.settings.timeout_s) for job in jobs))
    )
    try:
        while not waiter.done():
            await asyncio.wait({waiter}, timeout=DISCONNECT_POLL_S)
            queued = all(job.started is None for job in jobs)
            if not waiter.done() and queued and await request.is_disconnected():
                # the client gave up: free its queue slots instead of computing for nobody
                waiter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiter
                log.info("client disconnected; dropped its queued request")
                raise ApiError(499, "client_closed_request", "the client closed the connection")
        return waiter.result()
    except ApiError:
        raise
    except VerificationError as err:  # the engine files changed or went away under the server
        state.engines_lost(str(err))
        log.error("request failed, not ready any more: %s", err)
        raise ApiError(503, "not_ready", f"the engines cannot be loaded: {err}") from None
    except Exception as err:
        for job in jobs:
            batcher.cancel(job)
        raise ApiError.of(err, batcher.retry_after_s()) from None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def add_generation_routes(app: FastAPI, state: ServerState) -> None:
    """Add the generation endpoints (and OpenAI's model list) over ``state`` to ``app``."""

    @app.post(
        "/generate",
        response_model=GenerateResponse,
        summary="Generate images (requests with equal size, steps and guidance share engine batches)",
        responses=ERROR_RESPONSES,
    )
    async def generate(body: GenerateBody, request: Request) -> GenerateResponse:
        done = await generate_images(state, body.generation_fields(), request)
        images = done.result.images
        return GenerateResponse(
            images=[_b64(png) for png in done.pngs],
            parameters=dict(done.result.parameters or done.prepared.params),
            info=[
                ImageInfo(index=i, seed=done.result.seeds[i], width=im.width, height=im.height)
                for i, im in enumerate(images)
            ],
            timings=done.timings(),
            batch=done.batch.to_json(),
            warnings=list(done.result.warnings),
        )

    @app.post(
        "/v1/images/generations",
        response_model=OpenAIImagesResponse,
        summary="OpenAI Images API: generate images (b64_json); SD3.5 settings as extra fields",
        responses=ERROR_RESPONSES,
    )
    async def openai_images(body: OpenAIImagesBody, request: Request) -> OpenAIImagesResponse:
        return await _openai_answer(state, body, request)

    @app.post(
        "/v1/images/edits",
        response_model=OpenAIImagesResponse,
        summary="OpenAI Images API: image-to-image (multipart form: image file, prompt, n, size, ...; "
        "SD3.5 settings such as strength as extra fields)",
        responses=ERROR_RESPONSES,
        openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": EDIT_FORM}}},
    )
    async def openai_edits(request: Request) -> OpenAIImagesResponse:
        body, image = _edit_request(request.headers.get("content-type", ""), await request.body())
        return await _openai_answer(state, body, request, image)

    @app.get("/v1/models", response_model=OpenAIModelList, summary="OpenAI Models API: the model served")
    async def openai_models() -> OpenAIModelList:
        if state.generator is None:
            raise ApiError(503, "not_ready", "the engines are still loading", retry_after=2)
        model_id = getattr(state.generator, "model_id", "sd35trt")
        started = time.time() - (time.monotonic() - state.started)
        return OpenAIModelList(data=[OpenAIModel(id=model_id, created=int(started))])


async def _openai_answer(
    state: ServerState, body: OpenAIImagesBody, request: Request, image: bytes | None = None
) -> OpenAIImagesResponse:
    """Generate for an OpenAI Images body (``image``: the edits endpoint's file), in OpenAI's shape."""
    try:
        fields = body.generation_fields()
    except RequestError as err:
        raise ApiError.from_request_error(err) from None
    if image is not None:
        fields["init_image"] = image
    try:
        done = await generate_images(state, fields, request)
    except ApiError as err:
        raise err.renamed(OPENAI_NAMES) from None
    first = done.result.images[0]
    return OpenAIImagesResponse(
        created=int(time.time()),
        data=[OpenAIImage(b64_json=_b64(png)) for png in done.pngs],
        size=f"{first.width}x{first.height}",
        warnings=[*body.ignored(), *done.result.warnings],
    )


def _edit_request(content_type: str, raw: bytes) -> tuple[OpenAIImagesBody, bytes]:
    """The edits endpoint's form as an OpenAI Images body and the image file's bytes.

    Raises:
        ApiError: 422 naming the field: not a form, no image or several, a mask, a bad value.
    """
    try:
        form = parse_multipart(content_type, raw)
        images = form.files.pop("image", []) + form.files.pop("image[]", [])
        if "mask" in form.files:
            raise RequestError("mask", "mask is not served: image-to-image here changes the whole image")
        for name in form.files:
            raise RequestError(name, f"{name} is not a file this endpoint takes (only image)")
        if len(images) != 1:
            raise RequestError("image", f"give exactly one image file (got {len(images)})")
        return OpenAIImagesBody.model_validate(typed_fields(form.fields)), images[0]
    except RequestError as err:
        raise ApiError.from_request_error(err) from None
    except ValidationError as err:
        raise ApiError.invalid(validation_errors(err.errors())) from None


#: The edits endpoint's form in the OpenAPI document: the body's fields and the image file.
EDIT_FORM = {
    "schema": {
        "type": "object",
        "required": ["image", "prompt"],
        "properties": {
            "image": {"type": "string", "format": "binary", "description": "the initial image file"},
            **OpenAIImagesBody.model_json_schema()["properties"],
        },
    }
}
