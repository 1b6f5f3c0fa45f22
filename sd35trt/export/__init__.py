"""The export stage: ONNX graphs of the five SD3.5 components, each validated against PyTorch.

Output (``runs/<name>/onnx/``): ``clip_l.onnx``, ``clip_g.onnx``, ``t5.onnx``,
``transformer.onnx`` (FP8 Q/DQ when ``export.quantize``), ``vae_decoder.onnx``, a
``<component>.onnx.data`` beside any graph over 2 GB, ``transformer_unquantized.onnx`` (see
below) and ``export_report.json`` (per graph and output: max-abs and relative error against
PyTorch at each validation shape). The manifest's export record lists every file (size,
sha256), the opset, each graph's inputs and outputs, and the calibration it was made from.

Decisions:

- **Glue**: CLIP padding/concatenation run in the runtime; the VAE scaling/shift and the
  [-1, 1] -> [0, 1] mapping are inside the VAE graph (see :mod:`sd35trt.components`).
- **FP8**: the transformer gets its calibration back through
  :func:`sd35trt.quantize.restore_calibration` (ModelOpt fake quant) and is traced with
  TorchScript; ModelOpt's ``trt::TRT_FP8*`` ops are rewritten to standard
  ``QuantizeLinear``/``DequantizeLinear`` with a float8e4m3fn zero point
  (:func:`~sd35trt.export.onnx_tools.rewrite_fp8_qdq`), which ONNX Runtime and TensorRT both
  read. ``export.fp8_weights`` stores the quantized weights as FP8 initializers.
- **Unquantized fallback**: with FP8 on and weights kept in high precision, the graph without
  Q/DQ (``transformer_unquantized.onnx``, for GPUs without FP8) costs one graph rewrite, no
  second trace, and shares the FP8 graph's data file, so it is always written. With
  ``fp8_weights`` the high-precision weights are gone, so it is not (the record says ``null``;
  re-export with ``export.quantize: false`` for such GPUs).
- **Precision**: each component is loaded and traced in its ``export.precision`` (T5 is never
  FP16: the config refuses it). Text encoders are traced with eager attention (torch's SDPA
  export breaks 16-bit CLIP graphs).

Memory at scale (sd3.5-large transformer, 8.1 B parameters, 16.3 GB in BF16): the stage never
holds more than one copy of the weights in host RAM.

1. Weights load straight from safetensors in BF16 (no FP32 copy), onto the GPU when there is
   one; restoring the calibration adds one scalar per quantizer.
2. The TorchScript exporter runs without its constant folding (which would keep a transposed
   copy of every Linear weight, 2x) and, over 2 GB, writes each initializer to its own file
   straight from the parameter.
3. The module is freed before the ONNX side starts. Graph surgery loads the ``.onnx`` without
   external data (a few MB); constant folding skips nodes that read external weights.
4. Saving streams tensors one at a time from the per-tensor files into the single
   ``<component>.onnx.data`` (largest tensor in memory: ~95 MB); with ``fp8_weights`` the FP8
   copies (0.5x) are held until saved.
5. Validation references are computed before tracing, so the ONNX Runtime session (about 1x)
   never coexists with the PyTorch module.
"""

from __future__ import annotations

from sd35trt.export.stage import REPORT_FILE, UNQUANTIZED_STEM, export

__all__ = ["REPORT_FILE", "UNQUANTIZED_STEM", "export"]
