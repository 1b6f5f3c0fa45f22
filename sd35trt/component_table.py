"""The component enum and the component table: which model each exported component comes from.

Re-exported by :mod:`sd35trt.components` (import them from there); kept apart so that module stays
one screenful of specs. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from enum import Enum

from sd35trt.controlnet_settings import ControlType
from sd35trt.errors import ManifestError


class Component(str, Enum):
    """The exported components of an SD3.5 pipeline, in execution order.

    The VAE encoder is the image-to-image input: engines built before it existed lack it, and
    text-to-image needs only the other five (:attr:`required`). A ControlNet (diffusers'
    ``SD3ControlNetModel``) is exported only when ``model.controlnet`` names it; each is named by
    its control type (``controlnet_canny``), so an engine set holds one per configured ControlNet.
    """

    CLIP_L = "clip_l"
    CLIP_G = "clip_g"
    T5 = "t5"
    TRANSFORMER = "transformer"
    #: the transformer as two engines for the first-block cache (:mod:`sd35trt.runtime.cache`):
    #: the embeddings and block 0, then blocks 1.. and the output layers.
    TRANSFORMER_FIRST_BLOCK = "transformer_first_block"
    TRANSFORMER_REST = "transformer_rest"
    VAE_DECODER = "vae_decoder"
    VAE_ENCODER = "vae_encoder"
    CONTROLNET_CANNY = "controlnet_canny"
    CONTROLNET_BLUR = "controlnet_blur"
    CONTROLNET_DEPTH = "controlnet_depth"

    @classmethod
    def controlnet(cls, control_type: ControlType) -> Component:
        """The ControlNet component of ``control_type``."""
        return cls(f"{CONTROLNET_PREFIX}{ControlType(control_type).value}")

    @property
    def control_type(self) -> ControlType | None:
        """The control type of a ControlNet component, ``None`` for the others."""
        name = self.value
        return (
            ControlType(name.removeprefix(CONTROLNET_PREFIX)) if name.startswith(CONTROLNET_PREFIX) else None
        )

    @property
    def is_controlnet(self) -> bool:
        """Whether it is a ControlNet (one per control type: ``controlnet_<type>``)."""
        return self.control_type is not None

    @property
    def is_text_encoder(self) -> bool:
        return self in (Component.CLIP_L, Component.CLIP_G, Component.T5)

    @property
    def is_transformer(self) -> bool:
        """The whole transformer or one of its first-block-cache parts (same weights, settings, FP8)."""
        return self in (Component.TRANSFORMER, *TRANSFORMER_PARTS)

    @property
    def model(self) -> Component:
        """The component whose weights and export settings it uses (the transformer for its parts)."""
        return Component.TRANSFORMER if self.is_transformer else self

    @property
    def required(self) -> bool:
        """Whether every engine set has it (text-to-image); the VAE encoder and ControlNet are optional.

        The transformer is required, but its two parts stand in for it (:func:`engine_components`).
        """
        return not self.is_controlnet and self not in (Component.VAE_ENCODER, *TRANSFORMER_PARTS)


#: What a ControlNet component's name starts with (the rest is its control type).
CONTROLNET_PREFIX = "controlnet_"
#: The engine name ControlNet engines had before they were named by type (one per engine set).
UNTYPED_CONTROLNET = "controlnet"


def refuse_untyped_controlnet(names: Collection[str], where: str) -> None:
    """Refuse ``names`` (a record's or manifest's component keys) holding the ``controlnet`` engine
    of an older build, whose ControlNet engines were not yet named by control type.

    Raises:
        ManifestError: one line naming ``where`` and the commands that rebuild it.
    """
    if UNTYPED_CONTROLNET in names:
        raise ManifestError(
            f"{where} has a '{UNTYPED_CONTROLNET}' component from an older sd35trt (ControlNet "
            "components are now named by type, e.g. controlnet_canny): re-run `sd35trt export` "
            "and `sd35trt build`"
        )


#: The first-block-cache engines, in the order a step runs them.
TRANSFORMER_PARTS = (Component.TRANSFORMER_FIRST_BLOCK, Component.TRANSFORMER_REST)


def exported_components(cache: bool = False, controlnets: Collection[ControlType] = ()) -> list[Component]:
    """What ``sd35trt export`` writes, in order: every component, the transformer as its two parts
    when ``cache`` (``runtime.cache`` is set) and whole otherwise, and the ControlNets of the
    ``controlnets`` types (``model.controlnet``; the config check refuses them with the cache)."""
    skipped = (Component.TRANSFORMER,) if cache else TRANSFORMER_PARTS
    return [
        c for c in Component if c not in skipped and (not c.is_controlnet or c.control_type in controlnets)
    ]


def transformer_engine(available: Collection[Component]) -> Component:
    """The engine whose profile and precision stand for the transformer's: the whole transformer,
    or (engines built with ``runtime.cache`` have only the parts) its first block."""
    return Component.TRANSFORMER if Component.TRANSFORMER in available else Component.TRANSFORMER_FIRST_BLOCK


def engine_components(available: Collection[Component]) -> list[Component]:
    """The engines an engine set runs, in execution order, from the ``available`` ones.

    Every required component, with the whole transformer replaced by its two first-block-cache
    parts when both are there and it is not (a build with ``runtime.cache`` makes only the parts),
    and the optional components that are available. A missing required one stays in the list (the
    caller names it).
    """
    only_parts = Component.TRANSFORMER not in available and all(p in available for p in TRANSFORMER_PARTS)
    return [
        c
        for c in Component
        if (c.required or c in available) and not (only_parts and c is Component.TRANSFORMER)
    ]


class ModelLibrary(str, Enum):
    """The library whose class loads a component's PyTorch model (the value is its module name)."""

    TRANSFORMERS = "transformers"
    DIFFUSERS = "diffusers"


