"""The typed records of ``runs/<name>/manifest.json``: one pydantic model per stage record.

A record has the fields every stage shares (:class:`StageRecord`: stage, created, config digest,
upstream record digests, tool versions, files) and a ``details`` model of its own stage
(:class:`CalibrateDetails`, :class:`ExportDetails`, :class:`BuildDetails`). Writers construct
these models; :mod:`sd35trt.artifacts.manifest` reads, validates, writes and verifies them.

The JSON layout is manifest format 1, key for key: a record read from disk dumps back to the
same JSON, so its digest (which downstream records name it by) is unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, SerializerFunctionWrapHandler, model_serializer

from sd35trt.components import Component, ModelDims, QuantizerKind
from sd35trt.config import Backend, Config, ControlType, Precision, check_config_path, sha256_json
from sd35trt.guidance import cfg_enabled


class Stage(str, Enum):
    """Pipeline stages that write artefacts, in order; the value is also the CLI verb."""

    CALIBRATE = "calibrate"
    EXPORT = "export"
    BUILD = "build"

    @property
    def directory(self) -> str:
        """Sub-directory of the run directory the stage writes."""
        return {Stage.CALIBRATE: "calibrate", Stage.EXPORT: "onnx", Stage.BUILD: "engines"}[self]

    @property
    def config_sections(self) -> tuple[str, ...]:
        """Config sections whose change makes this stage's output stale."""
        return {
            # Calibration encodes prompts as the runtime does: its negative prompt and T5 length.
            Stage.CALIBRATE: ("model", "calibrate", "runtime.negative_prompt", "runtime.max_sequence_length"),
            # The transformer graph's skip-layer input and text length come from the runtime section.
            Stage.EXPORT: (
                "model",
                "export",
                "runtime.max_sequence_length",
                "runtime.skip_layer_guidance.layers",
                # with the cache on, the transformer is exported as its two first-block-cache parts
                "runtime.cache.method",
            ),
            # Only what shapes the engines: the other runtime settings are generation defaults,
            # rewritten into the engine manifest without a rebuild (:mod:`sd35trt.stages.build`).
            Stage.BUILD: ("build", "runtime.max_sequence_length"),
        }[self]

    @property
    def upstream(self) -> Stage | None:
        return {Stage.CALIBRATE: None, Stage.EXPORT: Stage.CALIBRATE, Stage.BUILD: Stage.EXPORT}[self]


for _stage in Stage:  # a misspelt path is refused at import, not hashed as None
    for _path in _stage.config_sections:
        check_config_path(_path)


#: The key of the weights' identity (resolved commit, LoRA hashes) in a fingerprint's inputs.
WEIGHTS_INPUT = "weights"
#: Build: whether CFG is on by default sets the engines' optimal batch, not the guidance value.
CFG_INPUT = "cfg_by_default"


@dataclass(frozen=True)
class Fingerprint:
    """What a stage's output depends on: the digest its record carries and the values behind it.

    ``digest``: sha256 of the values of ``stage.config_sections``, combined with the weights'
    identity (calibrate, export) and, for build, whether CFG is on by default (the engines' optimal
    batch). ``inputs``: those values by name, kept in the record so a stale one names what changed.
    """

    digest: str
    inputs: dict[str, Any]

    @classmethod
    def of(cls, config: Config, stage: Stage, identity: Mapping | None = None) -> Fingerprint:
        """The fingerprint of ``stage`` under ``config``; ``identity``: the weights' (may be empty).

        The digest of calibrate and export is the one earlier versions recorded, so their
        records stay fresh.
        """
        values = config.values(*stage.config_sections)
        extra: dict[str, Any] = {WEIGHTS_INPUT: dict(identity)} if identity else {}
        if stage is Stage.BUILD:
            extra[CFG_INPUT] = cfg_enabled(config.runtime.guidance_scale)
        digest = sha256_json({"config": sha256_json(values), **extra}) if extra else sha256_json(values)
        return cls(digest, {**values, **extra})

    def changes(self, recorded: Mapping | None, limit: int = 4) -> str | None:
        """``model.loras[0].scale 0.5 → 0.8, ...``: what differs from ``recorded`` inputs.

        ``None`` when ``recorded`` is ``None`` (a record from before inputs were kept) or equal.
        """
        if recorded is None:
            return None
        old, new = _leaves(dict(recorded)), _leaves(self.inputs)
        changed = [k for k in dict.fromkeys([*new, *old]) if old.get(k, _UNSET) != new.get(k, _UNSET)]
        if not changed:
            return None
        named = [f"{k} {_shown(old.get(k, _UNSET))} → {_shown(new.get(k, _UNSET))}" for k in changed[:limit]]
        more = len(changed) - limit
        return ", ".join(named) + (f" and {more} more" if more > 0 else "")


