"""Numerical validation of exported graphs: ONNX Runtime against the PyTorch module.

Each component runs in ONNX Runtime (CUDA where onnxruntime-gpu sees a GPU, else CPU) at basic
graph optimization, on the same fresh random inputs as its PyTorch module, at two or more
shapes. Per output the report keeps ``max|onnx - torch|``, ``max|torch|`` and the allowed error
``atol + rtol * max|torch|`` of the component's :class:`~sd35trt.components.Tolerance`.

Basic optimization is deliberate: ORT's extended levels fuse ``DequantizeLinear + MatMul``
into integer-only kernels that have no FP8 implementation and fail.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sd35trt.components import Tolerance
from sd35trt.config import Precision

if TYPE_CHECKING:
    import onnxruntime as ort

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def providers() -> list[str]:
    """ONNX Runtime providers to validate with.

    Returns:
        CUDA first where onnxruntime-gpu sees a GPU, CPU always.
    """
    import onnxruntime as ort

    return [CUDA, CPU] if CUDA in ort.get_available_providers() else [CPU]


def unsupported(precision: Precision, available: list[str]) -> str | None:
    """Why ONNX Runtime can't run a graph of ``precision`` with ``available`` providers.

    Returns:
        The reason (for the report), or None when validation can run.
    """
    if precision is Precision.BF16 and CUDA not in available:
        return (
            "ONNX Runtime's CPU provider has no bfloat16 kernels (Conv, MatMul); "
            "install onnxruntime-gpu on a CUDA machine to validate bf16 graphs"
        )
    return None


def session(path: Path, available: list[str]) -> ort.InferenceSession:
    """An ONNX Runtime session on the file at ``path`` (external data read beside it).

    numpy has no bfloat16, so a graph with bfloat16 inputs or outputs is opened through a
    float32-I/O copy of its graph (:func:`~sd35trt.stages.export.onnx_tools.float32_io`; the compute
    stays bfloat16), written beside it only while the session loads.
    """
    import onnxruntime as ort

    from sd35trt.stages.export import onnx_tools

    # Errors only: ORT warns about every Unsqueeze on a dynamic shape it can't remove.
    ort.set_default_logger_severity(3)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    wrapped = onnx_tools.float32_io(onnx_tools.check_external_data(path))
    if wrapped is None:
        return ort.InferenceSession(str(path), options, providers=available)
    temporary = path.with_name(f".{path.stem}.float32-io.onnx")
    try:
        wrapped_bytes = wrapped.SerializeToString()
        temporary.write_bytes(wrapped_bytes)
        return ort.InferenceSession(str(temporary), options, providers=available)
    finally:
        temporary.unlink(missing_ok=True)


def run(sess: ort.InferenceSession, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run ``sess`` on ``feeds`` (float32 or int64 numpy; cast to float16 where the graph says).

    Returns:
        Every output by name, as float32.
    """
    typed = {}
    for meta in sess.get_inputs():
        x = feeds[meta.name]
        typed[meta.name] = x.astype(np.float16) if meta.type == "tensor(float16)" else x
    names = [o.name for o in sess.get_outputs()]
    return {n: np.asarray(v).astype(np.float32) for n, v in zip(names, sess.run(names, typed), strict=True)}


@dataclass(frozen=True)
class OutputCheck:
    """One output of one case: the error against the reference and what is allowed."""

    output: str
    max_abs: float
    max_ref: float
    allowed: float

    @property
    def ok(self) -> bool:
        return self.max_abs <= self.allowed

    @property
    def rel(self) -> float:
        """``max|a - b| / max|b|`` (inf when the reference is all zeros and the error isn't)."""
        if self.max_ref > 0:
            return self.max_abs / self.max_ref
        return 0.0 if self.max_abs == 0 else math.inf

    def to_json(self) -> dict:
        return {
            "max_abs": json_float(self.max_abs),
            "max_ref": json_float(self.max_ref),
            "rel": json_float(self.rel),
            "allowed": json_float(self.allowed),
            "ok": self.ok,
        }


def json_float(x: float) -> float | str:
    """``x``, or ``"inf"`` / ``"nan"`` as strings: JSON has no such numbers."""
    return x if math.isfinite(x) else str(x)


