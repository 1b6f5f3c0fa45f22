"""The PyTorch side of FP8 validation: fake quant computed the way the exported graph computes it.

Why ONNX Runtime's FP8 result drifts from ModelOpt's fake quant with depth (measured on narrow
SD3 transformers, 1 to 38 blocks, and the full-size medium one; nothing was wrong in the graph):

1. **Arithmetic.** ModelOpt quantizes ``x * (448 / amax)``; ONNX's ``QuantizeLinear`` computes
   ``x / scale`` with ``scale = 1 / (448 / amax)``. A product and a quotient can differ in the last
   float32 bit, and where that bit decides an E4M3 rounding the FP8 code differs (a handful of
   weights per model).
2. **Rounding ties.** Where a quantizer's float32 input lies on a rounding boundary between two
   E4M3 codes (within float32's accumulation noise), the summation order of the two runtimes'
   matrix products picks one code or the other. One flipped code moves every output of its
   Linear for that token by ~1/16 of an E4M3 step, so the next quantizers flip many codes: a
   cascade. Measured (FP32 graphs, ``max|onnx - torch| / max|torch|``): 2e-7 while no tie flips;
   1e-4 to 7e-3 at 8 to 38 blocks once one does, in about half of the small validation cases and
   in every full-size one. One quantizer's scale 2 % off gives 2e-3 to 4e-3: no tolerance
   separates the two.
3. **16-bit scales.** A BF16 (FP16) graph stores each scale in BF16 (FP16): opset 19 types the
   scale as the input. Fake quant uses the float32 ``amax / 448``, up to 2**-9 (2**-12) away.
4. **16-bit constants.** In a BF16 graph, constants such as GELU's ``sqrt(2/pi)`` are
   BF16-rounded, which moves the following quantizer's inputs by ~1e-3: about 1 % of its codes
   lie that close to a boundary and change by one step.

So the reference divides by the scale the graph stores (:func:`~sd35trt.stages.export.tracing.graph_scale`;
16-bit exports first move each amax there, :func:`~sd35trt.stages.export.tracing.snap_amax`), and
where an activation's code is one step from ONNX Runtime's it takes ONNX Runtime's code
(:func:`onnx_quantization`), so no difference cascades: right graphs then measure 2e-7 to 3e-7
relative error (narrow 24-block BF16 and 38-block FP32 models). A wrong quantizer shows twice: in
the output error, and as a share of codes off a tie above :data:`MAX_OFF_TIE_SHARE`
(``tests/unit/stages/test_fp8_depth.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from sd35trt.config import Precision
from sd35trt.models.quantize import FP8_MAX
from sd35trt.stages.export.tracing import fp8_quantizers, graph_scale, quantizer_backend

if TYPE_CHECKING:
    import torch
    from torch import nn

    from sd35trt.components import ComponentSpec

#: A code differing from ONNX Runtime's counts as a rounding tie when the PyTorch input is within
#: this fraction of the quantizer's amax of the midpoint between the two codes: 10x the float32
#: noise between the two runtimes' inputs (measured: <= 1e-7 of the range before any tie flips).
TIE_WINDOW = 1e-6
#: Largest share of one quantizer's activation codes allowed to differ from PyTorch's away from a
#: rounding tie. Measured on narrow 24- and 38-block models: a right graph 0 in float32 and at most
#: 1.3 % in BF16 (its GELU constants are BF16-rounded: inputs move by ~1e-3, and ~1 % of codes lie
#: that close to a boundary); one scale off by 2 % (a weight's) or 10 % (an input's): 10 % to 99 %.
MAX_OFF_TIE_SHARE = 0.05
#: The ModelOpt quantizer backend :func:`onnx_quantization` switches quantizers to.
BACKEND = "sd35trt-onnx-fp8"


@dataclass
class CodeCount:
    """Activation FP8 codes of the reference compared with ONNX Runtime's, over a validation run.

    Attributes:
        ties: codes one step apart at a rounding tie (ONNX Runtime's taken).
        near: codes one step apart away from a tie (ONNX Runtime's taken; BF16 constants).
        far: codes further apart (PyTorch's kept; the output error shows them).
        worst: the quantizer with the largest share of ``near + far`` codes, and that share.
    """

    ties: int = 0
    near: int = 0
    far: int = 0
    worst: tuple[str, float] = ("", 0.0)

    def add(self, name: str, ties: int, near: int, far: int, size: int) -> None:
        self.ties, self.near, self.far = self.ties + ties, self.near + near, self.far + far
        share = (near + far) / max(size, 1)
        if share > self.worst[1]:
            self.worst = (name, share)

    def failure(self, stem: str) -> str | None:
        """Why the codes show a wrong quantizer, or None (at most :data:`MAX_OFF_TIE_SHARE` differ)."""
        name, share = self.worst
        if share <= MAX_OFF_TIE_SHARE:
            return None
        return (
            f"{stem}: {share:.1%} of the FP8 codes of {name} differ from PyTorch's away from a rounding tie "
            f"(allowed {MAX_OFF_TIE_SHARE:.1%}): its scale or its input differs from the calibrated model"
        )

    def to_json(self) -> dict:
        return {
            "ties": self.ties,
            "near": self.near,
            "far": self.far,
            "worst": {self.worst[0]: self.worst[1]},
        }


def _fake_quant(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ONNX ``QuantizeLinear`` (E4M3FN, saturate) in float32: the codes and their dequantized values."""
    import torch

    # In place where it can be: for a wide weight (13824 x 1536 in SD3.5-medium's norm1) each
    # float32 temporary is 85 MB, and this runs beside the whole module.
    scaled = x.float() / scale
    scaled.clamp_(-FP8_MAX, FP8_MAX)
    codes = scaled.to(torch.float8_e4m3fn)
    del scaled
    return codes, codes.float().mul_(scale)


@contextlib.contextmanager
def onnx_quantization(
    model: nn.Module,
    precision: Precision,
    onnx_codes: Mapping[str, np.ndarray] | None = None,
    count: CodeCount | None = None,
) -> Iterator[None]:
    """Run ``model``'s FP8 quantizers with the graph's arithmetic (see the module docstring).

    Args:
        model: the fake-quant module (the spec-shaped wrapper: quantizer names as in the graph).
        precision: the graph's precision (the dtype its scales are stored in).
        onnx_codes: per quantizer name, the FP8 codes ONNX Runtime computed for this very input
            (:func:`~sd35trt.stages.export.validate.run_cases`); where one is a single code step
            from PyTorch's it is taken, so the two runtimes stay in step.
        count: receives how many codes differed, and how.
    """
    import torch

    switched = fp8_quantizers(model)
    names = {id(q): name for name, q in switched.items()}
    codes = onnx_codes or {}
    count = count if count is not None else CodeCount()

    def backend(inputs: torch.Tensor, quantizer) -> torch.Tensor:
        scale = torch.tensor(graph_scale(float(quantizer.amax), precision), device=inputs.device)
        own_codes, own = _fake_quant(inputs, scale)
        name = names[id(quantizer)]
        theirs = codes.get(name)
        if theirs is None or tuple(theirs.shape) != tuple(own.shape):
            return own.to(inputs.dtype)
        bits = torch.from_numpy(theirs.view(np.uint8)).to(inputs.device)
        other = bits.view(torch.float8_e4m3fn).float() * scale
        differ = own != other
        if bool(differ.any()):
            a, b = own_codes.view(torch.uint8).int(), bits.int()
            adjacent = ((a ^ b) & 0x80 == 0) & ((a & 0x7F) - (b & 0x7F)).abs().eq(1)
            tie = (inputs.float() - (own + other) / 2).abs() <= TIE_WINDOW * float(quantizer.amax)
            take = differ & adjacent
            count.add(
                name,
                int((take & tie).sum()),
                int((take & ~tie).sum()),
                int((differ & ~adjacent).sum()),
                own.numel(),
            )
            own = torch.where(take, other, own)
        return own.to(inputs.dtype)

    with quantizer_backend(switched.values(), BACKEND, backend):
        yield


@contextlib.contextmanager
def _casts_keep_float32(model: nn.Module) -> Iterator[None]:
    """Within the block, ``Tensor.to`` from float32 to a 16-bit dtype returns float32, as the float32
    form's Casts do, except inside ``model``'s FP8 quantizers (their casts reproduce the graph's
    16-bit scales)."""
    import torch
    from torch.overrides import TorchFunctionMode

    from sd35trt.models.quantize import quantizers

    narrow = (torch.float16, torch.bfloat16)
    inside_quantizer = [0]

    class KeepFloat32(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if (
                func is torch.Tensor.to
                and not inside_quantizer[0]
                and isinstance(out, torch.Tensor)
                and out.dtype in narrow
                and args[0].dtype == torch.float32
            ):
                return args[0].to(out.device)
            return out

    def enter(_module, _args) -> None:
        inside_quantizer[0] += 1

    def leave(_module, _args, _out) -> None:
        inside_quantizer[0] -= 1

    handles = []
    for q in quantizers(model).values():
        handles += [q.register_forward_pre_hook(enter), q.register_forward_hook(leave)]
    try:
        with KeepFloat32():
            yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def float32_compute(model: nn.Module) -> Iterator[None]:
    """Run a 16-bit ``model`` in float32 without a float32 copy of it.

    Each module's own 16-bit parameters are widened to float32 just before its forward and put
    back after it, so one module's float32 weights exist at a time. With float32 inputs every op
    then computes in float32 on the 16-bit values (BF16 -> float32 is exact), which is what the
    float32 validation form of a BF16 graph computes
    (:func:`~sd35trt.stages.export.validate.float32_form`). That form turns each Cast to
    bfloat16 into a Cast to float32, so the model's own casts from float32 to 16 bits keep float32
    here (T5's feed-forward casts its input to ``wo.weight.dtype`` while that weight is still
    16-bit: one BF16 rounding there per block put the full-size T5 at 3.7x its tolerance), and a
    16-bit tensor reaching a widened module is widened. Casts inside FP8 quantizers stay: they
    reproduce the graph's 16-bit scales (:func:`onnx_quantization`).

    Buffers keep their dtype: where one meets a float32 tensor PyTorch promotes it exactly, and
    an op taking it alone would fail on the dtype mismatch, not compute in 16 bits unnoticed.
    The SD3 positional-embedding table (a ``[1, 384 * 384, 1536]`` buffer in SD3.5-medium) is
    only cropped and added to the float32 latent; widened whole it added 0.84 GiB to the
    reference's peak at full size.
    """
    import torch

    narrow = (torch.float16, torch.bfloat16)

    def wider(x):
        return x.float() if isinstance(x, torch.Tensor) and x.dtype in narrow else x

    saved: dict[int, list[tuple[str, torch.Tensor]]] = {}

    def widen(module, args, kwargs):
        store = module._parameters
        entries = [(name, t) for name, t in store.items() if t is not None and t.dtype in narrow]
        for name, t in entries:
            store[name] = torch.nn.Parameter(t.detach().float(), requires_grad=False)
        saved[id(module)] = entries
        return tuple(wider(a) for a in args), {k: wider(v) for k, v in kwargs.items()}

    def restore(module, _args, _out) -> None:
        for name, t in saved.pop(id(module), []):
            module._parameters[name] = t

    handles = []
    modules = {id(m): m for m in model.modules()}
    for module in modules.values():
        if any(t is not None and t.dtype in narrow for t in module._parameters.values()):
            handles += [
                module.register_forward_pre_hook(widen, with_kwargs=True),
                module.register_forward_hook(restore),
            ]
    try:
        with _casts_keep_float32(model):
            yield
    finally:
        for h in handles:
            h.remove()
        for key, entries in saved.items():
            for name, t in entries:
                modules[key]._parameters[name] = t


def crop_pos_embed(model: nn.Module, latent_side: int) -> int:
    """Keep only the centre of each SD3 positional-embedding table that latents up to ``latent_side`` read.

    diffusers' ``PatchEmbed`` crops its ``[1, M * M, D]`` table around the centre: rows and
    columns from ``(M - n) // 2`` for ``n`` patches a side. A table cut to the central ``K x K``
    (``M - K`` even) gives every ``n <= K`` the very same rows, so a module that only runs at
    small shapes (the FP8 reference, after tracing) computes exactly what the full table gives.
    SD3.5-medium's table is ``[1, 384 * 384, 1536]``, 0.42 GiB in BF16.

    Args:
        model: a module holding ``PatchEmbed``s (the transformer's ``pos_embed``); changed in place.
        latent_side: the largest latent height or width it will run at (pixels / 8).

    Returns:
        The bytes freed.
    """
    from diffusers.models.embeddings import PatchEmbed

    freed = 0
    for m in model.modules():
        if not isinstance(m, PatchEmbed) or not m.pos_embed_max_size or m.pos_embed is None:
            continue
        full, need = m.pos_embed_max_size, -(-latent_side // m.patch_size)
        keep = need + (full - need) % 2
        if keep >= full:
            continue
        start = (full - keep) // 2
        table = m.pos_embed.reshape(1, full, full, -1)[:, start : start + keep, start : start + keep, :]
        before = m.pos_embed.nbytes
        m.pos_embed = table.reshape(1, keep * keep, -1).clone()
        m.pos_embed_max_size = keep
        freed += before - m.pos_embed.nbytes
    return freed


@dataclass
class Reference:
    """PyTorch's outputs for the validation cases (FP8: also with quantizers off, and the ties)."""

    outputs: list[dict[str, np.ndarray]]
    unquantized: list[dict[str, np.ndarray]] | None = None
    codes: CodeCount | None = None

    def against(self, fp8: bool) -> str:
        """What the outputs are, for the report."""
        if not fp8:
            return "pytorch"
        return "modelopt fake quant with the graph's scales and rounding (ties taken from ONNX Runtime)"


def pytorch_reference(
    module: nn.Module,
    sp: ComponentSpec,
    cases: Sequence[tuple[torch.Tensor, ...]],
    precision: Precision,
    codes: Sequence[Mapping[str, np.ndarray]] | None = None,
) -> Reference:
    """PyTorch's outputs for the validation cases, computed as ONNX Runtime runs the graph.

    A BF16 module computes in float32 (:func:`float32_compute`; the graph runs in its float32
    form). With ``codes`` (ONNX Runtime's activation codes per case) the module's FP8 quantizers
    use the graph's arithmetic and take those codes at rounding ties (:func:`onnx_quantization`),
    and the outputs with every quantizer off are computed too. ``cases`` are the inputs of each
    case in the export ``precision``.
    """
    from sd35trt.stages.export.tracing import quantizers_disabled, reference

    wide = precision is Precision.BF16
    inputs = [tuple(x.float() if wide and x.is_floating_point() else x for x in c) for c in cases]
    with float32_compute(module) if wide else contextlib.nullcontext():
        if codes is None:
            return Reference([reference(module, sp, c) for c in inputs])
        count = CodeCount()
        outputs = []
        for c, found in zip(inputs, codes, strict=True):
            with onnx_quantization(module, precision, found, count):
                outputs.append(reference(module, sp, c))
        with quantizers_disabled(module):
            unquantized = [reference(module, sp, c) for c in inputs]
    return Reference(outputs, unquantized, count)