@dataclass(frozen=True)
class ComponentModel:
    """How one component's PyTorch model is stored, loaded and given its spec's inputs and outputs.

    :func:`sd35trt.models.loading.load_model` and :func:`sd35trt.models.modules.wrap` read this table; export,
    calibration, the PyTorch backend and the diffusers reference all load through them.

    Attributes:
        subfolder: its subfolder of a diffusers pipeline directory, also its
            ``StableDiffusion3Pipeline`` attribute and keyword.
        library: the library of the loading class.
        class_name: the class whose ``from_pretrained`` loads the subfolder (safetensors only).
        trace_attention: ``attn_implementation`` when loaded for ONNX export, ``None`` for the
            library's default. Eager for the text encoders: torch's SDPA export adds a float32
            mask that promotes the rest of a 16-bit CLIP graph to float32 and leaves
            LayerNormalization with mixed types.
        wrapper: the :mod:`sd35trt.models.modules` class giving the model its spec's I/O.
    """

    subfolder: str
    library: ModelLibrary
    class_name: str
    trace_attention: str | None
    wrapper: str


MODELS: dict[Component, ComponentModel] = {
    Component.CLIP_L: ComponentModel(
        "text_encoder", ModelLibrary.TRANSFORMERS, "CLIPTextModelWithProjection", "eager", "ClipTextEncoder"
    ),
    Component.CLIP_G: ComponentModel(
        "text_encoder_2", ModelLibrary.TRANSFORMERS, "CLIPTextModelWithProjection", "eager", "ClipTextEncoder"
    ),
    Component.T5: ComponentModel(
        "text_encoder_3", ModelLibrary.TRANSFORMERS, "T5EncoderModel", "eager", "T5TextEncoder"
    ),
    Component.TRANSFORMER: ComponentModel(
        "transformer", ModelLibrary.DIFFUSERS, "SD3Transformer2DModel", None, "Transformer"
    ),
    Component.TRANSFORMER_FIRST_BLOCK: ComponentModel(
        "transformer", ModelLibrary.DIFFUSERS, "SD3Transformer2DModel", None, "TransformerFirstBlock"
    ),
    Component.TRANSFORMER_REST: ComponentModel(
        "transformer", ModelLibrary.DIFFUSERS, "SD3Transformer2DModel", None, "TransformerRest"
    ),
    Component.VAE_DECODER: ComponentModel("vae", ModelLibrary.DIFFUSERS, "AutoencoderKL", None, "VaeDecoder"),
    Component.VAE_ENCODER: ComponentModel("vae", ModelLibrary.DIFFUSERS, "AutoencoderKL", None, "VaeEncoder"),
}
# StableDiffusion3ControlNetPipeline's layout: a ControlNet in the pipeline's controlnet/ (by default).
MODELS.update(
    {
        c: ComponentModel("controlnet", ModelLibrary.DIFFUSERS, "SD3ControlNetModel", None, "ControlNet")
        for c in Component
        if c.is_controlnet
    }
)

#: diffusers pipeline subfolder of each component's weights (from :data:`MODELS`).
SUBFOLDER = {c: m.subfolder for c, m in MODELS.items()}

#: Tokenizer subfolders that travel with the engines (the runtime needs no model directory).
TOKENIZER_SUBFOLDERS = {
    Component.CLIP_L: "tokenizer",
    Component.CLIP_G: "tokenizer_2",
    Component.T5: "tokenizer_3",
}
