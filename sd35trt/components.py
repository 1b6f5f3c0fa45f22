"""Per-component facts, in one place.

Each exported component (the transformer's two first-block-cache parts included) has a
:class:`ComponentSpec`: input and output names, dtypes, symbolic shapes, validation tolerances
and how its optimization-profile ranges follow from the build settings. Export, build, the
runtime and the tests all read these specs, so a name or an axis is written exactly once.
Nothing here imports torch.

Where the glue lives (decided here, used by export and the runtime):
- CLIP padding and concatenation are done by the runtime: the CLIP graphs return the
  penultimate hidden states and the projected pooled embedding, unchanged from PyTorch.
- The VAE scaling and shift (``latents / scaling_factor + shift_factor``) and the mapping of
  the decoded image from [-1, 1] to [0, 1] are inside the VAE decoder graph, so the runtime
  only converts [0, 1] floats to 8-bit pixels.
- The VAE encoder (image-to-image) mirrors it: it takes the image in [0, 1] and standard-normal
  noise, maps the image to [-1, 1], samples the encoder's diagonal Gaussian with that noise
  (``mean + std * noise``, as diffusers' ``latent_dist.sample``) and applies
  ``(latent - shift_factor) * scaling_factor`` inside the graph. The runtime draws the noise from
  the request's generator, so the engine's latents equal diffusers' for the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from sd35trt.component_table import (  # noqa: F401 -- re-exported: the vocabulary lives here
    MODELS,
    SUBFOLDER,
    TOKENIZER_SUBFOLDERS,
    TRANSFORMER_PARTS,
    Component,
    ComponentModel,
    ModelLibrary,
    engine_components,
    exported_components,
    refuse_untyped_controlnet,
    transformer_engine,
)
from sd35trt.config import BuildSettings, Precision, Range
from sd35trt.errors import ConfigError
from sd35trt.model_dims import ModelDims

CLIP_MAX_LENGTH = 77


class TensorType(str, Enum):
    FLOAT = "float"  # the component's export precision (fp32 / fp16 / bf16)
    INT64 = "int64"
    FLOAT32 = "float32"  # always fp32, whatever the export precision


class Sampling(str, Enum):
    """How export draws sample values for an input (tracing and validation)."""

    NORMAL = "normal"  # standard normal: latents, embeddings
    TOKENS = "tokens"  # token ids, uniform over the encoder's vocabulary
    TIMESTEP = "timestep"  # uniform over the scheduler's [0, 1000) training timesteps
    GATE = "gate"  # 0.0 or 1.0 per element (skip-layer-guidance gates)
    PIXELS = "pixels"  # uniform over [0, 1]: image pixels


#: Timesteps are drawn from the scheduler's training range, ``[0, num_train_timesteps)``.
NUM_TRAIN_TIMESTEPS = 1000


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. ``shape`` mixes ints and symbolic axis names."""

    name: str
    dtype: TensorType
    shape: tuple[int | str, ...]
    sampling: Sampling = Sampling.NORMAL

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}


@dataclass(frozen=True)
class Tolerance:
    """Validation tolerance: ``max|a-b| <= atol + rtol * max|b|`` over each output."""

    rtol: float
    atol: float


@dataclass(frozen=True)
class ComponentSpec:
    """The I/O contract of one exported component."""

    component: Component
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    tolerance: Tolerance
    #: tolerance for the FP8 graph against ModelOpt's fake-quant PyTorch model.
    fp8_tolerance: Tolerance | None = None

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: t.dynamic_axes for t in (*self.inputs, *self.outputs) if t.dynamic_axes}


