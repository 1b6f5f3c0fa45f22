"""The engine manifest, ``engines/manifest.json``: one pydantic model, read and written through it.

The manifest is self-contained: per component the engine file, what was built and for which
GPU / TensorRT version, its profile and source ONNX; plus the model dims, the runtime defaults,
the tokenizer / scheduler files beside the engines and the weights they hold. The runtime needs
nothing else; checking and opening the engines is :mod:`sd35trt.backends.load`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_serializer,
    model_serializer,
)

from sd35trt.artifacts.manifest import FileRecord
from sd35trt.artifacts.repair import REBUILD
from sd35trt.components import (
    Component,
    ComponentSpec,
    ModelDims,
    ShapeRange,
    refuse_untyped_controlnet,
    spec,
)
from sd35trt.config import Backend, Precision, RuntimeSettings
from sd35trt.errors import ManifestError, validation_message
from sd35trt.user_files import read_json

ENGINE_MANIFEST_NAME = "manifest.json"
ENGINE_FORMAT = 1


class _Model(BaseModel):
    # Read strictly (``read_engine_manifest``): "12" is not a size, 1 is not a bool. Unknown keys
    # are ignored (the format number guards incompatible changes).
    model_config = ConfigDict(extra="ignore", frozen=True)


class LayerReport(BaseModel):
    """Per-engine precision evidence, recorded in the engine manifest (``layers``).

    ``detailed``: built with ``ProfilingVerbosity.DETAILED``; ``quantized_linear``: ONNX MatMul /
    Gemm nodes with an FP8 ``DequantizeLinear`` input; ``fp8_gemms``: engine GEMM layers reading
    FP8 inputs; ``fell_back``: quantized ONNX nodes in no FP8 GEMM layer (at most
    :data:`sd35trt.backends.layers.MAX_NAMED` named; ``fell_back_count`` counts them all);
    ``source``: ``engine inspector`` (TensorRT) or ``builder log`` (TensorRT-RTX);
    ``fp8_gemm_layers``: FP8 GEMM layer -> the quantized ONNX nodes fused into it;
    ``fused_attention_tactics``: per tactic name, kernel hash dropped; ``output_precisions``: a
    layer counts once per output type; ``weights_bytes`` / ``activation_bytes``: the builder log's
    ``Total Weights Memory`` / ``Total Activation Memory``, bytes.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    detailed: bool
    layers: int
    by_precision: dict[str, int]
    quantized_linear: int
    fp8_gemms: int
    fell_back: list[str]
    fell_back_count: int
    fused_attention: list[str]
    source: str = "engine inspector"
    fp8_gemm_layers: dict[str, list[str]] = {}
    fused_attention_tactics: dict[str, int] = {}
    output_precisions: dict[str, int] = {}
    weights_bytes: int | None = None
    activation_bytes: int | None = None

    @property
    def fp8_complete(self) -> bool:
        """Every quantized Linear layer runs inside an FP8 GEMM (trivially so without any)."""
        return self.fell_back_count == 0

    def summary(self) -> str:
        """``120 layers (kgen 74, ...); 43/43 quantized MatMuls in 29 FP8 GEMMs; fused attention 0``."""
        if not self.detailed:
            return f"{self.layers} layers (built without detailed layer information)"
        precisions = ", ".join(
            f"{k} {v}" for k, v in sorted(self.by_precision.items(), key=lambda kv: -kv[1])
        )
        inside = self.quantized_linear - self.fell_back_count
        fp8 = (
            f"{inside}/{self.quantized_linear} quantized MatMuls in {self.fp8_gemms} FP8 GEMMs; "
            if self.quantized_linear or self.fp8_gemms
            else ""
        )
        return f"{self.layers} layers ({precisions}); {fp8}fused attention layers {len(self.fused_attention)}"


