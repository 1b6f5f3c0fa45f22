"""Numerical validation of exported graphs: ONNX Runtime against the PyTorch module.

Each graph runs in ONNX Runtime (CUDA where onnxruntime-gpu sees a GPU, else CPU) on the same
fresh random inputs as its PyTorch module, at small shapes (:func:`~sd35trt.components.sample_shapes`).
Per output the report keeps ``max|onnx - torch|``, ``max|torch|`` and the allowed error
``atol + rtol * max|torch|`` of the component's :class:`~sd35trt.components.Tolerance`. BF16 graphs
run in their :func:`float32_form` (ONNX Runtime's CPU provider has no bfloat16 kernels, its CUDA
provider no bfloat16 FP8 Q/DQ); FP8 graphs also return the codes of their activation quantizers
(:mod:`sd35trt.stages.export.reference`). Optimization stays basic: ORT's extended levels fuse
``DequantizeLinear + MatMul`` into integer-only kernels that have no FP8 implementation and fail
(up to ORT 1.31).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from onnx import ModelProto, TensorProto, helper, numpy_helper

from sd35trt.components import Tolerance
from sd35trt.errors import first_line
from sd35trt.stages.export.onnx_files import check_external_data
from sd35trt.stages.export.onnx_tools import DEFAULT_DOMAINS

if TYPE_CHECKING:
    import onnxruntime as ort

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
#: ONNX Runtime optimizers left off. ConstantFolding would store a float32 copy of every BF16
#: weight the float32 form casts; CastElimination (ORT 1.32) removes a float32 -> float32 Cast
#: (the float32 form of a BF16 -> float32 one) without rewiring its consumers, and the session fails.
DISABLED_OPTIMIZERS = ["ConstantFolding", "CastElimination"]


class NotValidated(Exception):
    """ONNX Runtime cannot load or run the graph here; the message says why (one line)."""


def providers() -> list[str]:
    """ONNX Runtime providers to validate with: CUDA first where onnxruntime-gpu sees a GPU, CPU always."""
    import onnxruntime as ort

    return [CUDA, CPU] if CUDA in ort.get_available_providers() else [CPU]


def float32_form(model: ModelProto) -> ModelProto | None:
    """The graph computed in float32: every bfloat16 tensor becomes float32, values unchanged.

    BF16 initializers stay as stored (external data included: nothing is copied) and get a Cast
    to float32; bfloat16 Constants, Casts, inputs, outputs and value infos become float32. FP8
    initializers, Q/DQ zero points and every node are kept, so the float32 form holds the same
    weights and scales (BF16 -> float32 is exact) and differs only in the dtype of the compute.
    ``model`` is loaded without external data (locations stay relative); the result is a copy, or
    None when the graph has no bfloat16 tensor.
    """
    bf16, f32 = TensorProto.BFLOAT16, TensorProto.FLOAT
    out = ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    changed = False
    casts = []
    wide = {}
    for t in graph.initializer:
        if t.data_type == bf16:
            wide[t.name] = f"{t.name}__float32"
            casts.append(
                helper.make_node("Cast", [t.name], [wide[t.name]], name=f"{t.name}/to_float32", to=f32)
            )
    for node in graph.node:
        node.input[:] = [wide.get(n, n) for n in node.input]
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == bf16:
                attr.i, changed = f32, True
            if attr.HasField("t") and attr.t.data_type == bf16:
                attr.t.CopyFrom(
                    numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float32), attr.t.name)
                )
                changed = True
    for v in (*graph.input, *graph.output, *graph.value_info):
        if v.type.tensor_type.elem_type == bf16:
            v.type.tensor_type.elem_type, changed = f32, True
    if not (changed or casts):
        return None
    nodes = [*casts, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    return out


def quantizer_name(node_name: str) -> str:
    """The PyTorch module name of the quantizer a traced Q/DQ node came from.

    ``/transformer/transformer_blocks.0/attn/to_q/input_quantizer/TRT_FP8QuantizeLinear`` ->
    ``transformer.transformer_blocks.0.attn.to_q.input_quantizer`` (the tracer's scope names).
    """
    return ".".join(node_name.strip("/").split("/")[:-1])


def activation_codes(model: ModelProto) -> dict[str, str]:
    """FP8 code tensors of the activation quantizers: ``{QuantizeLinear output: quantizer name}``.

    Activation quantizers are the QuantizeLinear nodes whose input is computed (not an
    initializer, nor a Cast of one).
    """
    graph = model.graph
    stored = {t.name for t in graph.initializer}
    stored |= {n.output[0] for n in graph.node if n.op_type == "Cast" and n.input[0] in stored}
    return {
        n.output[0]: quantizer_name(n.name)
        for n in graph.node
        if n.op_type == "QuantizeLinear" and n.domain in DEFAULT_DOMAINS and n.input[0] not in stored
    }


@contextlib.contextmanager
def rss_peak(into: list[int]) -> Iterator[None]:
    """Append the peak resident memory (bytes) of this process over the block to ``into``.

    Sampled every 20 ms from ``/proc/self/statm`` (Linux); nothing is appended elsewhere.
    """
    import os

    statm = Path("/proc/self/statm")
    if not statm.is_file():
        yield
        return
    page = os.sysconf("SC_PAGE_SIZE")
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while True:
            peak[0] = max(peak[0], int(statm.read_text().split()[1]) * page)
            if done.wait(0.02):
                return

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        into.append(max(peak[0], int(statm.read_text().split()[1]) * page))


@dataclass
class GraphRun:
    """ONNX Runtime's results for the validation cases of one graph.

    Attributes:
        outputs: per case, the graph's outputs by name, as float32.
        codes: per case, the FP8 codes (uint8 bit patterns) of each activation quantizer by
            quantizer name (empty unless asked for; :class:`SpilledCodes` when kept in files).
        providers: the providers the session ran on.
        compute: ``float32`` when a BF16 graph ran in its float32 form, else ``graph``.
        peak_rss: peak resident memory of this process (bytes) while the session loaded and ran.
    """

    outputs: list[dict[str, np.ndarray]]
    codes: list[Mapping[str, np.ndarray]] = field(default_factory=list)
    providers: list[str] = field(default_factory=list)
    compute: str = "graph"
    peak_rss: int | None = None


def _ort_errors() -> tuple[type[BaseException], ...]:
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = "Fail NotImplemented InvalidGraph InvalidArgument RuntimeException EPFail NoSuchFile".split()
    return (*(getattr(state, n) for n in names if hasattr(state, n)), MemoryError)


def session(path: Path, available: list[str]) -> ort.InferenceSession:
    """An ONNX Runtime session on the file at ``path``: a BF16 graph in its :func:`float32_form`.

    Raises:
        NotValidated: ONNX Runtime refuses the graph (naming its error).
    """
    return _open(path, available, codes=False)[0]


def _open(path: Path, available: list[str], codes: bool) -> tuple[ort.InferenceSession, dict[str, str], str]:
    """A session on ``path`` (external data read beside it), and what it computes.

    A BF16 graph is opened in its :func:`float32_form`; with ``codes`` the FP8 codes of its
    activation quantizers are graph outputs too. Such a modified graph is written beside ``path``
    (its external data locations are relative) only while the session loads.

    Returns:
        The session, ``{code output: quantizer name}`` (empty without ``codes``) and the compute
        dtype (``float32`` for the float32 form, else ``graph``).

    Raises:
        NotValidated: ONNX Runtime refuses the graph (naming its error).
    """
    import onnxruntime as ort

    # Errors only: ORT warns about every Unsqueeze on a dynamic shape it can't remove.
    ort.set_default_logger_severity(3)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    model = check_external_data(path)
    wide = float32_form(model)
    graph = wide or model
    names = activation_codes(graph) if codes else {}
    for name in names:
        graph.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT8E4M3FN, None))
    kwargs = {"providers": available, "disabled_optimizers": DISABLED_OPTIMIZERS}
    compute = "graph" if wide is None else "float32"
    try:
        if wide is None and not names:
            return ort.InferenceSession(str(path), options, **kwargs), names, compute
        temporary = path.with_name(f".{path.stem}.validation.onnx")
        try:
            temporary.write_bytes(graph.SerializeToString())
            return ort.InferenceSession(str(temporary), options, **kwargs), names, compute
        finally:
            temporary.unlink(missing_ok=True)
    except _ort_errors() as err:
        raise NotValidated(f"ONNX Runtime cannot load {path.name}: {first_line(err)}") from None


def run(sess: ort.InferenceSession, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run ``sess`` on ``feeds`` (float32 or int64 numpy; cast to float16 where the graph says).

    Returns:
        Every output by name: float outputs as float32, FP8 ones as their uint8 bit patterns.
    """
    typed = {}
    for meta in sess.get_inputs():
        x = feeds[meta.name]
        typed[meta.name] = x.astype(np.float16) if meta.type == "tensor(float16)" else x
    names = [o.name for o in sess.get_outputs()]
    out = {}
    for n, v in zip(names, sess.run(names, typed), strict=True):
        v = np.asarray(v)
        # A copy either way: an array over ONNX Runtime's output buffer keeps the session's memory
        # arena alive (measured: 1 GiB held after a 12-block SD3.5-medium run).
        out[n] = v.copy() if v.dtype == np.uint8 else v.astype(np.float32)
    return out


class SpilledCodes(Mapping[str, np.ndarray]):
    """One case's FP8 codes, kept in an ``.npz`` file and read one quantizer at a time.

    The codes of every activation of a full-size transformer at the validation shapes are
    ~0.2 GiB (SD3.5-medium, both cases); the reference reads each quantizer's once per pass, so
    they need not stay in memory beside the module it loads.
    """

    def __init__(self, path: Path, names: Iterable[str]) -> None:
        self.path, self._names = path, frozenset(names)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._names:
            raise KeyError(name)
        with np.load(self.path) as stored:
            return stored[name]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._names))

    def __len__(self) -> int:
        return len(self._names)


