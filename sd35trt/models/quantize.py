"""FP8 E4M3 post-training quantization of the MMDiT with NVIDIA ModelOpt.

What is quantized is decided here, once (:func:`quant_config`): the weights and inputs of every
``nn.Linear`` of the transformer, one scale per tensor, ``max`` calibration, except the modules
matched by ``calibrate.exclude`` (embedders, ``norm_out``, ``proj_out`` by default) and the
``calibrate.high_precision_blocks``; with ``calibrate.fp8_attention`` also the query, key, value
and softmax output, so the graph carries Q/DQ around attention as TensorRT's fused FP8 attention
needs. The calibration is a safetensors file of amax tensors (no pickle) that
:func:`restore_calibration` turns back into the same fake-quant model. ModelOpt is imported inside
the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd35trt.artifacts.records import QuantizerCounts
from sd35trt.components import ATTENTION_QUANTIZERS, QuantizerKind
from sd35trt.config import CalibrateSettings
from sd35trt.errors import CalibrationError, ConfigError

if TYPE_CHECKING:
    from torch import nn

#: FP8 E4M3 as ModelOpt spells it: (exponent bits, mantissa bits).
FP8_E4M3 = (4, 3)
#: Largest finite FP8 E4M3FN magnitude (no infinity: QuantizeLinear saturates); ModelOpt's FP8 scale
#: is ``amax / FP8_MAX``.
FP8_MAX = 448.0
#: TensorRT's fused FP8 attention kernels need a head dimension that is a multiple of this.
FP8_ATTENTION_HEAD_DIM_MULTIPLE = 16
#: The range of a softmax output. SDPA fuses the softmax, so calibration never sees it; this is
#: its exact bound and the scale ModelOpt's FP8 attention export writes for it.
SOFTMAX_AMAX = 1.0
#: The calibration file inside the run's ``calibrate/`` directory (export restores it).
CALIBRATION_FILE = "amax.safetensors"
#: Identifies the calibration file layout (safetensors metadata ``format``).
CALIBRATION_FORMAT = "sd35trt-fp8-amax/1"
#: The safetensors metadata key holding the format and every quantizer's state, as JSON.
METADATA_KEY = "sd35trt"
#: Name of the transformer's block list, as in diffusers' ``SD3Transformer2DModel``.
BLOCKS = "transformer_blocks"


def quantizer_table(counts: QuantizerCounts) -> str:
    """A small text table under a title: one row per quantizer kind, enabled and disabled counts."""
    rows = [
        "FP8 quantizers in the transformer (ModelOpt; enabled: run in FP8, disabled: kept in high precision)",
        f"{'quantizers':<11} {'enabled':>8} {'disabled':>9}",
    ]
    for k in QuantizerKind:
        rows.append(f"{k.value:<11} {counts.enabled.get(k, 0):>8} {counts.disabled.get(k, 0):>9}")
    rows.append(f"{'total':<11} {sum(counts.enabled.values()):>8} {sum(counts.disabled.values()):>9}")
    return "\n".join(rows)


def check_fp8_attention(settings: CalibrateSettings, head_dim: int) -> None:
    """Refuse FP8 attention for a head size TensorRT's fused FP8 attention can't take.

    Raises:
        ConfigError: ``settings.fp8_attention`` is set and ``head_dim`` is not a multiple of 16.
    """
    if settings.fp8_attention and head_dim % FP8_ATTENTION_HEAD_DIM_MULTIPLE:
        raise ConfigError(
            f"calibrate.fp8_attention needs an attention head dim that is a multiple of "
            f"{FP8_ATTENTION_HEAD_DIM_MULTIPLE}, this transformer's is {head_dim}; set fp8_attention: false"
        )


def quant_config(settings: CalibrateSettings, num_layers: int, head_dim: int | None = None) -> dict:
    """A fresh ModelOpt quantization config for the transformer (never ModelOpt's shared dicts).

    Entries apply in order, later ones winning: disable everything, enable FP8 on ``nn.Linear``
    weights and inputs (and attention when asked), then disable the exclusions.

    Args:
        num_layers: number of transformer blocks, to check ``high_precision_blocks``.
        head_dim: attention head size; when given, FP8 attention is checked against it.

    Returns:
        ``{"quant_cfg": [...], "algorithm": "max"}`` for ``mtq.quantize``.

    Raises:
        ConfigError: a high-precision block outside ``0..num_layers-1``, or FP8 attention with a
            head dim that is not a multiple of 16.
    """
    bad = [b for b in settings.high_precision_blocks if not 0 <= b < num_layers]
    if bad:
        raise ConfigError(
            f"calibrate.high_precision_blocks has {bad}, the transformer has {num_layers} blocks "
            f"(0..{num_layers - 1})"
        )
    if head_dim is not None:
        check_fp8_attention(settings, head_dim)

    def fp8() -> dict[str, Any]:
        return {"num_bits": FP8_E4M3, "axis": None}

    entries: list[dict[str, Any]] = [
        {"quantizer_name": "*", "enable": False},
        {"quantizer_name": "*weight_quantizer", "parent_class": "nn.Linear", "cfg": fp8()},
        {"quantizer_name": "*input_quantizer", "parent_class": "nn.Linear", "cfg": fp8()},
    ]
    if settings.fp8_attention:
        entries += [{"quantizer_name": f"*.{name}", "cfg": fp8()} for name in ATTENTION_QUANTIZERS]
    # A module pattern matches the quantizers below it: `proj_out*` -> `proj_out*.*`.
    entries += [{"quantizer_name": f"{pattern}.*", "enable": False} for pattern in settings.exclude]
    blocks = sorted(set(settings.high_precision_blocks))
    entries += [{"quantizer_name": f"{BLOCKS}.{b}.*", "enable": False} for b in blocks]
    return {"quant_cfg": entries, "algorithm": "max"}


def check_exclusions(transformer: nn.Module, settings: CalibrateSettings) -> None:
    """Refuse ``calibrate.exclude`` patterns that match no module (a typo would quantize silently).

    Raises:
        ConfigError: naming the first pattern that matches nothing.
    """
    names = [n for n, _ in transformer.named_modules() if n]
    for pattern in settings.exclude:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            top = sorted({n.split(".")[0] for n in names})
            raise ConfigError(
                f"calibrate.exclude pattern {pattern!r} matches no transformer module; "
                f"top-level modules are {', '.join(top)}"
            )


def quantizers(model: nn.Module) -> dict[str, Any]:
    """Every ModelOpt ``TensorQuantizer`` of ``model`` by module name, in module order."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    return {n: m for n, m in model.named_modules() if isinstance(m, TensorQuantizer)}


def _bad_amax(quantizer) -> str | None:
    """Why ``quantizer``'s amax can't make an FP8 scale, or None if it can."""
    import torch

    amax = quantizer.amax
    if amax is None:
        return "no amax (the layer never ran during calibration)"
    amax = amax.detach().float()
    if torch.isnan(amax).any():
        return "amax NaN"
    if torch.isinf(amax).any():
        return "amax inf"
    if (amax <= 0).any():
        return f"amax {amax.min().item():g} (the layer saw only zeros)"
    return None


def check_amax(model: nn.Module) -> None:
    """Check that every enabled quantizer has a finite amax > 0 (FP8 has no inf; 0 is no scale).

    Raises:
        CalibrationError: naming the quantizers at fault (the first five) and how many there are.
    """
    problems = [
        f"{name}: {why}"
        for name, q in quantizers(model).items()
        if q.is_enabled and (why := _bad_amax(q)) is not None
    ]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CalibrationError(
            f"calibration left {len(problems)} FP8 quantizer(s) without a usable range, "
            f"a finite amax > 0 is needed: {'; '.join(problems[:5])}{more}"
        )


def summarize(model: nn.Module) -> QuantizerCounts:
    """Count the quantizers of a quantized ``model`` by kind and state, and its unquantized Linears."""
    from torch import nn

    enabled: Counter[QuantizerKind] = Counter()
    disabled: Counter[QuantizerKind] = Counter()
    for name, q in quantizers(model).items():
        (enabled if q.is_enabled else disabled)[QuantizerKind.of(name)] += 1

    def quantized(m: nn.Module) -> bool:
        qs = (getattr(m, "weight_quantizer", None), getattr(m, "input_quantizer", None))
        return any(q is not None and q.is_enabled for q in qs)

    plain = tuple(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not quantized(m))
    return QuantizerCounts(
        enabled={k: enabled[k] for k in QuantizerKind},
        disabled={k: disabled[k] for k in QuantizerKind},
        high_precision_linears=plain,
    )


def _quantizer_at_fault(err: BaseException, model: nn.Module) -> str | None:
    """The name of the quantizer whose calibrator raised ``err`` (found in the traceback)."""
    by_id = {id(q): name for name, q in quantizers(model).items()}
    tb = err.__traceback__
    name = None
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if id(owner) in by_id:
            name = by_id[id(owner)]
        tb = tb.tb_next
    return name


def quantize(
    transformer: nn.Module, settings: CalibrateSettings, forward_loop: Callable[[nn.Module], Any]
) -> QuantizerCounts:
    """Insert FP8 quantizers into ``transformer`` and calibrate them with ``forward_loop``.

    Args:
        transformer: a diffusers ``SD3Transformer2DModel``; modified in place.
        forward_loop: called once with the transformer; runs the calibration data through it.

    Raises:
        ConfigError: bad exclusions, blocks or FP8-attention head dim.
        CalibrationError: an enabled quantizer ended with an amax of 0, inf or NaN, or saw no data.
    """
    import modelopt.torch.quantization as mtq

    cfg = quant_config(settings, len(getattr(transformer, BLOCKS)), transformer.config.attention_head_dim)
    check_exclusions(transformer, settings)
    try:
        mtq.quantize(transformer, cfg, forward_loop)
    except AssertionError as err:
        # ModelOpt's max calibrator asserts on NaN / inf statistics; name the quantizer instead.
        if "nan" not in str(err).lower() and "inf" not in str(err).lower():
            raise
        where = _quantizer_at_fault(err, transformer) or "a transformer quantizer"
        raise CalibrationError(
            f"calibration of {where} saw non-finite values ({err}); FP8 needs a finite range"
        ) from None
    _set_softmax_range(transformer)
    check_amax(transformer)
    return summarize(transformer)


def _set_softmax_range(model: nn.Module) -> None:
    import torch

    device = next(model.parameters()).device
    for name, q in quantizers(model).items():
        if name.endswith(".softmax_quantizer") and q.is_enabled and q.amax is None:
            q.amax = torch.tensor(SOFTMAX_AMAX, device=device)


def _quantizer_formats(model: nn.Module) -> dict[str, dict]:
    return {
        name: {
            "enabled": bool(q.is_enabled),
            "num_bits": list(q.num_bits) if isinstance(q.num_bits, tuple) else q.num_bits,
            "axis": q.axis,
        }
        for name, q in quantizers(model).items()
    }


def save_calibration(transformer: nn.Module, path: Path) -> None:
    """Write the amax of every enabled quantizer to a safetensors file at ``path``.

    The metadata records the file format and every quantizer's state (enabled, number format,
    axis), so :func:`restore_calibration` can check it rebuilds the same model.

    Raises:
        CalibrationError: an enabled quantizer has no usable amax.
    """
    from safetensors.torch import save_file

    check_amax(transformer)
    tensors = {
        name: q.amax.detach().float().cpu().contiguous()  # [] per-tensor scale
        for name, q in quantizers(transformer).items()
        if q.is_enabled
    }
    # One metadata key: safetensors writes several in hash order, and the file should be
    # byte-identical for identical calibrations.
    meta = {"format": CALIBRATION_FORMAT, "quantizers": _quantizer_formats(transformer)}
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})


