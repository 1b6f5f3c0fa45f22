"""The PyTorch half of export: load one component in its export dtype, make inputs, trace."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sd35trt.components import Component, ComponentSpec, ModelDims, Sampling, TensorType
from sd35trt.config import Config, Precision
from sd35trt.errors import ConfigError, ExportError
from sd35trt.models.quantize import FP8_MAX
from sd35trt.sampling import sample_inputs

if TYPE_CHECKING:
    import torch
    from torch import nn

    from sd35trt.models.controlnet import ResolvedControlNet
    from sd35trt.models.lora import ResolvedLora
#: ModelOpt's names for the 16-bit dtypes its FP8 attention export emits.
_MODELOPT_DTYPE = {Precision.FP16: "Half", Precision.BF16: "BFloat16"}


def import_modelopt() -> None:
    """Import ModelOpt now, before any frame holds a model.

    On its first import ModelOpt's dependency ``pulp`` keeps the exceptions of its optional
    solvers (``No module named 'cplex'``); their tracebacks reference the importing frame and,
    through ``f_back``, every caller's frame with its locals. Imported inside
    ``restore_calibration`` it kept the whole transformer alive through the ONNX side of export.
    """
    import modelopt.torch.quantization  # noqa: F401


def torch_dtype(precision: Precision) -> torch.dtype:
    """The torch dtype of an export precision."""
    import torch

    return {Precision.FP32: torch.float32, Precision.FP16: torch.float16, Precision.BF16: torch.bfloat16}[
        precision
    ]


def load_module(
    config: Config,
    root: Path,
    component: Component,
    precision: Precision,
    device: str,
    slg_layers: Sequence[int] = (),
    calibration: Path | None = None,
    loras: Sequence[ResolvedLora] = (),
    controlnet: ResolvedControlNet | None = None,
) -> nn.Module:
    """The spec-shaped module of ``component`` (:mod:`sd35trt.models.modules`) in eval mode, to trace.

    Weights are loaded directly in the export ``precision`` (no float32 copy of a BF16 model); the
    transformer's ``export.fp32_blocks`` are then widened to float32.

    Args:
        root: the diffusers model directory (its weights are already checked).
        device: where the weights go ("cuda" keeps them out of host RAM).
        slg_layers: transformer blocks the ``skip_layers`` input gates.
        calibration: for the transformer, the calibration file to restore FP8 fake quant from.
        loras: ``model.loras``, fused into the transformer and CLIP encoders before anything else.
        controlnet: for a ControlNet component, its resolved ControlNet.

    Raises:
        ModelError: the component cannot be loaded, or a LoRA does not fit it.
        CalibrationError: the calibration file does not match the transformer.
        ConfigError: FP8 attention asked for a float32 transformer export.
    """
    from sd35trt.models.loading import LoadPurpose, load_model
    from sd35trt.models.modules import wrap

    if controlnet is not None:
        from sd35trt.models.loading import load_controlnet

        raw = load_controlnet(
            controlnet, config.model, root, torch_dtype(precision), device=device, trace=True
        )
        dims = ModelDims.from_model_dir(root)
        return wrap(component, raw, vae_shift_offset=dims.vae_shift_factor * dims.vae_scaling_factor)
    raw = load_model(
        root,
        component,
        torch_dtype(precision),
        device=device,
        purpose=LoadPurpose.TRACE,
        model=config.model,
        loras=loras,
    )
    if not component.is_transformer:
        return wrap(component, raw, slg_layers)
    if calibration is not None:
        restore_fp8(raw, config, precision, calibration)
    return wrap(component, raw, slg_layers, config.export.fp32_blocks, bool(config.model.controlnets))


def check_fp8_attention(precision: Precision) -> None:
    """Refuse FP8 attention in a float32 transformer graph.

    Raises:
        ConfigError: ModelOpt writes FP8 attention (the layout TensorRT's fused FP8 attention
            needs) for fp16 and bf16 graphs only.
    """
    if precision not in _MODELOPT_DTYPE:
        raise ConfigError(
            "calibrate.fp8_attention needs export.precision.transformer fp16 or bf16, "
            f"got {precision.value} (ModelOpt exports FP8 attention for 16-bit graphs only)"
        )


def restore_fp8(transformer: nn.Module, config: Config, precision: Precision, calibration: Path) -> None:
    """Re-insert the calibrated FP8 quantizers (ModelOpt fake quant) into ``transformer``.

    In a 16-bit export each amax then moves to the scale the graph stores (:func:`snap_amax`), so
    fake quant and the graph quantize on the same grid.

    Raises:
        ConfigError: ``calibrate.fp8_attention`` with a float32 export (:func:`check_fp8_attention`).
        CalibrationError: the calibration file does not match the transformer.
    """
    from sd35trt.components import ATTENTION_QUANTIZERS
    from sd35trt.models.quantize import quantizers, restore_calibration

    if config.calibrate.fp8_attention:
        check_fp8_attention(precision)
    restore_calibration(transformer, config.calibrate, calibration)
    snap_amax(transformer, precision)
    if config.calibrate.fp8_attention:
        # ModelOpt's FP8 attention export checks its quantizers were set to the graph's dtype.
        for name, q in quantizers(transformer).items():
            if name.rsplit(".", 1)[-1] in ATTENTION_QUANTIZERS:
                q.trt_high_precision_dtype = _MODELOPT_DTYPE[precision]


def graph_scale(amax: float, precision: Precision) -> float:
    """The scale ModelOpt's FP8 export writes for ``amax`` into a graph of ``precision``.

    ``1 / (448 / amax)`` in Python floats, then stored in the graph's dtype (ModelOpt's
    ``export_fp8``: a float32 tensor cast to the input's dtype), as a Python float.
    """
    import torch

    scale = torch.tensor(1.0 / (FP8_MAX / float(amax)))
    return float(scale.to(torch_dtype(precision)).float())


def fp8_quantizers(model: nn.Module) -> dict[str, object]:
    """Enabled per-tensor FP8 E4M3 quantizers of ``model`` with an amax, by module name."""
    from sd35trt.models.quantize import FP8_E4M3, quantizers

    return {
        name: q
        for name, q in quantizers(model).items()
        if q.is_enabled and tuple(q.num_bits) == FP8_E4M3 and q.amax is not None and q.amax.numel() == 1
    }


def snap_amax(model: nn.Module, precision: Precision) -> int:
    """Move each FP8 quantizer's amax onto the scale a 16-bit graph stores; returns how many changed.

    A BF16 graph keeps ``amax / 448`` rounded to BF16 (relative change up to 2**-9); with the amax
    moved there, fake quant and the graph quantize on the same grid. Float32 graphs store the
    float32 scale: nothing changes.
    """
    import torch

    if precision is Precision.FP32:
        return 0
    changed = 0
    for q in fp8_quantizers(model).values():
        snapped = FP8_MAX * graph_scale(float(q.amax), precision)  # exact in float32
        if snapped != float(q.amax):
            q.amax = torch.tensor(snapped, dtype=torch.float32, device=q.amax.device)
            changed += 1
    return changed


#: The ModelOpt quantizer backend :func:`fp8_tracing` switches weights and inputs to.
TRACE_BACKEND = "sd35trt-fp8-trace"


def _fp8_trace_function():
    """An autograd Function that exports as ModelOpt's FP8 Q/DQ and computes nothing."""
    import torch
    from modelopt.torch.quantization.export_onnx import export_fp8
    from torch.onnx import symbolic_helper

    class Fp8TraceQdq(torch.autograd.Function):
        @staticmethod
        @symbolic_helper.parse_args("v", "f")
        def symbolic(g, inputs, amax: float):
            return export_fp8(g, inputs, amax, None)  # the very nodes ModelOpt's FP8 quantizer emits

        @staticmethod
        def forward(ctx, inputs, amax: float):
            # The traced values are thrown away (validation runs the real fake quant), so an
            # alias does: a fake-quantized copy of every weight would stay alive until the
            # tracer finishes, about one more copy of the model.
            return inputs.detach()

    return Fp8TraceQdq


