"""The generation parameters, declared once: name, type, bounds, default, help and aliases.

Every surface (CLI options, ``/generate`` and OpenAI bodies, Triton inputs, the request checks)
derives its form from :data:`GENERATION_PARAMS`, so an alias or a bound holds everywhere. Names are
diffusers' (``StableDiffusion3Pipeline.__call__``); bounds that depend on the engines (sizes,
images per batch) come from the engine manifest (:class:`~sd35trt.runtime.request.RequestLimits`).
"""

from __future__ import annotations

import enum
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sd35trt.errors import RequestError

#: More steps than this is a mistake, not a setting (SD3.5 uses 4 to 50).
MAX_STEPS = 500
#: Guidance far above SD3.5's 3.5 to 7 only saturates images; this bounds what is accepted.
MAX_GUIDANCE = 100.0
#: Longest prompt (and negative prompt) accepted, in characters, checked before tokenizing. The
#: text encoders read at most 256 T5 tokens (77 for CLIP), a few thousand characters at most;
#: beyond this a prompt only costs time and memory (a 1 MB prompt held the engine thread 19 s).
MAX_PROMPT_CHARS = 20_000
MAX_SEED = 2**63 - 1
#: diffusers' ``StableDiffusion3Img2ImgPipeline`` default strength.
DEFAULT_STRENGTH = 0.6
#: The largest first-block cache threshold accepted (a relative change of block 0's residual;
#: diffusers' ``FirstBlockCacheConfig`` default is 0.05, and above ~1 every step but the first skips).
MAX_CACHE_THRESHOLD = 10.0
#: ControlNet residuals scaled beyond this overwhelm the transformer; Stability AI's SD3.5
#: ControlNets are used at 0.5 to 1.0 (diffusers' default 1.0).
MAX_CONDITIONING_SCALE = 2.0
#: An integer input whose upper bound is above this is 64-bit on typed wires (Triton's INT64).
INT32_MAX = 2**31 - 1


class Kind(enum.StrEnum):
    """What a parameter's value is (each surface has its own spelling of it)."""

    TEXT = "text"
    INT = "int"
    FLOAT = "float"
    BOOL = "bool"
    #: an image: a PIL image in Python, a file path on the command line, the file's bytes in
    #: base64 over HTTP and Triton (where the parameter is named :attr:`InputParam.wire_name`).
    IMAGE = "image"


@dataclass(frozen=True)
class InputParam:
    """One generation parameter.

    Attributes:
        name: diffusers' name, used by the Python API, the CLI (``--num-inference-steps``), HTTP
            and Triton.
        kind: the value's type.
        help: one line for people: meaning, units, allowed values, default.
        aliases: other accepted spellings (``steps``); giving a name and its alias together is
            refused.
        low, high: inclusive bounds (``None``: unbounded there); ``low_open`` excludes ``low``.
        default: the value when omitted; ``None`` means the default recorded with the engines
            (or none at all, e.g. a drawn seed).
        required: no default at all (the prompt).
        wire_name: the name where the value travels as a file's bytes (HTTP, Triton):
            ``init_image`` for ``image``.
        note: appended to a bound error (what the bound means).
        per_controlnet: one value, or a list of one per control image (diffusers' convention for
            several ControlNets): a repeatable option on the command line, a JSON list over HTTP,
            several values in a Triton row; a single value applies to every control image.
    """

    name: str
    kind: Kind
    help: str
    aliases: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    default: Any = None
    required: bool = False
    wire_name: str | None = None
    note: str = ""
    per_controlnet: bool = False

    @property
    def wire(self) -> str:
        """The name over HTTP and Triton."""
        return self.wire_name or self.name

    @property
    def names(self) -> tuple[str, ...]:
        """Every accepted spelling, the name first."""
        return (self.wire, *self.aliases)

    @property
    def range_text(self) -> str:
        """``1..500``, ``(0, 1]``, ``0..2^63-1``: the bounds as messages show them."""
        lo, hi = _num(self.low), _num(self.high)
        return f"({lo}, {hi}]" if self.low_open else f"{lo}..{hi}"


def _num(x: float | None) -> str:
    if x == MAX_SEED:
        return f"{x} (2^63-1)"
    return str(x) if isinstance(x, int) else f"{x:g}"


#: How a parameter's help says its default is the engines' (``reference`` says where its own come from).
RECORDED_DEFAULT = "(default: the engines' recorded)"
_SIZE = "in pixels, a multiple of 16 inside the engines' profile " + RECORDED_DEFAULT

