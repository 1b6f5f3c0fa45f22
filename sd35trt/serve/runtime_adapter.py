"""The :class:`~sd35trt.serve.generator.Generator` over :class:`sd35trt.runtime.pipeline.Sd35Runtime`.

Validation is ``Sd35Runtime.validate``; merged batches are ``Sd35Runtime.generate_batch``, which
keeps each request's prompt and seed. HTTP fields are the runtime's own (diffusers' names).
A request with ``batch: "alone"`` gets an engine batch of its own (a key nothing else shares):
its PNG bytes then equal those ``sd35trt run`` writes for the same parameters.
``init_image`` is the image file in base64, decoded here into the runtime's ``image``.
Out-of-memory errors of any backend become :class:`~sd35trt.errors.DeviceOutOfMemoryError`.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sd35trt.errors import DeviceOutOfMemoryError, RequestError, is_out_of_memory
from sd35trt.serve.generator import ImageSet, Prepared

#: Values of the request field ``batch``: merge with compatible requests (default), or run alone.
BATCH_MERGE, BATCH_ALONE = "merge", "alone"


def _png(image: Any, index: int, *, params: Any, digest: str, batch: Any = None, model: Any = None) -> bytes:
    from sd35trt.runtime.png import png_bytes, png_parameters

    return png_bytes(image, png_parameters(params, digest, index, batch, model))


def _decode_image(text: str | bytes, field: str = "init_image") -> Any:
    """``init_image`` / ``control_image``: base64 of an image file (or the file's bytes, from a
    form) -> a PIL image.

    Raises:
        RequestError: not base64, or not a readable image (naming ``field``).
    """
    import base64
    import binascii

    from sd35trt.runtime.images import read_image

    if isinstance(text, bytes):
        return read_image(text, field)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(field, f"{field} is not base64 (the image file's bytes, base64)") from None
    return read_image(data, field)


class RuntimeGenerator:
    """Serve an ``Sd35Runtime``: validate with it, run merged batches with ``generate_batch``."""

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime
        self._alone = itertools.count()  # a key no other request shares
        self._limits = runtime.info.limits
        self._defaults = runtime.info.defaults

    @classmethod
    def load(
        cls, engines_dir: Path, low_vram: bool = False, max_images: int | None = None
    ) -> RuntimeGenerator:
        """Verify and load an engines directory (errors name the file and the fix)."""
        from sd35trt.runtime.pipeline import Sd35Runtime

        return cls(Sd35Runtime.load(engines_dir, low_vram=low_vram, max_images=max_images))

    @property
    def max_batch(self) -> int:
        return max(self._limits.images(True)[1], self._limits.images(False)[1])

    @property
    def model_id(self) -> str:
        """The model's name for clients (``/v1/models``): its Hugging Face repo id when recorded."""
        hub = (self.runtime.info.model or {}).get("hub") or {}
        return hub.get("repo_id") or "sd35trt"

    def limits(self) -> dict:
        out = self._limits.to_json()
        out["defaults"] = self._defaults.model_dump(
            include={"width", "height", "num_inference_steps", "guidance_scale"}
        )
        return out

    def prepare(self, fields: Mapping[str, Any]) -> Prepared:
        from sd35trt.parameters import canonical_fields
        from sd35trt.runtime.request import GenerationRequest

        # aliases (``steps``) under their parameter's name; a missing prompt is the runtime's to name
        known = {"prompt": fields.get("prompt"), **canonical_fields(fields)}
        # "alone": an engine batch of its own, so the bytes equal those of `sd35trt run`.
        alone = known.pop("batch", BATCH_MERGE) == BATCH_ALONE
        image = known.pop("init_image", None)
        if image is not None:
            known["image"] = _decode_image(image)
        control = known.get("control_image")
        if isinstance(control, list):  # one per ControlNet used
            known["control_image"] = [_decode_image(c, f"control_image[{i}]") for i, c in enumerate(control)]
        elif control is not None:
            known["control_image"] = _decode_image(control, "control_image")
        try:
            params = self.runtime.validate(GenerationRequest(**known))
        except RequestError as err:
            # the runtime's ``image`` is the HTTP ``init_image``
            raise (RequestError("init_image", str(err)) if err.field == "image" else err) from None
        return self._prepared(params, alone, params.to_json())

    def _prepared(self, params: Any, alone: bool, reply: Mapping[str, Any]) -> Prepared:
        from sd35trt.runtime.parts import engine_parts

        rows_per_request = 2 if params.cfg else 1
        lo = self._limits.images(params.cfg, params.skip_layer_guidance is not None)[0]

        def split(capacity: int) -> list[Prepared]:
            return [self._prepared(part, alone, reply) for part in engine_parts(params, capacity, lo)]

        return Prepared(
            key=(BATCH_ALONE, next(self._alone)) if alone else params.batch_key,
            size=params.num_images,
            capacity=self._limits.images_per_batch(params),
            max_requests=1 if alone else max(1, self._limits.encoder_batch[1] // rows_per_request),
            params=reply,
            native=params,
            split=split,
        )

    def run_batch(self, requests: Sequence[Prepared]) -> list[ImageSet | BaseException]:
        try:
            results = self.runtime.generate_batch([r.native for r in requests])
        except Exception as err:
            if is_out_of_memory(err):
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                raise DeviceOutOfMemoryError(
                    f"out of memory during generation ({type(err).__name__}: {err})"
                ) from err
            raise
        out: list[ImageSet | BaseException] = []
        for res in results:
            t = res.timings
            out.append(
                ImageSet(
                    images=list(res.images),
                    seeds=list(res.seeds),
                    timings={
                        "text_encoding": t.text_encoding_s,
                        "image_encoding": t.image_encoding_s,
                        "denoise": t.denoise_s,
                        "decode": t.decode_s,
                        "engine_total": t.total_s,
                    },
                    warnings=list(res.warnings),
                    parameters=res.params.to_json(),
                    # the PNG records its parameters and the engines' digest, as `sd35trt run` writes it
                    png=functools.partial(
                        _png, params=res.params, digest=res.engine_digest, batch=res.batch, model=res.model
                    ),
                )
            )
        return out

    def warmup(self) -> None:
        from sd35trt.runtime.request import GenerationRequest

        d = self._defaults
        params = self.runtime.validate(
            GenerationRequest("warm-up", num_inference_steps=1, height=d.height, width=d.width, seed=0)
        )
        self.runtime.generate_batch([params])