@contextlib.contextmanager
def fp8_tracing(model: nn.Module) -> Iterator[None]:
    """Trace ``model``'s enabled FP8 weight and input quantizers without computing fake quant.

    Each such quantizer is switched to a ModelOpt quantizer backend whose ONNX symbolic is
    ModelOpt's own FP8 export (``export_fp8``), so the graph is unchanged; attention quantizers
    (exported by ModelOpt's FP8 attention) are left alone.
    """
    from sd35trt.components import QuantizerKind

    fn = _fp8_trace_function()

    def backend(inputs, quantizer):
        return fn.apply(inputs, float(quantizer.amax))

    kinds = (QuantizerKind.WEIGHT, QuantizerKind.INPUT)
    switched = [q for name, q in fp8_quantizers(model).items() if QuantizerKind.of(name) in kinds]
    with quantizer_backend(switched, TRACE_BACKEND, backend):
        yield


@contextlib.contextmanager
def quantizer_backend(quantizers: Iterable, name: str, backend: Callable) -> Iterator[None]:
    """Run ``quantizers`` through ``backend`` (a ModelOpt quantizer backend, registered as ``name``).

    ``backend(inputs, quantizer)`` returns the quantizer's output; the quantizers' own backends
    and ModelOpt's registry are restored on exit.
    """
    from modelopt.torch.quantization.nn.modules.tensor_quantizer import (
        register_quant_backend,
        unregister_quant_backend,
    )

    previous = [(q, q.backend) for q in quantizers]
    register_quant_backend(name, backend)
    for q, _ in previous:
        q.backend = name
    try:
        yield
    finally:
        for q, old in previous:
            q.backend = old
        unregister_quant_backend(name)