GENERATION_PARAMS: tuple[InputParam, ...] = (
    InputParam(
        "prompt",
        Kind.TEXT,
        "text prompt, not empty (text over the token limit is cut, reported)",
        required=True,
    ),
    InputParam(
        "negative_prompt",
        Kind.TEXT,
        f"negative prompt, used under classifier-free guidance {RECORDED_DEFAULT}",
    ),
    InputParam(
        "num_inference_steps",
        Kind.INT,
        f"denoising steps, 1..{MAX_STEPS} {RECORDED_DEFAULT}",
        ("steps",),
        1,
        MAX_STEPS,
    ),
    InputParam(
        "guidance_scale",
        Kind.FLOAT,
        f"classifier-free guidance scale, 0..{MAX_GUIDANCE:g}; at most 1 turns CFG off {RECORDED_DEFAULT}",
        ("guidance",),
        0.0,
        MAX_GUIDANCE,
        note="at most 1 turns classifier-free guidance off",
    ),
    InputParam("height", Kind.INT, f"image height {_SIZE}"),
    InputParam("width", Kind.INT, f"image width {_SIZE}"),
    InputParam(
        "seed",
        Kind.INT,
        "noise seed, 0..2^63-1 (default: drawn below 2^53 and reported)",
        low=0,
        high=MAX_SEED,
    ),
    InputParam(
        "num_images",
        Kind.INT,
        "images for this prompt (default 1); image i uses seed + i; more than the engine batch run "
        "as several engine batches",
        default=1,
    ),
    InputParam(
        "skip_layer_guidance", Kind.BOOL, "skip-layer guidance on or off (default: as the engines were built)"
    ),
    InputParam(
        "image",
        Kind.IMAGE,
        "image-to-image: the initial image (PNG, JPEG, WebP), resized to width x height as diffusers does; "
        "needs engines with a VAE encoder",
        wire_name="init_image",
    ),
    InputParam(
        "strength",
        Kind.FLOAT,
        f"image-to-image: share of the schedule that runs, in (0, 1] (default {DEFAULT_STRENGTH:g})",
        low=0.0,
        high=1.0,
        low_open=True,
    ),
    InputParam(
        "cache_threshold",
        Kind.FLOAT,
        f"first-block cache threshold, 0..{MAX_CACHE_THRESHOLD:g}: the largest relative change of block 0's "
        "residual that still reuses the rest's cached residual; 0 skips only exact repeats; engines built "
        "with runtime.cache only (default: theirs)",
        low=0.0,
        high=MAX_CACHE_THRESHOLD,
    ),
    InputParam(
        "control_image",
        Kind.IMAGE,
        "ControlNet: the picture to follow, of the output's aspect ratio; made into canny edges or a "
        "blur as control_type says (a depth map is taken as is); needs engines with a ControlNet; "
        "one per ControlNet used",
        per_controlnet=True,
    ),
    InputParam(
        "control_type",
        Kind.TEXT,
        "ControlNet: canny, blur or depth, one per control image, in their order (default: the "
        "engines' ControlNets, in their order)",
        per_controlnet=True,
    ),
    InputParam(
        "controlnet_conditioning_scale",
        Kind.FLOAT,
        f"ControlNet: residual scale, 0..{MAX_CONDITIONING_SCALE:g}, one for all or one per control image "
        "(default 1)",
        low=0.0,
        high=MAX_CONDITIONING_SCALE,
        per_controlnet=True,
    ),
    InputParam(
        "control_guidance_start",
        Kind.FLOAT,
        "ControlNet: share of the steps before it acts, one for all or one per control image (default 0)",
        low=0.0,
        high=1.0,
        per_controlnet=True,
    ),
    InputParam(
        "control_guidance_end",
        Kind.FLOAT,
        "ControlNet: share of the steps after which it stops, one for all or one per control image "
        "(default 1)",
        low=0.0,
        high=1.0,
        per_controlnet=True,
    ),
)

PARAMS: Mapping[str, InputParam] = {p.name: p for p in GENERATION_PARAMS}
#: Wire names and aliases -> the parameter (``steps`` and ``init_image`` included).
BY_WIRE_NAME: Mapping[str, InputParam] = {n: p for p in GENERATION_PARAMS for n in p.names}