def _describe(names: set[str], limit: int = 3) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return f"{len(names)} ({shown}{', …' if len(names) > limit else ''})"


def restore_calibration(transformer: nn.Module, settings: CalibrateSettings, path: Path) -> None:
    """Rebuild the calibrated fake-quant model on a freshly loaded ``transformer``.

    Quantizers are inserted from the same settings as :func:`quantize` (no calibration pass) and
    their amax values are loaded from ``path``.

    Args:
        transformer: an unquantized ``SD3Transformer2DModel`` (any dtype and device); modified in place.
        settings: the ``calibrate`` section the file was made with.
        path: a file written by :func:`save_calibration`.

    Raises:
        CalibrationError: the file is missing or unreadable, or its quantizers (names, enabled
            set, formats) don't match what the settings give on this transformer.
        ConfigError: the settings don't fit the transformer.
    """
    import modelopt.torch.quantization as mtq
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration file {path} does not exist: run `sd35trt calibrate` first")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            amax = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError) as err:
        raise CalibrationError(f"calibration file {path} is not readable safetensors: {err}") from None
    try:
        meta = json.loads(meta[METADATA_KEY])
    except (KeyError, json.JSONDecodeError):
        meta = {}
    if meta.get("format") != CALIBRATION_FORMAT:
        raise CalibrationError(
            f"calibration file {path} has format {meta.get('format')!r}, "
            f"this sd35trt reads {CALIBRATION_FORMAT!r}"
        )
    stored = meta["quantizers"]

    cfg = quant_config(settings, len(getattr(transformer, BLOCKS)), transformer.config.attention_head_dim)
    with contextlib.redirect_stdout(io.StringIO()):  # ModelOpt's "Inserted N quantizers": calibrate's line
        mtq.quantize(transformer, {**cfg, "algorithm": None})
    current = _quantizer_formats(transformer)

    missing, unknown = set(current) - set(stored), set(stored) - set(current)
    if missing or unknown:
        raise CalibrationError(
            f"calibration file {path} does not match this transformer: {_describe(missing)} quantizers "
            f"missing from the file, {_describe(unknown)} unknown to the model; re-run `sd35trt calibrate`"
        )
    differ = {n for n in current if current[n] != stored[n]}
    if differ:
        raise CalibrationError(
            f"calibration file {path} was made with other quantization settings: {_describe(differ)} "
            "quantizers differ (enabled or format); re-run `sd35trt calibrate`"
        )
    enabled = {n for n, s in current.items() if s["enabled"]}
    if set(amax) != enabled:
        raise CalibrationError(
            f"calibration file {path} has amax for {len(amax)} quantizers, the model enables {len(enabled)}"
        )
    qs = quantizers(transformer)
    for name, value in amax.items():
        qs[name].amax = value.to(next(transformer.parameters()).device)
    check_amax(transformer)