def spec(
    component: Component,
    dims: ModelDims,
    skip_layers: int = 0,
    controlnet: int = 0,
    controlnet_text: bool = True,
) -> ComponentSpec:
    """The I/O contract of ``component`` for a pipeline of size ``dims``.

    ``skip_layers`` > 0 adds the transformer's ``skip_layers [n]`` input (skip-layer guidance
    over that many blocks; see :class:`sd35trt.models.modules.Transformer`). ``controlnet`` > 0,
    the ControlNet's block count, adds its ``controlnet_block_samples [B, n, image_tokens,
    inner_dim]`` input (zeros without a control image, as NVIDIA's demo feeds them) and is the
    ControlNet's output count; 0 keeps the transformer's I/O that of a pipeline without one.
    ``controlnet_text`` False: a ControlNet without text input (SD3.5-large's, ``joint_attention_dim:
    null``) has no ``encoder_hidden_states``.

    Axes: ``batch`` (prompts, doubled by CFG for the encoders and the transformer),
    ``height`` / ``width`` (image size in pixels), ``latent_height`` / ``latent_width`` (image
    size / VAE scale factor), ``text_length`` (77 CLIP tokens + the T5 sequence length),
    ``image_tokens`` (latent patches: ``latent_height * latent_width / patch_size**2``).
    """
    if component in TRANSFORMER_PARTS:
        return _part_spec(component, dims, skip_layers)
    if component is Component.TRANSFORMER:
        return _transformer_spec(dims, skip_layers, controlnet)
    if component.is_controlnet:
        return _controlnet_spec(component, dims, controlnet, controlnet_text)
    if component in (Component.CLIP_L, Component.CLIP_G):
        return _clip_spec(component, dims)
    if component is Component.T5:
        return _t5_spec(dims)
    if component is Component.VAE_DECODER:
        return _vae_decoder_spec(dims)
    if component is Component.VAE_ENCODER:
        return _vae_encoder_spec(dims)
    raise ValueError(f"unknown component {component!r}")


def _latent(name: str, dims: ModelDims) -> TensorSpec:
    """A latent-space tensor ``[batch, latent_channels, latent_height, latent_width]``."""
    return TensorSpec(
        name, TensorType.FLOAT, ("batch", dims.latent_channels, "latent_height", "latent_width")
    )


def _text_and_timestep(dims: ModelDims) -> tuple[TensorSpec, ...]:
    """What the transformer and the ControlNet take after their latents: the prompt and the step.

    ``timestep`` is float32 whatever the export precision, as diffusers and NVIDIA's demo feed it:
    in bfloat16 the 28-step schedule's timesteps round by up to 2 (987.38 -> 988), which shifts the
    phase of the high sinusoid frequencies. The graph computes the sinusoidal embedding in float32
    and casts it to the model dtype (diffusers' CombinedTimestepTextProjEmbeddings), so the cast is
    inside the graph.
    """
    f = TensorType.FLOAT
    return (
        TensorSpec("encoder_hidden_states", f, ("batch", "text_length", dims.joint_attention_dim)),
        TensorSpec("pooled_projections", f, ("batch", dims.pooled_projection_dim)),
        TensorSpec("timestep", TensorType.FLOAT32, ("batch",), Sampling.TIMESTEP),
    )


def _skip_layers(n: int) -> tuple[TensorSpec, ...]:
    """The ``skip_layers [n]`` gate input, or nothing without skip-layer guidance (``n`` = 0)."""
    return (TensorSpec("skip_layers", TensorType.FLOAT, (n,), Sampling.GATE),) if n else ()


def _transformer_spec(dims: ModelDims, skip_layers: int, controlnet: int) -> ComponentSpec:
    tolerance = Tolerance(rtol=1e-3, atol=1e-4)
    return ComponentSpec(
        Component.TRANSFORMER,
        inputs=(
            _latent("hidden_states", dims),
            *_text_and_timestep(dims),
            *_skip_layers(skip_layers),
            *((_controlnet_samples(dims, controlnet),) if controlnet else ()),
        ),
        outputs=(_latent("noise_pred", dims),),
        tolerance=tolerance,
        fp8_tolerance=tolerance,
    )


def _clip_spec(component: Component, dims: ModelDims) -> ComponentSpec:
    f = TensorType.FLOAT
    hidden, proj = (
        (dims.clip_l_hidden, dims.clip_l_projection)
        if component is Component.CLIP_L
        else (dims.clip_g_hidden, dims.clip_g_projection)
    )
    return ComponentSpec(
        component,
        inputs=(TensorSpec("input_ids", TensorType.INT64, ("batch", CLIP_MAX_LENGTH), Sampling.TOKENS),),
        outputs=(
            TensorSpec("hidden_states", f, ("batch", CLIP_MAX_LENGTH, hidden)),  # penultimate layer
            TensorSpec("text_embeds", f, ("batch", proj)),
        ),
        tolerance=Tolerance(rtol=1e-3, atol=1e-4),
    )


def _t5_spec(dims: ModelDims) -> ComponentSpec:
    return ComponentSpec(
        Component.T5,
        inputs=(TensorSpec("input_ids", TensorType.INT64, ("batch", "t5_length"), Sampling.TOKENS),),
        outputs=(TensorSpec("last_hidden_state", TensorType.FLOAT, ("batch", "t5_length", dims.t5_hidden)),),
        tolerance=Tolerance(rtol=1e-3, atol=1e-4),
    )