def canonical_fields(fields: Mapping[str, Any], *, wire: bool = True) -> dict[str, Any]:
    """``fields`` with aliases replaced by their parameter's name (``steps`` -> ``num_inference_steps``).

    Keys that are no generation parameter pass through unchanged. ``None`` values count as
    omitted.

    Args:
        fields: field name -> value, as a client sent them.
        wire: the image travels as ``init_image`` (HTTP, Triton), which is then kept as its key;
            ``False`` maps it to ``image`` (the Python API's name).

    Raises:
        RequestError: a parameter was given under two of its names (both named).
    """
    out: dict[str, Any] = {}
    given: dict[str, str] = {}
    for key, value in fields.items():
        param = BY_WIRE_NAME.get(key) or (PARAMS.get(key) if not wire else None)
        if param is None:
            out[key] = value
            continue
        if value is None:
            continue
        if param.name in given:
            spellings = (*param.names, param.name)
            first, second = sorted((given[param.name], key), key=spellings.index)
            raise RequestError(
                param.wire if wire else param.name,
                f"{first} and {second} are the same parameter; give one of them",
            )
        given[param.name] = key
        out[param.wire if wire else param.name] = value
    return out


def is_bool(value: Any) -> bool:
    """``True`` for Python and numpy booleans (which are no step count, even though bool is an int)."""
    dtype = getattr(value, "dtype", None)
    return isinstance(value, bool) or (
        getattr(dtype, "kind", None) == "b" and getattr(value, "shape", None) == ()
    )


def listed(value: Any) -> list:
    """A :attr:`InputParam.per_controlnet` value as a list: a list or tuple as given, anything
    else as a list of one."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def check_value(param: InputParam | str, value: Any, index: int | None = None) -> Any:
    """``value`` checked against the parameter's type and bounds, as a plain Python value.

    Integers accept any integral number (``numpy.int64`` too), floats any finite real number;
    booleans are refused for both. Text must be valid Unicode (a lone surrogate makes tokenizers
    fail deep inside: faults catalogue case 18). ``index``: the value is element ``index`` of a
    list (:attr:`InputParam.per_controlnet`), named ``name[index]`` in messages.

    Raises:
        RequestError: naming the parameter (its field), the value and what is allowed.
    """
    p = PARAMS[param] if isinstance(param, str) else param
    name = p.name if index is None else f"{p.name}[{index}]"
    if p.kind is Kind.TEXT:
        return _text(name, value, p.required, p.name)
    if p.kind is Kind.BOOL:
        if not is_bool(value):
            raise RequestError(p.name, f"{name} {value!r} is not true or false")
        return bool(value)
    if p.kind is Kind.INT:
        if is_bool(value) or not isinstance(value, numbers.Integral):
            raise RequestError(p.name, f"{name} {value!r} is not an integer")
        value = int(value)  # numpy.int64 -> int: records and JSON hold plain ints
    elif p.kind is Kind.FLOAT:
        if is_bool(value) or not isinstance(value, numbers.Real):
            raise RequestError(p.name, f"{name} {value!r} is not a number")
        value = float(value)
        if not math.isfinite(value):
            raise RequestError(p.name, f"{name} {value} is not a finite number; use {p.range_text}")
    else:
        return value
    too_low = p.low is not None and (value <= p.low if p.low_open else value < p.low)
    if too_low or (p.high is not None and value > p.high):
        note = f" ({p.note})" if p.note else ""
        allowed = p.range_text if p.high is not None else f"{_num(p.low)} or more"
        raise RequestError(p.name, f"{name} {_num(value)} is outside {allowed}{note}")
    return value


def _text(name: str, value: Any, required: bool, field: str | None = None) -> str:
    field = field or name
    if not isinstance(value, str):
        raise RequestError(field, f"{name} must be text, got {type(value).__name__}")
    if len(value) > MAX_PROMPT_CHARS:
        raise RequestError(
            field,
            f"{name} is {len(value)} characters, more than the {MAX_PROMPT_CHARS} accepted (the text "
            "encoders read at most 256 tokens, a few thousand characters)",
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        # A lone UTF-16 surrogate (JSON "\ud800", or invalid UTF-8 on a command line, which Python
        # keeps as surrogates): tokenizers fail on it deep inside (faults.md #18).
        raise RequestError(
            field,
            f"{name} is not valid Unicode text: {value[err.start]!r} at character {err.start} is a lone "
            "surrogate (invalid UTF-8 bytes, or half of a UTF-16 pair)",
        ) from None
    if required and not value.strip():
        raise RequestError(field, f"{name} is empty; give a text {name.replace('_', ' ')}")
    return str(value)  # numpy.str_ -> str