_UNSET = object()


def _leaves(value: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten JSON values to ``{"model.loras[0].scale": 0.5}`` (lists of scalars stay whole)."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out |= _leaves(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(value, list) and any(isinstance(v, dict | list) for v in value):
        out = {}
        for i, v in enumerate(value):
            out |= _leaves(v, f"{prefix}[{i}]")
        return out or {prefix: []}
    return {prefix: value}


def _shown(value: Any, width: int = 24) -> str:
    text = "unset" if value is _UNSET else json.dumps(value)
    return text if len(text) <= width else text[: width - 1] + "…"


@dataclass(frozen=True)
class FileRecord:
    """One file a stage wrote: POSIX ``path`` relative to the run (or engines) directory, ``size``
    in bytes, ``sha256`` of the whole file."""

    path: str
    size: int
    sha256: str

    def to_json(self) -> dict:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


class RecordModel(BaseModel):
    """Base of the manifest's models: unknown keys refused, immutable once built."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    #: ``{field: keys}``: keys left out of the JSON while ``field`` is ``None``, so records written
    #: before the field existed keep their digests.
    _omitted_while_none: ClassVar[dict[str, tuple[str, ...]]] = {}

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        for name, keys in self._omitted_while_none.items():
            if getattr(self, name) is None:
                for key in keys:
                    data.pop(key, None)
        return data

    def to_json(self) -> dict:
        """The model as JSON-ready data, with the manifest's key names."""
        return self.model_dump(mode="json")


# -- the weights -------------------------------------------------------------------------------


class HubRevision(RecordModel):
    """A Hugging Face repo at the commit a revision resolved to (:mod:`sd35trt.models.hub`)."""

    repo_id: str
    revision: str
    commit: str


class LoraInput(RecordModel):
    """A LoRA fused into the weights (:mod:`sd35trt.models.lora`)."""

    #: as configured (a file, a directory or a repo id).
    path: str
    #: the ``.safetensors`` file's name.
    file: str
    sha256: str
    scale: float
    hub: HubRevision | None = None


class ControlNetInput(RecordModel):
    """A ControlNet exported beside the weights
    (:meth:`sd35trt.models.controlnet.ResolvedControlNet.provenance`)."""

    #: its control type (``model.controlnet[i].type``), which names its engine.
    type: ControlType
    #: where it was read when ``path`` named it, and its Hub commit for a repo id.
    directory: str | None = None
    hub: HubRevision | None = None
    _omitted_while_none: ClassVar = {"directory": ("directory", "hub")}


class ModelInput(RecordModel):
    """The weights a stage was made from (:meth:`sd35trt.models.loading.ResolvedModel.provenance`)."""

    directory: str
    hub: HubRevision | None = None
    loras: tuple[LoraInput, ...] = ()
    #: the ControlNets exported beside it (``model.controlnet``), in the config's order.
    controlnets: tuple[ControlNetInput, ...] = ()

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)  # records without a ControlNet keep their digests
        if not self.controlnets:
            data.pop("controlnets", None)
        return data


class WeightsDetails(RecordModel):
    """Details of a stage that loads the weights: calibrate and export.

    ``model`` is ``None`` in records written before it was recorded; the key is then left out of
    the JSON, so those records keep their digests.
    """

    #: the model (Hub commit) and the LoRAs fused into the weights.
    model: ModelInput | None = None
    _omitted_while_none: ClassVar = {"model": ("model",)}


# -- calibrate ----------------------------------------------------------------------------------


