"""Typed configuration: one pydantic model per stage, loaded from YAML.

Every model forbids unknown keys, so a misspelt key is an error naming the key and the file.
Closed sets (backends, precisions, model sources) are enums. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
import re
import typing
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from sd35trt.controlnet_settings import ControlNetSettings, ControlType, OptionalControlNet  # noqa: F401
from sd35trt.errors import ConfigError, validation_message
from sd35trt.parameters import PARAMS
from sd35trt.user_files import parse_yaml, read_text_file

#: Image sizes must be multiples of this: the VAE downsamples 8x and the transformer patchifies 2x2.
SIZE_MULTIPLE = 16


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)


class ModelSource(str, Enum):
    """Where the diffusers pipeline comes from."""

    TINY = "tiny"  # the built-in tiny SD3.5-shaped pipeline (sd35trt.models.tiny), generated offline
    LOCAL = "local"  # a local diffusers directory (safetensors only)
    HUB = "hub"  # a Hugging Face repo id, resolved through the local Hugging Face cache (sd35trt.models.hub)
    RANDOM = "random"  # random weights with a published architecture's shapes (scale tests)


class Architecture(str, Enum):
    TINY = "tiny"
    SD35_MEDIUM = "sd3.5-medium"
    SD35_LARGE = "sd3.5-large"


class Precision(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


class LoadDtype(str, Enum):
    """Dtype to load PyTorch modules in; ``auto`` is BF16 on CUDA and FP32 on CPU."""

    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"


class Backend(str, Enum):
    AUTO = "auto"
    TENSORRT = "tensorrt"
    #: TensorRT for RTX: builds on any machine (no GPU needed) for compute capability targets.
    TENSORRT_RTX = "tensorrt-rtx"
    ONNXRUNTIME = "onnxruntime"


class ComputeCapability(str, Enum):
    """A GPU architecture TensorRT-RTX 1.7 builds for (its ``ComputeCapability`` enum, SM75..SM121).

    Sources: TensorRT-RTX's ``ComputeCapability`` members; FP8 tensor cores from compute
    capability 8.9 (Ada), FP4 on 12.x (Blackwell) only (TensorRT-RTX support matrix).
    """

    SM75 = "7.5"
    SM80 = "8.0"
    SM86 = "8.6"
    SM89 = "8.9"
    SM120 = "12.0"
    SM121 = "12.1"

    @property
    def version(self) -> tuple[int, int]:
        """``(8, 9)`` for ``8.9``."""
        major, minor = self.value.split(".")
        return int(major), int(minor)

    @property
    def has_fp8(self) -> bool:
        return self.version >= (8, 9)

    @property
    def has_fp4(self) -> bool:
        return self.version[0] == 12

    @property
    def examples(self) -> str:
        """GPUs of this compute capability, for people (NVIDIA's CUDA GPU list)."""
        return _CC_EXAMPLES[self]


_CC_EXAMPLES = {
    ComputeCapability.SM75: "RTX 2080 Ti, T4",
    ComputeCapability.SM80: "A100",
    ComputeCapability.SM86: "RTX 3090, A6000",
    ComputeCapability.SM89: "RTX 4090, L40S, L4",
    ComputeCapability.SM120: "RTX 5090, RTX PRO 6000 Blackwell",
    ComputeCapability.SM121: "DGX Spark (GB10)",
}
#: TensorRT-RTX targets when ``build.compute_capabilities`` is not set: the GPUs with FP8 when the
#: build has FP8 engines, else TensorRT-RTX's own default set.
FP8_COMPUTE_CAPABILITIES = (ComputeCapability.SM89, ComputeCapability.SM120)
ALL_COMPUTE_CAPABILITIES = (
    ComputeCapability.SM80,
    ComputeCapability.SM86,
    ComputeCapability.SM89,
    ComputeCapability.SM120,
)


class Range(_Strict):
    """An inclusive ``min <= opt <= max`` range (a dimension of an optimization profile)."""

    min: StrictInt = Field(ge=1)
    opt: StrictInt = Field(ge=1)
    max: StrictInt = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"needs min <= opt <= max, got min={self.min} opt={self.opt} max={self.max}")
        return self

    @classmethod
    def static(cls, value: int) -> Range:
        return cls(min=value, opt=value, max=value)

    def contains(self, value: int) -> bool:
        return self.min <= value <= self.max