@contextlib.contextmanager
def quantizers_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as the unquantized model: every enabled FP8 quantizer off, then back on."""
    from sd35trt.models.quantize import quantizers

    enabled = [q for q in quantizers(model).values() if q.is_enabled]
    for q in enabled:
        q.disable()
    try:
        yield
    finally:
        for q in enabled:
            q.enable()


def vocab_size(module: nn.Module) -> int | None:
    """The token vocabulary of a text-encoder wrapper, None for other components."""
    encoder = getattr(module, "encoder", None)
    return getattr(getattr(encoder, "config", None), "vocab_size", None)


def make_inputs(
    spec: ComponentSpec,
    shapes: dict[str, tuple[int, ...]],
    precision: Precision,
    case: int,
    vocab: int | None = None,
    device: str = "cpu",
) -> tuple[torch.Tensor, ...]:
    """Random inputs of ``spec`` at ``shapes`` (:func:`~sd35trt.sampling.sample_inputs`), as tensors.

    ``float`` inputs are cast to ``precision`` (``float32`` inputs stay float32); ``case`` seeds the
    draw and ``vocab`` bounds token ids. Returns the inputs in the spec's order.

    Raises:
        ExportError: the spec has token inputs and the encoder has no vocabulary size.
    """
    import torch

    if not vocab and any(t.sampling is Sampling.TOKENS for t in spec.inputs):
        raise ExportError(f"{spec.component.value}: the encoder config has no vocab_size")
    arrays = sample_inputs(spec, shapes, case, vocab)
    dtype = torch_dtype(precision)
    out = []
    for t in spec.inputs:
        x = torch.from_numpy(arrays[t.name])
        if t.dtype is TensorType.FLOAT:
            x = x.to(dtype)
        out.append(x.to(device))
    return tuple(out)


def to_numpy(x: torch.Tensor) -> np.ndarray:
    """A CPU numpy copy; 16-bit floats become float32 (numpy has no bfloat16)."""
    x = x.detach().cpu()
    return (x.float() if x.is_floating_point() else x).numpy()


def reference(
    module: nn.Module, spec: ComponentSpec, inputs: tuple[torch.Tensor, ...]
) -> dict[str, np.ndarray]:
    """Run ``module`` without gradients: its outputs by the spec's output names, as float32 numpy."""
    import torch

    with torch.no_grad():
        out = module(*inputs)
    out = out if isinstance(out, tuple) else (out,)
    return {name: to_numpy(x) for name, x in zip(spec.output_names, out, strict=True)}


def trace(
    module: nn.Module, spec: ComponentSpec, inputs: tuple[torch.Tensor, ...], path: Path, opset: int
) -> None:
    """``torch.onnx.export`` (TorchScript) of ``module`` to ``path`` with the spec's names and axes.

    Args:
        module: the spec-shaped module (for FP8, inside :func:`fp8_tracing`).
        inputs: sample inputs; their values don't matter, their shapes set the traced sizes.
        path: the ``.onnx`` file to write (over 2 GB, one external file per tensor beside it).
        opset: the ONNX opset, at most :func:`max_trace_opset`.

    Constant folding is left to :func:`~sd35trt.stages.export.onnx_tools.clean_up`: the TorchScript
    folder keeps a second copy of every folded weight (2x the memory of a large model), and it
    fails on bfloat16 constants.
    """
    import torch

    with warnings.catch_warnings(), torch.no_grad():
        # Tracer warnings flag Python branches on shapes; validation at several shapes checks them.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            inputs,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes,
            do_constant_folding=False,
        )


def max_trace_opset() -> int:
    """The newest opset the TorchScript exporter writes (newer ones are converted to afterwards)."""
    from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET

    return ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
