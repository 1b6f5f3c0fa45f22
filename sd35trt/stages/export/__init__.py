"""The export stage: ONNX graphs of the five SD3.5 components, each validated against PyTorch.

Output (``runs/<name>/onnx/``): ``clip_l.onnx``, ``clip_g.onnx``, ``t5.onnx``,
``transformer.onnx`` (FP8 Q/DQ when ``export.quantize``; with ``runtime.cache`` instead
``transformer_first_block.onnx`` and ``transformer_rest.onnx``, the first-block cache's two
engines, each quantized from the same calibration), ``vae_decoder.onnx``, a
``<component>.onnx.data`` beside any graph over 2 GB, ``transformer_unquantized.onnx`` (see
below) and ``export_report.json`` (per graph and output: max-abs and relative error against
PyTorch at each validation shape). The manifest's export record lists every file (size,
sha256), the opset, each graph's inputs and outputs, and the calibration it was made from.

Decisions:

- **Glue**: CLIP padding/concatenation run in the runtime; the VAE scaling/shift and the
  [-1, 1] -> [0, 1] mapping are inside the VAE graph (see :mod:`sd35trt.components`).
- **FP8**: the transformer gets its calibration back through
  :func:`sd35trt.models.quantize.restore_calibration` (ModelOpt fake quant) and is traced with
  TorchScript; ModelOpt's ``trt::TRT_FP8*`` ops are rewritten to standard
  ``QuantizeLinear``/``DequantizeLinear`` with a float8e4m3fn zero point
  (:func:`~sd35trt.stages.export.onnx_tools.rewrite_fp8_qdq`), which ONNX Runtime and TensorRT both
  read. ``export.fp8_weights`` stores the quantized weights as FP8 initializers.
- **Unquantized fallback**: with FP8 on and weights kept in high precision, the graph without
  Q/DQ (``transformer_unquantized.onnx``, for GPUs without FP8) costs one graph rewrite, no
  second trace, and shares the FP8 graph's data file, so it is always written. With
  ``fp8_weights`` the high-precision weights are gone, so it is not (the record says ``null``;
  re-export with ``export.quantize: false`` for such GPUs).
- **Timestep**: the transformer's ``timestep`` input is float32 in every export precision (as
  diffusers and NVIDIA's demo feed it; in bf16 the schedule's timesteps round by up to 2); the
  graph computes the sinusoidal embedding in float32 and casts it to the model dtype.
- **FP8 weight layout**: each quantized Linear weight is stored pre-transposed (``[in, out]``), so
  TensorRT sees ``DequantizeLinear -> MatMul`` with no Transpose between, as ModelOpt's FP8
  exporter writes it (:func:`~sd35trt.stages.export.onnx_tools.pretranspose_qdq_weights`; per-tensor scales
  commute with the transpose, so the numbers are unchanged). FP8 weights are folded afterwards.
- **fp32 blocks**: ``export.fp32_blocks`` run whole transformer blocks in float32 inside a 16-bit
  graph (float32 weights, Casts at the block's inputs and outputs); the large configs do this for
  block 35, which calibration also keeps out of FP8, as NVIDIA's recipe does.
- **Precision**: each component is loaded and traced in its ``export.precision`` (T5 is never
  FP16: the config refuses it). Text encoders are traced with eager attention (torch's SDPA
  export breaks 16-bit CLIP graphs). ONNX defines Conv (and InstanceNormalization) for
  bfloat16 only from opset 22, so below that a BF16 graph runs those nodes in float32 between
  Casts (in the transformer only the patch embedding); Einsum, defined for no 16-bit type, is
  rewritten to Transpose where it only permutes axes.
- **Validation** runs wherever export runs, at small shapes (the graphs are dynamic;
  :func:`~sd35trt.components.sample_shapes`): BF16 graphs in their float32 form (same nodes,
  weights and FP8 scales; ONNX Runtime has no bfloat16 kernels on the CPU nor bfloat16 FP8 Q/DQ
  on CUDA) against PyTorch computing in float32 too; the FP8 transformer against fake quant
  computed as the graph computes it (:mod:`sd35trt.stages.export.reference`: why the two used
  to drift apart with depth). A graph ONNX Runtime cannot run is recorded ``skipped`` with the
  one line saying why. The report gives each graph's peak RSS while ONNX Runtime ran it.

Memory at scale (sd3.5-large transformer, 8.1 B parameters, 16.3 GB in BF16): the stage holds
one copy of the weights, plus activations and one tensor at a time.

1. Weights load from safetensors in the export precision (BF16: no FP32 copy; a BF16
   checkpoint stays memory-mapped; random weights are narrowed module by module as they are
   drawn) and move to the GPU when there is one; restoring the calibration adds one scalar per
   quantizer. ModelOpt is imported before any model is loaded
   (:func:`~sd35trt.stages.export.tracing.import_modelopt`: otherwise its first import keeps the
   transformer alive).
2. While tracing, ModelOpt's FP8 weight and input quantizers run through a quantizer backend
   that emits the same Q/DQ symbolic but computes nothing
   (:func:`~sd35trt.stages.export.tracing.fp8_tracing`): the TorchScript tracer otherwise keeps a
   fake-quantized copy of every weight alive until it finishes (measured: +1.1x the weights).
3. The exporter's constant folding is off (it would keep a transposed copy of each Linear
   weight); over 2 GB it writes each initializer to its own file straight from the parameter.
   The trace is at a small shape, and glibc returns freed activations to the system
   (:func:`~sd35trt.models.loading.limit_heap_retention`, ``malloc_trim`` after tracing).
4. The module is freed before the ONNX side starts. Graph surgery loads the ``.onnx`` without
   external data (a few MB) and constant folding skips nodes that read external weights.
5. Saving streams tensors one at a time into the single ``<component>.onnx.data``; with
   ``fp8_weights`` each FP8 weight is written to a scratch file as soon as it is computed.
6. The ONNX Runtime session never coexists with the PyTorch module: references are computed
   before tracing, except the FP8 transformer's, which needs ONNX Runtime's codes: it is loaded
   again after the session is gone (:mod:`sd35trt.stages.export.steps`). Nothing of the
   session outlives it: outputs and codes are copied out of ONNX Runtime's buffers (an array
   over one kept ~1 GiB of the session's memory alive at 12 medium blocks), and the FP8 codes
   wait in scratch files, read one quantizer at a time (~0.2 GiB at full medium size).
7. The reference computes a BF16 module in float32 one module's weights at a time, leaves
   buffers in BF16 (widened whole, SD3.5-medium's positional table took 0.84 GiB), fake-quantizes
   in place, and the FP8 reference keeps only the centre of the positional table that its small
   shapes read (:func:`~sd35trt.stages.export.reference.crop_pos_embed`, 0.42 GiB in medium).

Measured (2026-12-06, 2-core CPU, random weights, FP8 with ``fp8_weights``, one
``export_component`` of the full-size SD3.5-medium transformer: 2,243,171,520 parameters, 4.49 GB
in BF16): process peak RSS (``VmHWM``) 6.69 GiB = 1.60x the BF16 weight bytes, in 531 s. By step,
sampled every 10 ms: load 5.17 GiB, trace 5.43, rewrite + fold + save 1.16, ONNX Runtime 4.51,
reference load 5.29 (4.84 once its positional table is cropped), reference compute 5.10. The
sampling thread does not see the peak (a call keeps it from running, presumably holding the
GIL); ``VmHWM`` does: it is inside ``torch.onnx.export`` (after tracing a 12-block cut, ``VmHWM``
4.60 GiB against 3.39 sampled), about 1.5 GiB above the loaded module at full size, so the 1.3x
goal (5.43 GiB) is not met yet. The excess follows the positional table rather than the depth
(medium 12 and 24 blocks: +1.2 and +1.3 GiB; large, whose table is 2.5x smaller: +0.5 GiB).
"""

from __future__ import annotations

from sd35trt.stages.export.stage import REPORT_FILE, UNQUANTIZED_STEM, export, export_component

__all__ = ["REPORT_FILE", "UNQUANTIZED_STEM", "export", "export_component"]