def _vae_decoder_spec(dims: ModelDims) -> ComponentSpec:
    return ComponentSpec(
        Component.VAE_DECODER,
        inputs=(_latent("latent", dims),),
        outputs=(TensorSpec("image", TensorType.FLOAT, ("batch", 3, "height", "width")),),  # in [0, 1]
        tolerance=Tolerance(rtol=1e-3, atol=1e-3),
    )


def _vae_encoder_spec(dims: ModelDims) -> ComponentSpec:
    return ComponentSpec(
        Component.VAE_ENCODER,
        inputs=(
            TensorSpec(
                "image", TensorType.FLOAT, ("batch", 3, "height", "width"), Sampling.PIXELS
            ),  # in [0, 1]
            _latent("noise", dims),  # standard normal: the posterior's sample
        ),
        outputs=(_latent("latent", dims),),  # scaled and shifted, as the transformer takes it
        tolerance=Tolerance(rtol=1e-3, atol=1e-3),
    )


def _controlnet_spec(
    component: Component, dims: ModelDims, controlnet: int, text: bool = True
) -> ComponentSpec:
    """``text`` False: no ``encoder_hidden_states`` (SD3.5-large's ControlNets take none)."""
    inputs = [t for t in _text_and_timestep(dims) if text or t.name != "encoder_hidden_states"]
    return ComponentSpec(
        component,
        inputs=(
            _latent("hidden_states", dims),
            # the control image's latent, made by the vae_encoder engine (diffusers' pipeline:
            # vae.encode(image).latent_dist.sample(), shifted and scaled)
            _latent("controlnet_cond", dims),
            *inputs,
        ),
        # unscaled: the runtime multiplies by the conditioning scale (diffusers does it last too)
        outputs=(_controlnet_samples(dims, controlnet),),
        tolerance=Tolerance(rtol=1e-3, atol=1e-4),
    )


def _part_spec(component: Component, dims: ModelDims, skip_layers: int) -> ComponentSpec:
    """The first-block-cache engines (see :class:`sd35trt.models.modules.TransformerFirstBlock`).

    ``image_tokens`` is the latent patch count ``(latent_height / p) x (latent_width / p)``; the
    token streams are ``inner_dim`` wide. Both graphs end in the output layers (``norm_out``,
    ``proj_out``, unpatchify), so either gives the step's ``noise_pred``.
    """
    f, d = TensorType.FLOAT, dims.inner_dim
    tokens = ("batch", "image_tokens", d)
    block_hidden = TensorSpec("block_hidden_states", f, tokens)  # after block 0
    block_text = TensorSpec("block_encoder_hidden_states", f, ("batch", "text_length", d))
    temb = TensorSpec("temb", f, ("batch", d))
    noise_pred = _latent("noise_pred", dims)
    # the rest's residual: its last hidden states minus block 0's (diffusers' tail_block_residuals[0])
    residual = TensorSpec("hidden_states_residual", f, tokens)
    tolerance = Tolerance(rtol=1e-3, atol=1e-4)
    if component is Component.TRANSFORMER_FIRST_BLOCK:
        whole = spec(Component.TRANSFORMER, dims)
        return ComponentSpec(
            component,
            inputs=(*whole.inputs, residual),
            outputs=(
                # block 0's output minus its input (diffusers' head_block_residual): what the cache compares
                TensorSpec("first_block_residual", f, tokens),
                block_hidden,
                block_text,
                temb,
                noise_pred,  # the output layers on block_hidden_states + hidden_states_residual
            ),
            tolerance=tolerance,
            fp8_tolerance=tolerance,
        )
    return ComponentSpec(
        component,
        inputs=(
            _latent("hidden_states", dims),  # only its shape is read: the patch grid to unpatchify to
            block_hidden,
            block_text,
            temb,
            *_skip_layers(skip_layers),
        ),
        outputs=(noise_pred, residual),
        tolerance=tolerance,
        fp8_tolerance=tolerance,
    )


#: The ControlNet engines' output and the transformer's input: the block residuals.
CONTROLNET_INPUT = "controlnet_block_samples"


def _controlnet_samples(dims: ModelDims, n: int) -> TensorSpec:
    """The ControlNet's ``n`` residuals as one tensor, ``[B, n, image_tokens, inner_dim]``."""
    return TensorSpec(CONTROLNET_INPUT, TensorType.FLOAT, ("batch", n, "image_tokens", dims.inner_dim))