def compare(
    actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray], tol: Tolerance
) -> list[OutputCheck]:
    """Per-output errors of ``actual`` (ONNX Runtime) against ``expected`` (PyTorch).

    A NaN or inf in either, a missing output or a shape mismatch counts as an infinite error.

    Returns:
        One :class:`OutputCheck` per expected output, in order.
    """
    checks = []
    for name, ref in expected.items():
        got = actual.get(name)
        max_ref = float(np.max(np.abs(ref))) if ref.size else 0.0
        if not math.isfinite(max_ref):
            max_ref = math.inf
        if got is None or got.shape != ref.shape or not np.isfinite(got).all() or not np.isfinite(ref).all():
            max_abs = math.inf
        else:
            max_abs = float(np.max(np.abs(got - ref))) if ref.size else 0.0
        allowed = tol.atol + tol.rtol * (max_ref if math.isfinite(max_ref) else 0.0)
        checks.append(OutputCheck(name, max_abs, max_ref, allowed))
    return checks


def describe_failure(where: str, shapes: Mapping[str, tuple[int, ...]], check: OutputCheck) -> str:
    """``transformer noise_pred at hidden_states [2, 16, 16, 16]: max |onnx - torch| 0.3 > allowed 0.001``."""
    first = next(iter(shapes.items()))
    return (
        f"{where} {check.output} at {first[0]} {list(first[1])}: max |onnx - torch| {check.max_abs:.3g} > "
        f"allowed {check.allowed:.3g} (max |torch| {check.max_ref:.3g})"
    )


def validate_graph(
    path: Path,
    available: list[str],
    stem: str,
    shapes: Sequence[Mapping[str, tuple[int, ...]]],
    feeds: Sequence[Mapping[str, np.ndarray]],
    expected: Sequence[Mapping[str, np.ndarray]],
    tol: Tolerance,
    against: str,
) -> tuple[dict, list[str]]:
    """Run the graph at ``path`` on every validation case and compare it with ``expected``.

    Args:
        path: the exported graph.
        available: ONNX Runtime providers (:func:`providers`).
        stem: the graph's name in failure messages.
        shapes, feeds, expected: per case, the input shapes, the inputs and the PyTorch outputs.
        tol: the tolerance every output is held to.
        against: what ``expected`` is, for the report (``pytorch``, ``modelopt fake quant``).

    Returns:
        The report entry (status, providers, tolerance, worst relative error, per-case outputs)
        and one :func:`describe_failure` line per output over the tolerance.
    """
    sess = session(path, available)
    cases, failures = [], []
    worst = 0.0
    for case_shapes, case_feeds, want in zip(shapes, feeds, expected, strict=True):
        checks = compare(run(sess, case_feeds), want, tol)
        cases.append(
            {
                "shapes": {k: list(v) for k, v in case_shapes.items()},
                "outputs": {c.output: c.to_json() for c in checks},
            }
        )
        failures += [describe_failure(stem, case_shapes, c) for c in checks if not c.ok]
        worst = max([worst, *(c.rel for c in checks)])
    entry = {
        "status": "failed" if failures else "passed",
        "against": against,
        "providers": sess.get_providers(),
        "tolerance": {"rtol": tol.rtol, "atol": tol.atol},
        "max_rel": json_float(worst),
        "cases": cases,
    }
    return entry, failures


def information(
    path: Path,
    available: list[str],
    shapes: Sequence[Mapping[str, tuple[int, ...]]],
    feeds: Sequence[Mapping[str, np.ndarray]],
    unquantized: Sequence[Mapping[str, np.ndarray]] | None,
) -> dict:
    """The FP8 graph against the unquantized PyTorch model: the quantization error, for information."""
    sess = session(path, available)
    cases = []
    for case_shapes, case_feeds, want in zip(shapes, feeds, unquantized or [], strict=True):
        checks = compare(run(sess, case_feeds), want, Tolerance(rtol=0.0, atol=0.0))
        outputs = {c.output: {k: c.to_json()[k] for k in ("max_abs", "max_ref", "rel")} for c in checks}
        cases.append({"shapes": {k: list(v) for k, v in case_shapes.items()}, "outputs": outputs})
    return {"against": "unquantized pytorch", "cases": cases}