def run_cases(
    path: Path,
    available: list[str],
    feeds: Sequence[Mapping[str, np.ndarray]],
    codes: bool = False,
    codes_dir: Path | None = None,
) -> GraphRun:
    """Run the graph at ``path`` on every validation case (``feeds``: per case, the inputs by name).

    Args:
        available: ONNX Runtime providers (:func:`providers`).
        codes: also return the FP8 codes of the activation quantizers (FP8 graphs).
        codes_dir: where to keep those codes (one ``.npz`` per case, as :class:`SpilledCodes`)
            instead of in memory.

    Raises:
        NotValidated: ONNX Runtime cannot load or run the graph (naming its error).
    """
    peak: list[int] = []
    with rss_peak(peak):
        sess, names, compute = _open(path, available, codes)
        outputs, found = [], []
        for case in feeds:
            try:
                got = run(sess, case)
            except _ort_errors() as err:
                raise NotValidated(f"ONNX Runtime cannot run {path.name}: {first_line(err)}") from None
            case_codes = {q: got.pop(name) for name, q in names.items()}
            if codes_dir is not None and case_codes:
                spilled = codes_dir / f"{path.stem}.codes_{len(found)}.npz"
                np.savez(spilled, **case_codes)
                case_codes = SpilledCodes(spilled, case_codes)
            found.append(case_codes)
            outputs.append(got)
        ran_on = sess.get_providers()
        del sess
    return GraphRun(outputs, found if codes else [], ran_on, compute, peak[0] if peak else None)


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
    """Per-output errors of ``actual`` (ONNX Runtime) against ``expected`` (PyTorch), in its order.

    A NaN or inf in either, a missing output or a shape mismatch counts as an infinite error.
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


def check_cases(
    graph_run: GraphRun,
    stem: str,
    shapes: Sequence[Mapping[str, tuple[int, ...]]],
    expected: Sequence[Mapping[str, np.ndarray]],
    tol: Tolerance,
    against: str,
) -> tuple[dict, list[str]]:
    """Compare ONNX Runtime's results with PyTorch's, case by case.

    Args:
        stem: the graph's name in failure messages.
        shapes, expected: per case, the input shapes and the PyTorch outputs.
        against: what ``expected`` is, for the report (``pytorch``, ``modelopt fake quant``).

    Returns:
        The report entry (status, providers, compute dtype, tolerance, worst relative error,
        peak memory, per-case outputs) and one :func:`describe_failure` line per output over the
        tolerance.
    """
    cases, failures = [], []
    worst = 0.0
    for case_shapes, got, want in zip(shapes, graph_run.outputs, expected, strict=True):
        checks = compare(got, want, tol)
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
        "providers": graph_run.providers,
        "compute": graph_run.compute,
        "tolerance": {"rtol": tol.rtol, "atol": tol.atol},
        "max_rel": json_float(worst),
        "peak_rss_bytes": graph_run.peak_rss,
        "cases": cases,
    }
    return entry, failures


def information(
    graph_run: GraphRun,
    shapes: Sequence[Mapping[str, tuple[int, ...]]],
    unquantized: Sequence[Mapping[str, np.ndarray]],
) -> dict:
    """The FP8 graph against the unquantized PyTorch model: the quantization error, for information."""
    cases = []
    for case_shapes, got, want in zip(shapes, graph_run.outputs, unquantized, strict=True):
        checks = compare(got, want, Tolerance(rtol=0.0, atol=0.0))
        outputs = {c.output: {k: c.to_json()[k] for k in ("max_abs", "max_ref", "rel")} for c in checks}
        cases.append({"shapes": {k: list(v) for k, v in case_shapes.items()}, "outputs": outputs})
    return {"against": "unquantized pytorch", "cases": cases}
