"""bench.json: the typed report, its reader's errors, its table, merging and the figure."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from sd35trt.bench.benchmark import dedupe_labels
from sd35trt.bench.report import (
    SCHEMA,
    STAGES,
    BenchFiles,
    BenchParams,
    BenchReport,
    Configuration,
    Host,
    Memory,
    Overhead,
    OverheadSide,
    Stages,
    format_bench,
    merge_bench,
    read_bench,
)
from sd35trt.bench.reports import write_report
from sd35trt.bench.stats import summarize
from sd35trt.errors import ReportError


def _stats(median_ms: float):
    return summarize([median_ms / 1e3, median_ms * 1.2 / 1e3])


def _configuration(label: str, k: float, kind: str) -> Configuration:
    stages = {s: _stats(k * (i + 1)) for i, s in enumerate(STAGES)}
    return Configuration(
        label=label,
        kind=kind,
        device="cpu",
        stages=Stages(**stages, transformer_call=_stats(k)),
        images_per_second=1e3 / stages["total"].median,
        memory=Memory(kind="peak_rss", peak_rss_bytes=int(300e6 * k), baseline_rss_bytes=1, method="x"),
        load_average_1m=(1.0, 1.0),
        engines_dir="runs/tiny/engines" if kind == "engines" else None,
    )


def synthetic_report(device: str = "cpu", with_reference: bool = True) -> BenchReport:
    ours, theirs = summarize([20e-6, 22e-6], "us"), summarize([60e-6, 70e-6], "us")
    configurations = [_configuration("sd35trt ONNX Runtime FP8", 1.0, "engines")]
    if with_reference:
        configurations.append(_configuration("diffusers PyTorch FP32", 2.0, "diffusers"))
    ratio = ours.median / theirs.median if with_reference else None
    return BenchReport(
        created="2026-11-21T00:00:00+00:00",
        host=Host(
            platform="linux",
            python="3.11",
            torch="2.13.0",
            cpu_count=2,
            torch_threads=2,
            device=device,
            timer="time.perf_counter",
        ),
        runs=2,
        warmup=1,
        params=BenchParams(
            prompt="a cat",
            negative_prompt="",
            num_inference_steps=8,
            guidance_scale=4.5,
            height=128,
            width=128,
            num_images=1,
            seed=0,
            skip_layer_guidance={"layers": [1]},
        ),
        configurations=configurations,
        overhead=Overhead(
            method="m",
            device=device,
            num_inference_steps=8,
            height=128,
            width=128,
            guidance_scale=4.5,
            skip_layer_guidance=None,
            runs=2,
            sd35trt=OverheadSide(per_step=ours),
            diffusers=OverheadSide(per_step=theirs) if with_reference else None,
            ratio=ratio,
            target_ratio=0.5,
            meets_target=ratio <= 0.5 if ratio is not None else None,
        ),
        files=BenchFiles(json="bench.json", png="bench.png"),
    )


def test_format_bench_lists_every_configuration_and_the_ratio():
    text = format_bench(synthetic_report())
    assert "sd35trt ONNX Runtime FP8" in text and "diffusers PyTorch FP32" in text
    assert "ratio 0.323" in text and "meets the target" in text
    assert "median / p90 in ms" in text
    assert "286" in text  # the engines' peak RSS in MiB (300e6 bytes)


def test_bench_without_reference_formats_and_plots(tmp_path):
    from sd35trt.bench.plots import plot_bench

    report = synthetic_report(with_reference=False)
    text = format_bench(report)
    assert "runtime overhead per step: sd35trt 21.0 us" in text and "ratio " not in text
    assert plot_bench(report, tmp_path / "b.png").stat().st_size > 10_000


def test_plot_bench_writes_a_png_and_merging_labels_devices(tmp_path):
    from PIL import Image

    from sd35trt.bench.plots import plot_bench

    merged = merge_bench([synthetic_report(), synthetic_report(device="cuda")])
    assert [c.label for c in merged.configurations][2] == "sd35trt ONNX Runtime FP8 [cuda]"
    assert merged.host.device == "cpu + cuda" and len(merged.configurations) == 4
    out = plot_bench(merged, tmp_path / "bench.png")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] >= 800 and im.size[1] >= 500
    # one device: labels stay as they are
    same = merge_bench([synthetic_report(), synthetic_report()])
    assert [c.label for c in same.configurations][2] == "sd35trt ONNX Runtime FP8"


def test_duplicate_labels_get_the_run_name_then_a_number():
    base = _configuration("sd35trt ONNX Runtime FP8", 1.0, "engines")
    configs = [
        base.model_copy(update={"engines_dir": "runs/a/engines"}),
        base.model_copy(update={"engines_dir": "runs/b/engines"}),
        base.model_copy(update={"engines_dir": "other/b/engines"}),
        _configuration("diffusers PyTorch FP32", 2.0, "diffusers"),
    ]
    assert [c.label for c in dedupe_labels(configs)] == [
        "sd35trt ONNX Runtime FP8 (a)",
        "sd35trt ONNX Runtime FP8 (b) #1",
        "sd35trt ONNX Runtime FP8 (b) #2",
        "diffusers PyTorch FP32",
    ]


def test_written_report_reads_back_equal_as_strict_json(tmp_path):
    report = synthetic_report()
    path = write_report(tmp_path / "bench.json", report)
    data = json.loads(path.read_text())
    assert data["schema"] == SCHEMA and data["files"]["json"] == "bench.json"
    assert read_bench(path) == report


def test_non_finite_numbers_are_refused_before_writing():
    with pytest.raises(ValidationError, match="finite"):
        summarize([float("nan")])


def _damaged(tmp_path, edit) -> str:
    data = synthetic_report().to_json()
    edit(data)
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ReportError) as err:
        read_bench(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    return message


def test_a_wrong_type_names_the_file_and_the_field(tmp_path):
    def edit(d):
        d["configurations"][1]["stages"]["total"]["median"] = "fast"

    msg = _damaged(tmp_path, edit)
    assert "field configurations[1].stages.total.median" in msg and "'fast'" in msg


def test_a_missing_or_unknown_field_is_named(tmp_path):
    assert "field runs: Field required" in _damaged(tmp_path, lambda d: d.pop("runs"))
    msg = _damaged(tmp_path, lambda d: d["params"].update(steps=8))
    assert "field params.steps: unknown key (check its spelling)" in msg


def test_a_report_of_another_schema_is_refused(tmp_path):
    msg = _damaged(tmp_path, lambda d: d.update(schema="sd35trt.bench/1"))
    assert "field schema" in msg and "sd35trt.bench/2" in msg


def test_missing_and_non_json_files(tmp_path):
    with pytest.raises(ReportError, match="does not exist"):
        read_bench(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ReportError, match=r"bad\.json is not a readable JSON file"):
        read_bench(tmp_path / "bad.json")


def test_plot_script_prints_one_line_for_a_bad_file(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[3] / "scripts" / "plot_bench.py"
    module_spec = importlib.util.spec_from_file_location("plot_bench_script", script)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    (tmp_path / "b.json").write_text(json.dumps({"schema": SCHEMA, "runs": "two"}))
    assert module.main([str(tmp_path / "b.json"), "-o", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "b.json: field" in err
    assert not (tmp_path / "x.png").exists()
