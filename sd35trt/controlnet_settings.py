"""The ``model.controlnet`` config section (kept apart from :mod:`sd35trt.config` for its size)."""

from __future__ import annotations

from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, SerializerFunctionWrapHandler, model_serializer


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
    """The ControlNet exported beside the pipeline: diffusers' ``SD3ControlNetModel`` in the
    model directory's ``controlnet/`` (``StableDiffusion3ControlNetPipeline``'s layout)."""

    model_config = ConfigDict(extra="forbid", frozen=True)  # as sd35trt.config's sections

    type: ControlType


class OptionalControlNet(BaseModel):
    """``model.controlnet``: a ControlNet to export; the transformer then takes its residuals as
    inputs. Left out of dumps when unset, so configs without one keep their digests."""

    controlnet: ControlNetSettings | None = None

    @model_serializer(mode="wrap")
    def _without_absent_controlnet(self, handler: SerializerFunctionWrapHandler) -> dict:
        return absent_when_none(handler(self), self.controlnet, "controlnet")