#: Extra validation slack for graphs exported in 16 bits: ONNX Runtime and PyTorch round and
#: accumulate in different orders, so outputs differ by several units in the last place of the
#: export dtype (fp16 eps ~1e-3, bf16 eps ~8e-3), more for deep models.
REDUCED_PRECISION_TOLERANCE = {
    Precision.FP16: Tolerance(rtol=1e-2, atol=1e-2),
    Precision.BF16: Tolerance(rtol=5e-2, atol=5e-2),
}


def validation_tolerance(sp: ComponentSpec, precision: Precision, quantized: bool = False) -> Tolerance:
    """The tolerance an exported graph of ``sp`` in ``precision`` is validated with.

    Args:
        sp: the component's spec (its ``tolerance`` and ``fp8_tolerance``).
        precision: the export precision; 16-bit exports get at least
            :data:`REDUCED_PRECISION_TOLERANCE`.
        quantized: the FP8 graph, compared with ModelOpt's fake-quant PyTorch model under
            ``sp.fp8_tolerance``.

    Returns:
        The :class:`Tolerance` to apply to every output.
    """
    base = sp.fp8_tolerance if quantized and sp.fp8_tolerance is not None else sp.tolerance
    slack = REDUCED_PRECISION_TOLERANCE.get(precision)
    if slack is None:
        return base
    return Tolerance(rtol=max(base.rtol, slack.rtol), atol=max(base.atol, slack.atol))