class QuantizerCounts(RecordModel):
    """Quantizers of the calibrated transformer by kind (:func:`~sd35trt.models.quantize.summarize`)."""

    enabled: dict[QuantizerKind, int]
    disabled: dict[QuantizerKind, int]
    #: Linear layers kept out of FP8 (module names).
    high_precision_linears: tuple[str, ...]


class CalibrationQuality(RecordModel):
    """The held-out quality report's totals (``calibrate/calibration_report.json`` has the rest)."""

    steps: int
    metric: str
    #: mean relative error ``||fp8 - ref|| / ||ref||`` of the transformer output over all steps.
    overall_mean_error: float
    #: mean PSNR (dB) of the final images; ``None`` when every image is identical (infinite PSNR).
    mean_psnr_db: float | None
    mean_ssim: float


class CalibrateDetails(WeightsDetails):
    """What ``sd35trt calibrate`` calibrated on and measured (:mod:`sd35trt.stages.calibrate`)."""

    #: the amax file, relative to the run directory (``calibrate/amax.safetensors``).
    calibration_file: str
    #: relative to the run directory when inside it, else absolute (not to where calibrate ran).
    prompts_file: str
    #: sha256 of the calibration prompts, one per line (:func:`sd35trt.stages.calibrate.prompt_set_sha256`).
    prompt_set_sha256: str
    num_prompts: int
    heldout_prompt_set_sha256: str
    #: one seed per calibration batch, and per held-out batch.
    seeds: tuple[int, ...]
    report_seeds: tuple[int, ...]
    steps: int
    report_steps: int
    guidance_scale: float
    negative_prompt: str
    #: T5 token limit the prompts were encoded with.
    max_sequence_length: int
    batch_size: int
    #: image size in pixels.
    height: int
    width: int
    device: str
    #: torch dtype name, e.g. ``float32``.
    dtype: str
    summary: QuantizerCounts
    report: CalibrationQuality
    elapsed_s: float
    peak_memory_bytes: int
    #: what ``peak_memory_bytes`` measures (:func:`sd35trt.runtime.pipeline.peak_memory`).
    peak_memory_kind: str


# -- export -------------------------------------------------------------------------------------


class ValidationStatus(str, Enum):
    """Outcome of an exported graph's numerical check against PyTorch."""

    PASSED = "passed"
    FAILED = "failed"
    SKIPPED = "skipped"  # not validated: ONNX Runtime cannot run the graph here (the report says why)


class TensorSignature(RecordModel):
    """An ONNX graph input or output: element type name and shape (ints, or axis names if dynamic)."""

    dtype: str
    shape: tuple[int | str, ...]


#: Keys only the transformer's entry has (its unquantized twin and FP8 weight folding).
_TRANSFORMER_KEYS = ("onnx_unquantized", "onnx_unquantized_external_data", "fp8_weights")


class ExportedComponent(RecordModel):
    """One component's exported ONNX graph. Paths are relative to the run directory.

    ``fp8_weights`` is ``None`` for every component but the transformer, whose entry alone has
    the ``onnx_unquantized*`` and ``fp8_weights`` keys on disk; so is ``fp32_blocks`` (also for
    a transformer exported before fp32 blocks were recorded). Keys that are ``None`` for those
    reasons are left out of the JSON, as the writers of format 1 did.
    """

    onnx: str
    #: the external-data file the graph reads (graphs over 2 GB), else ``None``.
    external_data: str | None
    precision: Precision
    #: the graph carries FP8 Q/DQ nodes.
    quantized: bool
    inputs: dict[str, TensorSignature]
    outputs: dict[str, TensorSignature]
    validation: ValidationStatus
    #: the transformer without Q/DQ (the build's fallback on GPUs without FP8), if exported.
    onnx_unquantized: str | None = None
    onnx_unquantized_external_data: str | None = None
    #: the FP8 weights were folded into FP8 initializers (then there is no unquantized graph).
    fp8_weights: bool | None = None
    #: transformer blocks exported in float32 (``export.fp32_blocks``).
    fp32_blocks: tuple[int, ...] | None = None
    _omitted_while_none: ClassVar = {"fp8_weights": _TRANSFORMER_KEYS, "fp32_blocks": ("fp32_blocks",)}