class EngineRecord(_Model):
    """One component's engine, as built (the component is its key in :attr:`EngineManifest.engines`)."""

    backend: Backend
    file: FileRecord  # relative to the engines directory
    precision: Precision  # dtype of the float tensors
    fp8: bool  # FP8 Q/DQ layers are in the engine
    profile: dict[str, ShapeRange]
    source_onnx: FileRecord  # relative to the run directory
    build_seconds: float
    extra_files: tuple[FileRecord, ...] = ()  # external weights of an ONNX Runtime engine
    skip_layers: int = Field(default=0, ge=0)  # transformer: size of the skip-layer-guidance input
    #: transformer: the ControlNet residuals it takes (model.controlnet); written only when > 0
    controlnet_layers: int = Field(default=0, ge=0)
    tensorrt_version: str | None = None  # of the record's backend: TensorRT or TensorRT-RTX
    gpu_name: str | None = None
    compute_capability: tuple[int, int] | None = None
    options: dict[str, Any] = Field(default_factory=dict)  # backend build / session options
    layers: LayerReport | None = None  # TensorRT: what the engine runs, per precision
    #: TensorRT: activation memory at the largest profile, and the weights weight streaming can page.
    device_memory_bytes: int | None = Field(default=None, ge=0)
    streamable_weights_bytes: int | None = Field(default=None, ge=0)
    #: TensorRT-RTX: the GPU architectures the plan was built for (it loads on these only).
    compute_capabilities: tuple[tuple[int, int], ...] = ()

    @property
    def files(self) -> tuple[FileRecord, ...]:
        return (self.file, *self.extra_files)

    @field_serializer("build_seconds")
    def _rounded(self, value: float) -> float:
        return round(value, 3)

    @model_serializer(mode="wrap")
    def _controlnet_only_where_built(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)  # manifests without a ControlNet keep their bytes
        if not self.controlnet_layers:
            data.pop("controlnet_layers", None)
        return data


class EngineManifest(_Model):
    """``engines/manifest.json``. ``directory`` is where it was read from (not written)."""

    directory: Path = Field(default=Path("."), exclude=True)
    format: int = ENGINE_FORMAT
    created: str = ""
    backend: Backend
    engines: dict[Component, EngineRecord]  # in execution order (Component's order)
    dims: ModelDims
    runtime_defaults: RuntimeSettings
    build_settings: dict[str, Any]
    support_files: tuple[FileRecord, ...]  # tokenizers and scheduler config
    versions: dict[str, str] = Field(default_factory=dict)
    #: the weights the engines hold: ``{hub: {repo_id, revision, commit} | None, loras: [...]}``
    #: as the export record has them (absent in older manifests).
    model: dict[str, Any] = Field(default_factory=dict)

    def spec(self, component: Component) -> ComponentSpec:
        """The I/O contract of ``component``'s engine."""
        tr = self.engines.get(Component.TRANSFORMER)
        controlnet = tr.controlnet_layers if tr is not None else 0  # the ControlNet's outputs too
        rec = self.record(component)
        # SD3.5-large's ControlNets take no text: their profile has no such input
        text = not component.is_controlnet or "encoder_hidden_states" in rec.profile
        return spec(component, self.dims, rec.skip_layers, controlnet, text)

    def record(self, component: Component) -> EngineRecord:
        """The engine record of ``component``.

        Raises:
            ManifestError: the manifest has no engine for it (the built ones are named).
        """
        try:
            return self.engines[component]
        except KeyError:
            built = ", ".join(c.value for c in self.engines) or "none"
            raise ManifestError(
                f"{self.directory} has no {component.value} engine (built: {built}); {REBUILD}"
            ) from None

    def path(self, component: Component) -> Path:
        return self.directory / self.record(component).file.path

    def to_json(self) -> dict:
        """The manifest as written (``directory`` left out)."""
        return self.model_dump(mode="json")


def read_engine_manifest(engines_dir: str | Path) -> EngineManifest:
    """Parse ``engines_dir/manifest.json`` without checking any file.

    Raises:
        ManifestError: missing, not JSON, another format, or a field missing or of the wrong JSON
            type (the file and the field are named).
    """
    directory = Path(engines_dir)
    path = directory / ENGINE_MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(
            f"{path} does not exist: {directory} is not an engines directory; run `sd35trt build`"
        )
    data = read_json(path, REBUILD)
    if data.get("format") != ENGINE_FORMAT:
        raise ManifestError(
            f"{path} has format {data.get('format')!r}, this sd35trt reads format {ENGINE_FORMAT}; {REBUILD}"
        )
    refuse_untyped_controlnet(data.get("engines") or {}, str(path))
    try:
        manifest = EngineManifest.model_validate_json(path.read_bytes(), strict=True)
    except ValidationError as err:
        raise ManifestError(
            validation_message(err, f"{path} is malformed", limit=3) + f"; {REBUILD}"
        ) from None
    engines = {c: manifest.engines[c] for c in Component if c in manifest.engines}  # execution order
    return manifest.model_copy(update={"directory": directory, "engines": engines})