#: ``namespace/name`` as the Hugging Face Hub spells repo ids (huggingface_hub's own rule).
REPO_ID_PATTERN = r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$"


class LoraSettings(_Strict):
    """One LoRA fused into the model before calibration and export (see :mod:`sd35trt.models.lora`)."""

    path: str = Field(
        min_length=1,
        description="a local .safetensors file (or a directory holding one), or a Hugging Face repo id",
    )
    #: diffusers' ``lora_scale``: the LoRA's update is added ``scale`` times.
    scale: StrictFloat = Field(default=1.0, ge=-10.0, le=10.0)
    #: the file inside a Hub repo or directory (diffusers' ``weight_name``); default: its only .safetensors.
    weight_name: str | None = Field(default=None, pattern=r"^[^/\\]+\.safetensors$")
    #: Hub revision (branch, tag or commit) of a LoRA given by repo id.
    revision: str | None = Field(default=None, min_length=1)


class ModelSettings(_Strict, OptionalControlNet):
    source: ModelSource = ModelSource.TINY
    path: Path | None = Field(
        default=None, description="local diffusers directory (source: local), or a repo id (source: hub)"
    )
    #: Hub revision (branch, tag or commit hash) of ``path`` (source: hub); default ``main``.
    revision: str | None = Field(default=None, min_length=1)
    #: Let sd35trt download what the Hugging Face cache lacks (with the user's Hub token). Also
    #: ``SD35TRT_ALLOW_DOWNLOAD=1``. Not part of any digest: it says how files arrive, not which.
    allow_download: bool = Field(default=False, exclude=True)
    architecture: Architecture = Architecture.TINY
    seed: StrictInt = Field(default=0, ge=0, description="weight seed for source tiny / random")
    #: LoRAs fused into the weights, in order, before calibrate and export.
    loras: tuple[LoraSettings, ...] = ()

    @model_validator(mode="after")
    def _path_matches_source(self) -> ModelSettings:
        if self.source is ModelSource.LOCAL and self.path is None:
            raise ValueError("source 'local' needs 'path' (a diffusers directory)")
        if self.source is ModelSource.HUB:
            if self.path is None or not re.fullmatch(REPO_ID_PATTERN, self.path.as_posix()):
                raise ValueError(
                    f"source 'hub' needs 'path' as a Hugging Face repo id 'namespace/name', got "
                    f"{None if self.path is None else self.path.as_posix()!r}"
                )
        elif self.revision is not None:
            raise ValueError(f"'revision' is only used with source 'hub', not '{self.source.value}'")
        if self.source not in (ModelSource.LOCAL, ModelSource.HUB) and self.path is not None:
            raise ValueError(f"'path' is only used with sources 'local' and 'hub', not '{self.source.value}'")
        if self.source is ModelSource.TINY and self.architecture is not Architecture.TINY:
            raise ValueError(
                "source 'tiny' has architecture 'tiny'; use source 'random' for published shapes"
            )
        return self


class CalibrateSettings(_Strict):
    prompts: Path = Path("calibration_prompts/calibration.txt")
    heldout_prompts: Path = Path("calibration_prompts/heldout.txt")
    num_prompts: StrictInt = Field(default=32, ge=1, le=100_000)
    batch_size: StrictInt = Field(default=1, ge=1, le=64)
    steps: StrictInt = Field(default=20, ge=1, le=200)
    guidance_scale: StrictFloat = Field(default=4.5, ge=0.0, le=50.0)
    height: StrictInt = Field(default=1024, ge=SIZE_MULTIPLE)
    width: StrictInt = Field(default=1024, ge=SIZE_MULTIPLE)
    seed: StrictInt = Field(default=0, ge=0)
    dtype: LoadDtype = LoadDtype.AUTO
    #: fnmatch patterns over transformer module names kept out of FP8.
    exclude: tuple[str, ...] = (
        "time_text_embed*",
        "pos_embed*",
        "context_embedder*",
        "norm_out*",
        "proj_out*",
    )
    #: transformer_blocks indices kept entirely in high precision.
    high_precision_blocks: tuple[StrictInt, ...] = ()
    fp8_attention: bool = False
    #: quality report: number of held-out prompts and steps.
    report_prompts: StrictInt = Field(default=4, ge=1)
    report_steps: StrictInt | None = Field(default=None, ge=1)

    @field_validator("height", "width")
    @classmethod
    def _multiple(cls, v: int) -> int:
        if v % SIZE_MULTIPLE:
            raise ValueError(f"{v} is not a multiple of {SIZE_MULTIPLE}")
        return v


