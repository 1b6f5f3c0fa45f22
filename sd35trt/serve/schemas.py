"""Request and response bodies of the HTTP API (pydantic models, shown in ``/docs``).

The generation fields are derived from :data:`sd35trt.parameters.GENERATION_PARAMS` (names,
aliases, types, descriptions). Request bodies are strict (``64.0``, ``"64"`` or ``true`` are not a
width) and refuse unknown fields and non-finite numbers; the runtime checks the values.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, create_model, model_validator

from sd35trt.errors import RequestError
from sd35trt.parameters import GENERATION_PARAMS, PARAMS, InputParam, Kind, canonical_fields

_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
_JSON_TYPE = {Kind.TEXT: str, Kind.INT: int, Kind.FLOAT: float, Kind.BOOL: bool, Kind.IMAGE: str}


#: Request fields about how a request is scheduled, not what it generates (Triton's own batcher
#: decides that there, so its model has no such input).
SCHEDULING_FIELDS = ("batch",)


def _field(p: InputParam, prefix: str = "") -> tuple[Any, Any]:
    """The pydantic field of a declared parameter, named by its wire name, aliases accepted."""
    kind = _JSON_TYPE[p.kind]
    description = prefix + p.help + (" (the file's bytes, base64)" if p.kind is Kind.IMAGE else "")
    if p.aliases:
        description += f"; also accepted as {', '.join(p.aliases)}"
    alias = AliasChoices(*p.names) if p.aliases else None
    if p.required:
        return kind, Field(description=description, validation_alias=alias)
    annotation = kind if p.default is not None else kind | None
    if p.per_controlnet:  # one value, or a JSON list of one per control image
        annotation = kind | list[kind] | None
    return annotation, Field(default=p.default, description=description, validation_alias=alias)


class _Body(BaseModel):
    """A request body with generation fields: a parameter given under two of its names is refused."""

    model_config = _STRICT

    @model_validator(mode="before")
    @classmethod
    def _one_name_each(cls, data: Any) -> Any:
        if isinstance(data, dict):
            canonical_fields(data)  # raises RequestError (answered as 422 naming the field)
        return data


_GenerateFields = create_model(  # type: ignore[call-overload]
    "_GenerateFields", __base__=_Body, **{p.wire: _field(p) for p in GENERATION_PARAMS}
)


class GenerateBody(_GenerateFields):
    """``POST /generate``. Omitted fields take the defaults recorded with the engines."""

    batch: Literal["merge", "alone"] = Field(
        default="merge",
        description="'alone': never merged with other requests, for byte-exact reproduction "
        "(merged images can differ by ~1/255; the PNG records its engine batch)",
    )

    def generation_fields(self) -> dict[str, Any]:
        """The request in the generator's terms (wire names; ``None``: omitted)."""
        return self.model_dump()


class ImageInfo(BaseModel):
    """What one image of ``images`` is."""

    index: int = Field(description="position of the image in its request")
    seed: int = Field(description="this image's seed (seed + index): one image with it is this image")
    width: int = Field(description="pixels")
    height: int = Field(description="pixels")


class GenerateResponse(BaseModel):
    """The answer of ``POST /generate``: ``images[i]`` is a base64 PNG, described by ``info[i]``."""

    status: Literal["success"] = "success"
    images: list[str] = Field(
        description="base64 PNG files; each PNG's `parameters` text chunk records how it was made"
    )
    parameters: dict[str, Any] = Field(description="the parameters actually used, the seed included")
    info: list[ImageInfo] = Field(description="per image: index, seed, width, height")
    timings: dict[str, Any] = Field(description="milliseconds: queue, engine batch, encode, total, stages")
    batch: dict[str, Any] = Field(description="the engine batch this request ran in (the first, if several)")
    warnings: list[str] = Field(
        default_factory=list, description="e.g. a prompt truncated to the token limit"
    )


_SIZE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")
#: OpenAI's own parameters that have no counterpart here: accepted, and reported as having no effect.
OPENAI_QUALITY = ("auto", "standard", "hd", "low", "medium", "high")
OPENAI_STYLE = ("vivid", "natural")
#: Declared parameters the OpenAI bodies spell their own way (``n``, ``size``) or carry apart (the image).
_OPENAI_OWN = ("prompt", "num_images", "width", "height", "image")

