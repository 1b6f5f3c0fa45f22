"""What the export stage says about its graphs: one progress line per component, and the report JSON."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def report_line(label: str, graphs: Sequence[Any]) -> str:
    """``label: <stem> <MiB> <precision>[ + fp8], max rel err <e> (...); ... (<s> s)`` for one component.

    The validation part also says when a BF16 graph was validated in its float32 form and the
    peak RSS of the process while ONNX Runtime ran the graph (what validation needed).

    Args:
        label: e.g. ``[4/5] transformer``.
        graphs: the component's exported graphs (the stage's ``_Graph`` records), first the main one.
    """
    parts = []
    for g in graphs:
        size = sum(p.stat().st_size for p in g.files) / (1 << 20)
        v = g.validation
        if v.get("status") == "skipped":
            check = "not validated"
        else:
            compute = " (float32 form)" if v.get("compute") == "float32" else ""
            memory = f", {v['peak_rss_bytes'] / (1 << 30):.1f} GiB RSS" if v.get("peak_rss_bytes") else ""
            check = f"max rel err {float(v['max_rel']):.2g}{compute}{memory}"
        blocks = f" (fp32 blocks {list(g.fp32_blocks)})" if g.fp32_blocks else ""
        fp8 = " + fp8" if g.quantized else ""
        parts.append(f"{g.stem} {size:.1f} MiB {g.precision.value}{blocks}{fp8}, {check}")
    return f"{label}: {'; '.join(parts)} ({graphs[0].seconds:.1f} s)"


def report_json(
    graphs: Sequence[Any], opset: int, device: str, providers: Sequence[str], seconds: float
) -> dict:
    """The content of ``export_report.json``: per graph its files (bytes), precision, validation.

    Args:
        graphs: every exported graph (the stage's ``_Graph`` records).
        device: where tracing ran (``cpu``, ``cuda``).
        providers: the ONNX Runtime providers validation used.
        seconds: the stage's wall time.
    """
    import onnxruntime as ort

    out = {}
    for g in graphs:
        out[g.stem] = {
            "component": g.component.value,
            "onnx": g.files[0].name,
            "files": {p.name: p.stat().st_size for p in g.files},
            "external_data": g.external_data.name if g.external_data else None,
            "precision": g.precision.value,
            "fp32_blocks": list(g.fp32_blocks),
            "quantized": g.quantized,
            "fp8": g.fp8,
            "export_seconds": round(g.seconds, 2),
            "validation": g.validation,
            "vs_unquantized": g.information,
        }
    return {
        "opset": opset,
        "device": device,
        "onnxruntime": ort.__version__,
        "providers": list(providers),
        "seconds": round(seconds, 2),
        "graphs": out,
    }