class ComponentPrecisions(_Strict):
    """Export dtype per component. T5 overflows in FP16 (NaN, black images), so it is refused."""

    clip_l: Precision = Precision.FP32
    clip_g: Precision = Precision.FP32
    t5: Precision = Precision.FP32
    transformer: Precision = Precision.FP32
    vae_decoder: Precision = Precision.FP32
    vae_encoder: Precision = Precision.FP32

    @field_validator("t5")
    @classmethod
    def _t5_not_fp16(cls, v: Precision) -> Precision:
        if v is Precision.FP16:
            raise ValueError("T5 overflows in fp16 (NaN / black images); use bf16 or fp32")
        return v


class ExportSettings(_Strict):
    opset: StrictInt = Field(default=19, ge=19, le=23)
    precision: ComponentPrecisions = ComponentPrecisions()
    quantize: bool = True
    fp8_weights: bool = False
    #: transformer_blocks indices computed in fp32 inside a 16-bit transformer graph (their
    #: weights fp32, Casts at their inputs and outputs). NVIDIA's FP8 recipe for SD3.5 Large runs
    #: block 35 this way. With ``quantize`` they must also be in ``calibrate.high_precision_blocks``.
    fp32_blocks: tuple[StrictInt, ...] = ()

    @field_validator("fp32_blocks")
    @classmethod
    def _blocks(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        bad = [b for b in v if b < 0]
        if bad:
            raise ValueError(f"block indices start at 0, got {bad}")
        return tuple(sorted(set(v)))


class BuildSettings(_Strict):
    backend: Backend = Backend.AUTO
    #: images per request (before classifier-free guidance doubles the transformer batch).
    batch: Range = Range(min=1, opt=1, max=2)
    height: Range = Range(min=512, opt=1024, max=1536)
    width: Range = Range(min=512, opt=1024, max=1536)
    #: TensorRT builder optimization level; 4 as ModelOpt and NVIDIA's demo/Diffusion build FP8 engines.
    optimization_level: StrictInt = Field(default=4, ge=0, le=5)
    workspace_gib: StrictFloat | None = Field(default=None, gt=0)
    weight_streaming: bool = False
    #: With weight_streaming: GiB of streamable weights kept on the GPU at run time; None lets
    #: TensorRT choose (its automatic budget for the free device memory).
    weight_streaming_budget_gib: StrictFloat | None = Field(default=None, ge=0)
    refit: bool = False
    #: TensorRT-RTX: the GPU architectures the engines are built for (portable across them);
    #: None: 8.9 and 12.0 for FP8 builds, else 8.0, 8.6, 8.9 and 12.0.
    compute_capabilities: tuple[ComputeCapability, ...] | None = None

    @field_validator("compute_capabilities", mode="before")
    @classmethod
    def _capabilities_as_text(cls, v: Any) -> Any:
        # YAML reads 8.9 and 12.0 as floats.
        if isinstance(v, list | tuple):
            return tuple(f"{c:.1f}" if isinstance(c, float) else c for c in v)
        return v

    @model_validator(mode="after")
    def _sizes(self) -> BuildSettings:
        if self.weight_streaming_budget_gib is not None and not self.weight_streaming:
            raise ValueError("weight_streaming_budget_gib needs weight_streaming: true")
        if self.compute_capabilities == ():
            raise ValueError("compute_capabilities is empty: list targets (e.g. [8.9, 12.0]) or leave it out")
        for name in ("height", "width"):
            r: Range = getattr(self, name)
            for key in ("min", "opt", "max"):
                if getattr(r, key) % SIZE_MULTIPLE:
                    raise ValueError(f"{name}.{key} = {getattr(r, key)} is not a multiple of {SIZE_MULTIPLE}")
        return self


class SkipLayerGuidance(_Strict):
    layers: tuple[StrictInt, ...]
    scale: StrictFloat = Field(default=2.8, ge=0.0)
    start: StrictFloat = Field(default=0.01, ge=0.0, le=1.0)
    stop: StrictFloat = Field(default=0.2, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _window(self) -> SkipLayerGuidance:
        if not self.layers:
            raise ValueError("layers must name at least one transformer block")
        if self.start >= self.stop:
            raise ValueError(f"start ({self.start}) must be below stop ({self.stop})")
        return self


class CacheMethod(str, Enum):
    """How denoising steps reuse earlier transformer work (:mod:`sd35trt.runtime.cache`)."""

    FIRST_BLOCK = "first_block"  # diffusers' FirstBlockCache


class CacheSettings(_Strict):
    """``runtime.cache``: build the transformer as two engines and skip the second on quiet steps.

    A step runs the rest of the transformer only when its first block's residual changed by more
    than ``threshold`` (relative mean absolute change against the last computed step, as diffusers'
    ``FirstBlockCacheConfig.threshold``); 0 never skips. Requests may override the threshold.
    """

    method: CacheMethod = CacheMethod.FIRST_BLOCK
    #: the largest relative change of the first block's residual that still reuses the cache.
    threshold: StrictFloat = Field(default=0.05, ge=0.0, le=PARAMS["cache_threshold"].high)


_STEPS, _GUIDANCE = PARAMS["num_inference_steps"], PARAMS["guidance_scale"]


class RuntimeSettings(_Strict):
    """Generation defaults recorded with the engines; names are diffusers' ``__call__`` parameters."""

    #: Bounds and aliases are the declared ones (:mod:`sd35trt.parameters`): ``steps`` is read as
    #: well (configs and engine manifests written before the rename use it).
    num_inference_steps: StrictInt = Field(
        default=28, ge=_STEPS.low, le=_STEPS.high, validation_alias=AliasChoices(*_STEPS.names)
    )
    guidance_scale: StrictFloat = Field(default=3.5, ge=_GUIDANCE.low, le=_GUIDANCE.high)
    height: StrictInt = 1024
    width: StrictInt = 1024
    max_sequence_length: StrictInt = Field(default=256, ge=1, le=512)
    negative_prompt: str = ""
    skip_layer_guidance: SkipLayerGuidance | None = None
    #: the first-block cache (off when absent): export and build make the two transformer engines.
    cache: CacheSettings | None = None


class Config(_Strict):
    """A whole sd35trt config file."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    model: ModelSettings = ModelSettings()
    calibrate: CalibrateSettings = CalibrateSettings()
    export: ExportSettings = ExportSettings()
    build: BuildSettings = BuildSettings()
    runtime: RuntimeSettings = RuntimeSettings()

    @model_validator(mode="after")
    def _fp32_blocks(self) -> Config:
        blocks = self.export.fp32_blocks
        if not blocks:
            return self
        if self.export.precision.transformer is Precision.FP32:
            raise ValueError(
                f"export.fp32_blocks {list(blocks)} has no effect with export.precision.transformer fp32 "
                "(the whole graph is fp32); use bf16 or fp16 for the transformer, or drop fp32_blocks"
            )
        if self.export.quantize:
            fp8 = sorted(set(blocks) - set(self.calibrate.high_precision_blocks))
            if fp8:
                raise ValueError(
                    f"export.fp32_blocks {fp8} must also be in calibrate.high_precision_blocks "
                    f"(now {list(self.calibrate.high_precision_blocks)}): an fp32 block carries no FP8"
                )
        return self

    @model_validator(mode="after")
    def _cache_keeps_first_block(self) -> Config:
        slg = self.runtime.skip_layer_guidance
        if self.runtime.cache is not None and slg is not None and 0 in slg.layers:
            raise ValueError(
                f"runtime.skip_layer_guidance.layers {list(slg.layers)} includes block 0, which "
                "runtime.cache compares between steps and never skips; use layers from 1 (SD3.5: 7, 8, 9)"
            )
        return self

    @model_validator(mode="after")
    def _fp8_targets(self) -> Config:
        targets = self.build.compute_capabilities or ()
        lacking = [c.value for c in targets if not c.has_fp8]
        if self.export.quantize and lacking:
            raise ValueError(
                f"build.compute_capabilities has {', '.join(lacking)}, which runs no FP8 (needs 8.9 or "
                "newer: 8.9, 12.0, 12.1); drop it, or export without FP8 (export.quantize: false)"
            )
        return self

    @model_validator(mode="after")
    def _runtime_inside_profiles(self) -> Config:
        for name in ("height", "width"):
            value = getattr(self.runtime, name)
            r: Range = getattr(self.build, name)
            if not r.contains(value):
                raise ValueError(f"runtime.{name} = {value} is outside build.{name} range {r.min}..{r.max}")
        return self

    @model_validator(mode="after")
    def _fp8_attention_precision(self) -> Config:
        # ModelOpt exports FP8 attention (the layout TensorRT's fused kernels need) for 16-bit graphs only.
        transformer = self.export.precision.transformer
        if self.export.quantize and self.calibrate.fp8_attention and transformer is Precision.FP32:
            raise ValueError(
                "calibrate.fp8_attention needs export.precision.transformer fp16 or bf16, got fp32 "
                "(ModelOpt exports FP8 attention for 16-bit graphs only)"
            )
        return self

    def values(self, *paths: str) -> dict[str, Any]:
        """The JSON values at config paths (``"model"``, ``"runtime.height"``), keyed by path.

        A path below an unset section (``runtime.skip_layer_guidance.layers``) is ``None``.

        Raises:
            ValueError: a path that names no config field (:func:`check_config_path`).
        """
        data, picked = self.model_dump(mode="json"), {}
        for path in paths:
            value: Any = data
            for key in check_config_path(path):
                value = value.get(key) if isinstance(value, dict) else None
            picked[path] = value
        return picked

    def digest(self, *paths: str) -> str:
        """sha256 (canonical JSON) of :meth:`values` (a path that names no field is a ValueError)."""
        return sha256_json(self.values(*paths))


def check_config_path(path: str) -> tuple[str, ...]:
    """The keys of a dotted config path, each checked against the fields of its section.

    Raises:
        ValueError: a key is not a field of its section (``runtime.max_sequnce_length``).
    """
    keys, model = tuple(path.split(".")), Config
    for i, key in enumerate(keys):
        if model is None or key not in model.model_fields:
            raise ValueError(f"config path {path!r}: {'.'.join(keys[: i + 1])} is not a config field")
        annotation = model.model_fields[key].annotation  # a section, or an optional one
        model = next((t for t in (annotation, *typing.get_args(annotation)) if _is_section(t)), None)
    return keys


def _is_section(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def sha256_json(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def config_from_dict(data: Any, source: str = "<config>") -> Config:
    """Validate a mapping into a :class:`Config`.

    Raises:
        ConfigError: naming every bad key of ``source`` and what was wrong with it.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a config must be a mapping of sections, got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(validation_message(err, f"{source}: invalid config", limit=None)) from None


def load_config(path: str | Path) -> Config:
    """Load and validate a YAML config file.

    Raises:
        ConfigError: the file is missing, a directory, not UTF-8 text, not YAML (or uses aliases or
            repeats a key), or fails validation (the key is named).
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        known = sorted(p.name for p in Path("configs").glob("*.yaml")) if Path("configs").is_dir() else []
        hint = f"; available: {', '.join(known)}" if known else ""
        raise ConfigError(f"config file {path} does not exist{hint}")
    data = parse_yaml(read_text_file(path, "config file"), str(path))
    return config_from_dict(data, str(path))
