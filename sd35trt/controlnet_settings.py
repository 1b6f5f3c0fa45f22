"""The ``model.controlnet`` config section (kept apart from :mod:`sd35trt.config` for its size)."""

from __future__ import annotations

from enum import Enum
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)


def absent_when_none(data: dict, value: Any, key: str) -> dict:
    """Leave an unset ControlNet setting out of a dump, so configs without a ControlNet keep the
    digests they had before the setting existed."""
    if value is None:
        data.pop(key, None)
    return data


class ControlType(str, Enum):
    """What a ControlNet was trained on (Stability AI's SD3.5 ControlNets: one per kind).

    ``canny`` and ``blur`` control images are made here from the user's picture; a ``depth``
    map is given by the user.
    """

    CANNY = "canny"
    BLUR = "blur"
    DEPTH = "depth"


class ControlNetSettings(BaseModel):
    """The ControlNet exported beside the pipeline: a diffusers ``SD3ControlNetModel``.

    By default the model directory's ``controlnet/`` (``StableDiffusion3ControlNetPipeline``'s
    layout); ``path`` names another one: a local directory, or a Hugging Face repo id such as
    ``stabilityai/stable-diffusion-3.5-large-controlnet-canny``, resolved through the local
    Hugging Face cache as ``model.path`` is (``model.allow_download`` applies to it too; see
    :mod:`sd35trt.models.controlnet`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)  # as sd35trt.config's sections

    type: ControlType
    path: str | None = Field(
        default=None,
        min_length=1,
        description="a local diffusers SD3ControlNetModel directory, or a Hugging Face repo id "
        "(default: the model's controlnet/ folder)",
    )
    #: Hub revision (branch, tag or commit hash) of a ``path`` given as a repo id; default ``main``.
    revision: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _revision_needs_path(self) -> ControlNetSettings:
        if self.revision is not None and self.path is None:
            raise ValueError("'revision' is only used with 'path' given as a Hugging Face repo id")
        return self

    @model_serializer(mode="wrap")
    def _without_absent_source(self, handler: SerializerFunctionWrapHandler) -> dict:
        # configs from before path/revision existed keep their digests
        data = handler(self)
        for key in ("path", "revision"):
            absent_when_none(data, getattr(self, key), key)
        return data


class OptionalControlNet(BaseModel):
    """``model.controlnet``: one ControlNet to export (a mapping), or several (a list of mappings,
    as diffusers' ``SD3MultiControlNetModel``); the transformer then takes their summed residuals
    as inputs. Left out of dumps when unset, so configs without one keep their digests; a list of
    one is that one mapping (same digest, same engines)."""

    controlnet: ControlNetSettings | tuple[ControlNetSettings, ...] | None = None

    @field_validator("controlnet")
    @classmethod
    def _distinct_types(cls, value):
        if not isinstance(value, tuple):
            return value
        if not value:
            raise ValueError(
                "model.controlnet is an empty list: give one ControlNet or more, or leave it out"
            )
        for i, net in enumerate(value):
            first = next(j for j, other in enumerate(value) if other.type is net.type)
            if first != i:
                raise ValueError(
                    f"model.controlnet[{i}].type {net.type.value} is also model.controlnet[{first}]'s: "
                    "each ControlNet needs a type of its own (the type names its engine and its requests)"
                )
            same = next(
                j for j, other in enumerate(value) if (other.path, other.revision) == (net.path, net.revision)
            )
            if same != i:
                where = "the model's controlnet/ folder" if net.path is None else repr(net.path)
                raise ValueError(
                    f"model.controlnet[{i}].path: {where} is also model.controlnet[{same}]'s: each "
                    "ControlNet needs weights of its own (give each a path)"
                )
        return value[0] if len(value) == 1 else value

    @property
    def controlnets(self) -> tuple[ControlNetSettings, ...]:
        """Every configured ControlNet, in the config's order (empty without one)."""
        c = self.controlnet
        return () if c is None else c if isinstance(c, tuple) else (c,)

    @model_serializer(mode="wrap")
    def _without_absent_controlnet(self, handler: SerializerFunctionWrapHandler) -> dict:
        return absent_when_none(handler(self), self.controlnet, "controlnet")
