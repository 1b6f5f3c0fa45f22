"""eval.json: aggregation, the typed report and its reader's errors, the table; prompt files and LPIPS."""

from __future__ import annotations

import json

import pytest

from sd35trt.bench.eval_report import (
    SCHEMA,
    Aggregate,
    EvalDevices,
    EvalEngines,
    EvalFiles,
    EvalParams,
    EvalReference,
    EvalReport,
    LpipsStatus,
    PromptScore,
    format_eval,
    read_eval,
)
from sd35trt.bench.evaluate import LPIPS_SKIPPED, load_prompts, lpips_status
from sd35trt.bench.reports import write_report
from sd35trt.errors import ConfigError, ReportError


def _row(index: int, psnr: float | None, ssim: float, prompt: str = "a cat") -> PromptScore:
    return PromptScore(
        index=index,
        prompt=prompt,
        seed=index,
        psnr_db=psnr,
        ssim=ssim,
        lpips=None,
        reference_image=f"images/{index:02d}_reference.png",
        engine_image=f"images/{index:02d}_engines.png",
    )


def synthetic_report(rows: list[PromptScore]) -> EvalReport:
    return EvalReport(
        created="2026-11-21T00:00:00+00:00",
        device=EvalDevices(engines="cpu", reference="cpu"),
        engines=EvalEngines(dir="runs/tiny/engines", label="sd35trt ONNX Runtime FP8", backend="onnxruntime"),
        reference=EvalReference(dir="runs/tiny/model", label="diffusers PyTorch FP32", dtype="float32"),
        prompts_file="calibration_prompts/heldout.txt",
        params=EvalParams(
            num_inference_steps=8,
            guidance_scale=4.5,
            height=128,
            width=128,
            negative_prompt="",
            max_sequence_length=256,
            skip_layer_guidance=None,
            seeds="0 + prompt index",
        ),
        per_prompt=rows,
        aggregate=Aggregate.of(rows),
        lpips=LpipsStatus(available=False, reason=LPIPS_SKIPPED),
        warnings=[],
        files=EvalFiles(json="eval.json", table="eval.md", grid=None),
    )


def test_aggregate_keeps_identical_pairs_out_of_psnr_statistics():
    rows = [_row(0, None, 1.0), _row(1, 30.0, 0.9), _row(2, 40.0, 0.95)]
    agg = Aggregate.of(rows)
    assert agg.identical == 1 and agg.prompts == 3
    assert agg.psnr_db.mean == pytest.approx(35.0) and agg.psnr_db.min == 30.0
    assert agg.ssim.min == 0.9 and agg.ssim.median == 0.95 and agg.lpips is None
    only_identical = Aggregate.of(rows[:1]).psnr_db
    assert (only_identical.mean, only_identical.min) == (None, None)  # no finite PSNR at all


def test_format_eval_table():
    rows = [_row(0, None, 1.0), _row(1, 31.234, 0.95, prompt="x" * 80)]
    table = format_eval(synthetic_report(rows))
    assert "| 0 | 0 | a cat | inf | 1.0000 |" in table
    assert "31.23" in table and "…" in table and "8 steps" in table
    assert LPIPS_SKIPPED in table and "LPIPS |" not in table


def test_written_report_reads_back_equal(tmp_path):
    report = synthetic_report([_row(0, 30.5, 0.9)])
    path = write_report(tmp_path / "eval.json", report)
    assert json.loads(path.read_text())["schema"] == SCHEMA
    assert read_eval(path) == report


def test_a_bad_field_is_one_line_naming_the_file_and_field(tmp_path):
    data = synthetic_report([_row(0, 30.5, 0.9)]).to_json()
    data["per_prompt"][0]["ssim"] = 1.5  # SSIM is at most 1
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ReportError) as err:
        read_eval(path)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{path}: field per_prompt[0].ssim") and "1.5" in msg


def test_load_prompts_skips_comments_and_blanks(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("# header\n\nfirst prompt\n  second prompt  \n# x\nthird\n")
    assert load_prompts(p) == ["first prompt", "second prompt", "third"]
    assert load_prompts(p, 2) == ["first prompt", "second prompt"]
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ConfigError, match="holds no prompt"):
        load_prompts(tmp_path / "empty.txt")
    with pytest.raises(ConfigError, match="does not exist"):
        load_prompts(tmp_path / "missing.txt")


def test_lpips_is_reported_as_skipped_without_local_weights():
    status = lpips_status()
    if status.available:  # a machine with lpips and its AlexNet weights
        pytest.skip("LPIPS weights are present here")
    assert status.reason.startswith(LPIPS_SKIPPED)