_OpenAIExtras = create_model(  # type: ignore[call-overload]
    "_OpenAIExtras",
    __base__=_Body,
    **{p.wire: _field(p, "SD3.5: ") for p in GENERATION_PARAMS if p.name not in _OPENAI_OWN},
)


class OpenAIImagesBody(_OpenAIExtras):
    """``POST /v1/images/generations``, the OpenAI Images API request (and the form of ``/v1/images/edits``).

    ``size`` is ``"WIDTHxHEIGHT"`` in pixels inside the engines' profile (or ``"auto"``: the
    engines' default); ``n`` beyond the engine batch runs as several engine batches. Images come
    back as ``b64_json`` only. ``quality`` and ``style`` are accepted and have no effect (a warning
    says so). SD3.5's own settings are accepted as extra fields (``extra_body`` in OpenAI's clients).
    """

    prompt: str = Field(description=PARAMS["prompt"].help)
    model: str | None = Field(default=None, description="accepted and ignored: the server serves one model")
    n: int | None = Field(default=None, description="images for this prompt (default 1)")
    size: str | None = Field(default=None, description='"WIDTHxHEIGHT" in pixels, or "auto"')
    response_format: str | None = Field(default=None, description='"b64_json" (the only format served)')
    output_format: str | None = Field(default=None, description='"png" (the only format served)')
    quality: Literal[OPENAI_QUALITY] | None = Field(  # type: ignore[valid-type]
        default=None, description="accepted, no effect: steps and guidance set the quality here"
    )
    style: Literal[OPENAI_STYLE] | None = Field(  # type: ignore[valid-type]
        default=None, description="accepted, no effect (a DALL-E 3 setting)"
    )
    user: str | None = Field(default=None, description="accepted and ignored")

    def ignored(self) -> list[str]:
        """Warnings for the OpenAI settings given that have no effect here."""
        out = []
        if self.quality is not None:
            out.append(
                f"quality {self.quality!r} has no effect: the images' quality follows num_inference_steps "
                "and guidance_scale"
            )
        if self.style is not None:
            out.append(f"style {self.style!r} has no effect: it is a DALL-E 3 setting")
        return out

    def generation_fields(self) -> dict[str, Any]:
        """The request in ``/generate``'s terms.

        Raises:
            RequestError: ``size`` is not ``WIDTHxHEIGHT`` or ``auto``; a format other than
                ``b64_json`` / ``png`` was asked for.
        """
        if self.response_format not in (None, "b64_json"):
            raise RequestError(
                "response_format",
                f"response_format {self.response_format!r} is not served: images come back inline, "
                "use 'b64_json'",
            )
        if self.output_format not in (None, "png"):
            raise RequestError(
                "output_format", f"output_format {self.output_format!r} is not served: use 'png'"
            )
        width = height = None
        if self.size not in (None, "auto"):
            match = _SIZE.fullmatch(self.size)
            if match is None:
                raise RequestError(
                    "size", f"size {self.size!r} is not 'WIDTHxHEIGHT' in pixels (e.g. '1024x1024') or 'auto'"
                )
            width, height = int(match[1]), int(match[2])
        extras = self.model_dump(include=set(_OpenAIExtras.model_fields))
        return {
            **extras,
            "prompt": self.prompt,
            "width": width,
            "height": height,
            "num_images": 1 if self.n is None else self.n,
        }


class OpenAIImage(BaseModel):
    b64_json: str = Field(description="the PNG file, base64")
    revised_prompt: str | None = Field(default=None, description="always null: prompts are used as given")


class OpenAIImagesResponse(BaseModel):
    """The OpenAI Images API answer, plus ``warnings`` (e.g. a prompt truncated to the token limit)."""

    created: int = Field(description="Unix time, seconds")
    data: list[OpenAIImage]
    output_format: Literal["png"] = "png"
    size: str = Field(description='"WIDTHxHEIGHT" of the images')
    warnings: list[str] = Field(default_factory=list)


class OpenAIModel(BaseModel):
    """One model of OpenAI's ``GET /v1/models`` list."""

    id: str = Field(description="the model's Hugging Face repo id when recorded, else 'sd35trt'")
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time the server started, seconds")
    owned_by: str = "sd35trt"


class OpenAIModelList(BaseModel):
    """OpenAI's ``GET /v1/models`` answer: the one model this server serves."""

    object: Literal["list"] = "list"
    data: list[OpenAIModel]