@dataclass(frozen=True)
class ShapeRange:
    """min / opt / max shapes of one input in an optimization profile."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def contains(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == len(self.min) and all(
            lo <= s <= hi for s, lo, hi in zip(shape, self.min, self.max, strict=True)
        )

    def to_json(self) -> dict:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


def batch_range(component: Component, images: Range, cfg_by_default: bool = True) -> Range:
    """Engine batch range for ``images`` images per request.

    The text encoders and the transformer see ``[negative, positive]`` under classifier-free
    guidance, so their maximum is twice the image batch; guidance can be off (turbo), so their
    minimum is the image batch minimum. The VAE decodes (and encodes) images only.
    """
    if component in (Component.VAE_DECODER, Component.VAE_ENCODER):
        return images
    opt = images.opt * 2 if cfg_by_default else images.opt
    return Range(min=images.min, opt=opt, max=images.max * 2)


#: The fields of a :class:`Range` (and of a :class:`ShapeRange`), in order.
_BOUNDS = ("min", "opt", "max")


def size_problems(key: str, value: int, dims: ModelDims, limit: bool = True) -> list[str]:
    """What the model can't take in the image side ``value`` (pixels) at config ``key``: a side not a
    multiple of its size multiple, or (``limit``) beyond what its positional embedding covers."""
    m, problems = dims.size_multiple, []
    if value % m:
        problems.append(f"{key} = {value} is not a multiple of {m} (VAE factor x patch size)")
    if limit and value > dims.max_image_size:
        problems.append(
            f"{key} = {value} exceeds what the positional embedding covers "
            f"({dims.max_image_size} = pos_embed_max_size {dims.pos_embed_max_size} x {m})"
        )
    return problems


def latent_range(r: Range, dims: ModelDims, field: str) -> Range:
    """Convert an image-size range (pixels) to latent sizes, refusing sizes the model can't take.

    Raises:
        ConfigError: the first problem (:func:`size_problems`) of ``build.<field>``.
    """
    for key in _BOUNDS:
        if problems := size_problems(f"build.{field}.{key}", getattr(r, key), dims, key == "max"):
            raise ConfigError(problems[0])
    s = dims.vae_scale_factor
    return Range(min=r.min // s, opt=r.opt // s, max=r.max // s)


def _tokens(h: Range, w: Range, patch: int) -> Range:
    """Image token count range from latent height and width ranges (one token per patch)."""
    return Range(**{k: (getattr(h, k) // patch) * (getattr(w, k) // patch) for k in _BOUNDS})


def profile(
    component: Component,
    dims: ModelDims,
    build: BuildSettings,
    max_sequence_length: int = 256,
    cfg_by_default: bool = True,
    skip_layers: int = 0,
    controlnet: int = 0,
    controlnet_text: bool = True,
) -> dict[str, ShapeRange]:
    """Optimization-profile shape ranges per input of ``component``.

    Static builds are expressed by ranges whose min == opt == max in the config.

    Raises:
        ConfigError: a range is not a multiple of the model's size multiple, or too large.
    """
    b = batch_range(component, build.batch, cfg_by_default)
    h = latent_range(build.height, dims, "height")
    w = latent_range(build.width, dims, "width")
    text_len = CLIP_MAX_LENGTH + max_sequence_length
    sp = spec(component, dims, skip_layers if component.is_transformer else 0, controlnet, controlnet_text)
    sizes = {
        "batch": b,
        "height": build.height,
        "width": build.width,
        "latent_height": h,
        "latent_width": w,
        "image_tokens": _tokens(h, w, dims.patch_size),
        "t5_length": Range.static(max_sequence_length),
        "text_length": Range.static(text_len),
    }
    ranges = {
        t.name: [sizes[d] if isinstance(d, str) else Range.static(d) for d in t.shape] for t in sp.inputs
    }
    return {n: ShapeRange(*(tuple(getattr(r, k) for r in rs) for k in _BOUNDS)) for n, rs in ranges.items()}


#: Largest image side (pixels) export traces at, and the largest sides of its two validation
#: cases. Every graph is dynamic in batch, image size and text length, so small shapes run the
#: same graph as the profile's; at the profile's own shapes validation does not fit a machine
#: (SD3.5 at batch 4 and 1536x1536: ONNX Runtime holds two 27.7 GB attention-score tensors).
SAMPLE_IMAGE_SIDES = (256, 128, 192)
#: T5 sequence lengths of the trace and of the two validation cases, at most.
SAMPLE_T5_LENGTHS = (32, 16, 24)


def _side(pixels: int, limit: int, multiple: int) -> int:
    return max(multiple, min(pixels, limit) // multiple * multiple)


def sample_shapes(
    component: Component,
    dims: ModelDims,
    build: BuildSettings,
    max_sequence_length: int = 256,
    skip_layers: int = 0,
    controlnet: int = 0,
    controlnet_text: bool = True,
) -> list[dict[str, tuple[int, ...]]]:
    """Concrete input shapes export traces and validates ``component`` at: small ones.

    The trace is at the profile's ``opt`` batch, the two validation cases at its ``min`` and
    ``max`` batch (``max + 1`` when they are the same), so the batch axis is exercised at two
    sizes. Image sides are the profile's ``opt`` / ``min`` / ``max`` capped at
    :data:`SAMPLE_IMAGE_SIDES` and T5 lengths capped at :data:`SAMPLE_T5_LENGTHS` (trace, case 1,
    case 2): the graph is the same at every size (the validation cases check that it is, at sizes
    other than the traced one), and tracing and validation stay small at full size.

    Returns:
        ``[trace, validation_1, validation_2]``, each ``{input name: shape}``.

    Raises:
        ConfigError: the build ranges don't fit the model (see :func:`profile`).
    """
    options = {"skip_layers": skip_layers, "controlnet": controlnet, "controlnet_text": controlnet_text}
    profile(component, dims, build, max_sequence_length, **options)  # refuse bad ranges
    m = dims.size_multiple
    shapes = []
    for pick, side, t5 in zip(("opt", "min", "max"), SAMPLE_IMAGE_SIDES, SAMPLE_T5_LENGTHS, strict=True):
        small = build.model_copy(
            update={
                "height": Range.static(_side(getattr(build.height, pick), side, m)),
                "width": Range.static(_side(getattr(build.width, pick), side, m)),
            }
        )
        ranges = profile(component, dims, small, min(max_sequence_length, t5), **options)
        shapes.append({name: getattr(r, pick) for name, r in ranges.items()})
    trace, low, top = shapes
    if [s[:1] for s in top.values()] == [s[:1] for s in low.values()]:
        sp = spec(
            component, dims, skip_layers if component.is_transformer else 0, controlnet, controlnet_text
        )
        batched = {t.name for t in sp.inputs if t.shape and t.shape[0] == "batch"}
        top = {n: (s[0] + 1, *s[1:]) if n in batched else s for n, s in top.items()}
    return [trace, low, top]


#: Quantizers ModelOpt's diffusers plugin adds to each attention module; the ones we use.
ATTENTION_QUANTIZERS = ("q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer", "softmax_quantizer")


class QuantizerKind(str, Enum):
    """What a quantizer quantizes, from its name."""

    WEIGHT = "weight"
    INPUT = "input"
    ATTENTION = "attention"  # q/k/v entering attention and the softmax output
    OUTPUT = "output"  # layer outputs and attention's output: never enabled here

    @classmethod
    def of(cls, quantizer_name: str) -> QuantizerKind:
        leaf = quantizer_name.rsplit(".", 1)[-1]
        if leaf == "weight_quantizer":
            return cls.WEIGHT
        if leaf == "input_quantizer":
            return cls.INPUT
        if leaf in ATTENTION_QUANTIZERS:
            return cls.ATTENTION
        return cls.OUTPUT