class CalibrationInput(RecordModel):
    """The calibration an FP8 export restored: the calibrate record's digest and the amax file."""

    record: str
    #: relative to the run directory.
    file: str
    sha256: str


class ExportDetails(WeightsDetails):
    """What ``sd35trt export`` wrote (:mod:`sd35trt.stages.export.stage`); ``build`` reads it."""

    #: the diffusers model directory (the build copies its tokenizers and scheduler config):
    #: relative to the run directory when inside it, else absolute.
    model_dir: Path
    dims: ModelDims
    opset: int
    #: transformer blocks the skip-layer-guidance input can skip.
    skip_layers: tuple[int, ...]
    max_sequence_length: int
    #: ``onnx/export_report.json``, relative to the run directory.
    report: str
    calibration: CalibrationInput | None
    components: dict[Component, ExportedComponent]


# -- build --------------------------------------------------------------------------------------


class BuiltEngine(RecordModel):
    """One built engine; ``engines/manifest.json`` has everything else about it."""

    #: relative to the run directory.
    engine: str
    precision: Precision
    fp8: bool
    build_seconds: float


class BuildMachine(RecordModel):
    """The TensorRT version and GPU engines were built for (all ``None`` for ONNX Runtime)."""

    tensorrt_version: str | None
    gpu_name: str | None
    compute_capability: tuple[int, int] | None


class BuildDetails(RecordModel):
    """What ``sd35trt build`` built (:mod:`sd35trt.stages.build`)."""

    backend: Backend
    #: why ``auto`` chose this backend, or that it was asked for.
    backend_reason: str
    #: ``engines/manifest.json``, relative to the run directory.
    engines_manifest: str
    components: dict[Component, BuiltEngine]
    machine: BuildMachine


# -- records ------------------------------------------------------------------------------------


class StageRecord(RecordModel):
    """What every stage records: its files, the config digest and the upstream records it used.

    ``created``: ISO 8601 UTC, seconds; ``config_digest``: :attr:`Fingerprint.digest`, made from
    ``inputs``; ``upstream``: the :meth:`digest` of each upstream record the stage read;
    ``versions``: of the tools the outputs depend on.
    """

    stage: Stage
    created: str
    config_digest: str
    upstream: dict[Stage, str]
    versions: dict[str, str]
    files: tuple[FileRecord, ...]
    inputs: dict[str, Any] | None = None
    _omitted_while_none: ClassVar = {"inputs": ("inputs",)}

    def digest(self) -> str:
        """sha256 of the record's JSON: downstream records name their inputs by it."""
        return sha256_json(self.to_json())


class CalibrateRecord(StageRecord):
    stage: Literal[Stage.CALIBRATE] = Stage.CALIBRATE
    details: CalibrateDetails


class ExportRecord(StageRecord):
    stage: Literal[Stage.EXPORT] = Stage.EXPORT
    details: ExportDetails


class BuildRecord(StageRecord):
    stage: Literal[Stage.BUILD] = Stage.BUILD
    details: BuildDetails


#: The record model of each stage.
RECORD_TYPES: dict[Stage, type[StageRecord]] = {
    Stage.CALIBRATE: CalibrateRecord,
    Stage.EXPORT: ExportRecord,
    Stage.BUILD: BuildRecord,
}


class StageRecords(RecordModel):
    """The ``records`` object of the manifest file: at most one record per stage, keyed by stage.

    Only the schema of the file; :class:`sd35trt.artifacts.manifest.RunManifest` hands out the records as
    ``{Stage: record}`` (see :meth:`by_stage`).
    """

    calibrate: CalibrateRecord | None = None
    export: ExportRecord | None = None
    build: BuildRecord | None = None

    def by_stage(self) -> dict[Stage, StageRecord]:
        present = {Stage.CALIBRATE: self.calibrate, Stage.EXPORT: self.export, Stage.BUILD: self.build}
        return {stage: rec for stage, rec in present.items() if rec is not None}


class ManifestFile(RecordModel):
    """``runs/<name>/manifest.json``: the format version and the records."""

    format: int
    records: StageRecords
