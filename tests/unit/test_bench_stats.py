"""Bench statistics, the overhead arithmetic, bench.json's structure and its figure; eval aggregation."""

from __future__ import annotations

import json
import math
import random
import time

import numpy as np
import pytest
import torch

from sd35trt.bench import (
    SCHEMA,
    STAGES,
    CallLog,
    InstantTransformer,
    MemoryProbe,
    StageClock,
    TimedEngine,
    format_bench,
    percentile,
    stage_stats,
    step_overheads,
    summarize,
)
from sd35trt.components import Component, spec
from sd35trt.config import Architecture
from sd35trt.evaluate import LPIPS_SKIPPED, aggregate, format_eval, load_prompts, lpips_status
from sd35trt.runtime.engine import Engine
from sd35trt.tiny import model_dims

DIMS = model_dims(Architecture.TINY)


# -- percentiles and summaries ------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 5, 10, 101])
@pytest.mark.parametrize("q", [0, 10, 50, 90, 99, 100])
def test_percentile_matches_numpy(n, q):
    rng = random.Random(n * 1000 + q)
    values = [rng.uniform(0, 10) for _ in range(n)]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)


def test_percentile_known_values_and_order_independence():
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 90) == pytest.approx(4.6)  # 4 + 0.6 * (5 - 4)
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 5.0


def test_percentile_rejects_nothing_and_bad_q():
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match=r"0\.\.100"):
        percentile([1.0], 101)


def test_summarize_converts_units_and_p90_is_above_median():
    s = summarize([0.001, 0.002, 0.003, 0.004, 0.100], unit="ms")
    assert s["unit"] == "ms" and s["n"] == 5
    assert s["median"] == pytest.approx(3.0)
    assert s["p90"] == pytest.approx(4.0 + 0.6 * 96.0)  # one slow run pulls p90, not the median
    assert s["min"] == pytest.approx(1.0) and s["max"] == pytest.approx(100.0)
    us = summarize([0.000010, 0.000030], unit="us")
    assert us["median"] == pytest.approx(20.0)


def test_summarize_empty_gives_nones():
    s = summarize([])
    assert s["n"] == 0 and s["median"] is None and s["p90"] is None


def test_stage_stats_sums_calls_per_run_and_divides_transformer_by_steps():
    runs = [
        {
            "clip_l": [0.001, 0.003],
            "transformer": [0.010] * 4 + [0.020],
            "vae_decoder": [0.005],
            "total": [0.2],
        },
        {"clip_l": [0.002, 0.002], "transformer": [0.012] * 5, "vae_decoder": [0.007], "total": [0.3]},
    ]
    st = stage_stats(runs, steps=4)
    assert set(STAGES) <= set(st) and "transformer_call" in st
    assert st["clip_l"]["median"] == pytest.approx(4.0)  # both runs: 4 ms in two calls
    assert st["transformer_step"]["n"] == 2
    assert st["transformer_step"]["median"] == pytest.approx((60 / 4 + 60 / 4) / 2)
    assert st["transformer_call"]["n"] == 10
    assert st["total"]["median"] == pytest.approx(250.0)
    # host = total - every engine call: (200 - 4 - 60 - 5, 300 - 4 - 60 - 7) ms
    assert st["host"]["median"] == pytest.approx((131.0 + 229.0) / 2)
    assert st["t5"]["median"] is None  # never called: no samples, no invented zero


# -- the overhead arithmetic ----------------------------------------------------------------------


def test_step_overheads_groups_calls_by_timestep():
    us = 1000  # ns
    calls = [
        (0 * us, 100 * us, 1000.0),  # step 0: one call of 100 us
        (130 * us, 230 * us, 900.0),  # step 1: CFG call ...
        (250 * us, 300 * us, 900.0),  # ... and the skip-layer pass, 50 us
        (340 * us, 440 * us, 800.0),  # step 2 (last: no successor)
    ]
    got = [round(x * 1e6, 6) for x in step_overheads(calls)]
    assert got == [30.0, 60.0]  # 130 - 100; (340 - 130) - (100 + 50)


def test_step_overheads_needs_two_steps():
    assert step_overheads([]) == []
    assert step_overheads([(0, 10, 1.0)]) == []


# -- clocks, memory, engine wrappers --------------------------------------------------------------


def test_stage_clock_measures_sleep_and_clears():
    clock = StageClock("cpu")
    with clock.time("a"):
        time.sleep(0.02)
    with clock.time("a"):
        pass
    got = clock.collect()
    assert len(got["a"]) == 2 and got["a"][0] >= 0.019 and got["a"][1] < got["a"][0]
    assert clock.collect() == {}


def test_memory_probe_sees_an_allocation():
    probe = MemoryProbe("cpu")
    probe.reset()
    before = probe.read()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    after = probe.read()
    del block
    assert after["kind"] == "peak_rss"
    if after["method"].startswith("VmHWM"):
        assert after["peak_rss_bytes"] >= before["peak_rss_bytes"] + 48 * 2**20
    else:  # ru_maxrss cannot be reset: only monotonic
        assert after["peak_rss_bytes"] >= before["peak_rss_bytes"]


class _Echo(Engine):
    def _activate_impl(self):
        pass

    def _infer_impl(self, feeds):
        time.sleep(0.005)
        return {"noise_pred": feeds["hidden_states"] * 2}

    def _deactivate_impl(self):
        pass


def _feeds(sp, **given) -> dict:
    """Every input of ``sp`` (the engine base checks them all), ``given`` ones as passed."""
    return {n: given.get(n, torch.zeros(1)) for n in sp.input_names}


def test_timed_engine_times_each_call_and_delegates():
    sp = spec(Component.TRANSFORMER, DIMS)
    inner = _Echo(sp)
    clock = StageClock("cpu")
    timed = TimedEngine(inner, clock, "transformer")
    with timed:
        assert timed.active and inner.active
        out = timed.infer(_feeds(sp, hidden_states=torch.ones(1)))
        timed.infer(_feeds(sp, hidden_states=torch.ones(1)))
    assert not inner.active
    assert out["noise_pred"].item() == 2.0
    assert timed.spec is sp
    calls = clock.collect()["transformer"]
    assert len(calls) == 2 and all(c >= 0.004 for c in calls)


def test_instant_transformer_returns_preallocated_zeros_and_logs_timesteps():
    sp = spec(Component.TRANSFORMER, DIMS)
    log = CallLog()
    engine = InstantTransformer(sp, log)
    x = torch.randn(2, 16, 8, 8)
    with engine:
        a = engine.infer(_feeds(sp, hidden_states=x, timestep=torch.full((2,), 900.0)))["noise_pred"]
        b = engine.infer(_feeds(sp, hidden_states=x, timestep=torch.full((2,), 800.0)))["noise_pred"]
        c = engine.infer(_feeds(sp, hidden_states=x[:1], timestep=torch.full((1,), 800.0)))["noise_pred"]
    assert a is b  # preallocated: the same tensor every call of a shape
    assert a.shape == x.shape and not a.any() and c.shape == (1, 16, 8, 8)
    assert [k for _, _, k in log.calls] == [900.0, 800.0, 800.0]
    assert all(end >= start for start, end, _ in log.calls)


# -- bench.json structure and the figure ------------------------------------------------------------


def _stats(median_ms: float) -> dict:
    return summarize([median_ms / 1e3, median_ms * 1.2 / 1e3])


def synthetic_result() -> dict:
    def config(label: str, k: float, kind: str) -> dict:
        stages = {s: _stats(k * (i + 1)) for i, s in enumerate(STAGES)}
        stages["transformer_call"] = _stats(k)
        return {
            "label": label,
            "kind": kind,
            "device": "cpu",
            "stages": stages,
            "images_per_second": 1e3 / stages["total"]["median"],
            "memory": {
                "kind": "peak_rss",
                "peak_rss_bytes": int(300e6 * k),
                "baseline_rss_bytes": 1,
                "method": "x",
            },
            "load_average_1m": [1.0, 1.0],
        }

    per_step = {"sd35trt": summarize([20e-6, 22e-6], "us"), "diffusers": summarize([60e-6, 70e-6], "us")}
    return {
        "schema": SCHEMA,
        "created": "2026-11-21T00:00:00+00:00",
        "host": {"device": "cpu", "timer": "time.perf_counter", "platform": "linux"},
        "runs": 2,
        "warmup": 1,
        "params": {
            "height": 128,
            "width": 128,
            "num_inference_steps": 8,
            "guidance_scale": 4.5,
            "num_images": 1,
        },
        "configurations": [
            config("sd35trt ONNX Runtime FP8", 1.0, "engines"),
            config("diffusers PyTorch FP32", 2.0, "diffusers"),
        ],
        "overhead": {
            "sd35trt": {"per_step": per_step["sd35trt"]},
            "diffusers": {"per_step": per_step["diffusers"]},
            "ratio": 21 / 65,
            "target_ratio": 0.5,
            "meets_target": True,
        },
    }


def test_format_bench_lists_every_configuration_and_the_ratio():
    text = format_bench(synthetic_result())
    assert "sd35trt ONNX Runtime FP8" in text and "diffusers PyTorch FP32" in text
    assert "ratio 0.323" in text and "meets the target" in text
    assert "median / p90 in ms" in text


def test_bench_without_reference_formats_and_plots(tmp_path):
    from sd35trt.plots import plot_bench

    result = synthetic_result()
    result["configurations"] = result["configurations"][:1]
    result["overhead"].update(diffusers=None, ratio=None, meets_target=None)
    text = format_bench(result)
    assert "runtime overhead per step: sd35trt 21.0 us" in text and "ratio " not in text
    assert plot_bench(result, tmp_path / "b.png").stat().st_size > 10_000


def test_plot_bench_writes_a_png(tmp_path):
    from PIL import Image

    from sd35trt.plots import merge_bench, plot_bench

    out = plot_bench(synthetic_result(), tmp_path / "bench.png")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] >= 800 and im.size[1] >= 500
    merged = merge_bench(
        [synthetic_result(), {**synthetic_result(), "host": {"device": "cuda", "timer": "CUDA events"}}]
    )
    assert len(merged["configurations"]) == 4 and merged["configurations"][2]["label"].endswith("[cuda]")
    json.dumps(merged, allow_nan=False)


def test_duplicate_labels_get_the_run_name_then_a_number():
    from sd35trt.bench import _dedupe_labels

    configs = [
        {"label": "sd35trt ONNX Runtime FP8", "engines_dir": "runs/a/engines"},
        {"label": "sd35trt ONNX Runtime FP8", "engines_dir": "runs/b/engines"},
        {"label": "sd35trt ONNX Runtime FP8", "engines_dir": "other/b/engines"},
        {"label": "diffusers PyTorch FP32"},
    ]
    _dedupe_labels(configs)
    assert [c["label"] for c in configs] == [
        "sd35trt ONNX Runtime FP8 (a)",
        "sd35trt ONNX Runtime FP8 (b) #1",
        "sd35trt ONNX Runtime FP8 (b) #2",
        "diffusers PyTorch FP32",
    ]


# -- eval helpers ---------------------------------------------------------------------------------------


def test_load_prompts_skips_comments_and_blanks(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("# header\n\nfirst prompt\n  second prompt  \n# x\nthird\n")
    assert load_prompts(p) == ["first prompt", "second prompt", "third"]
    assert load_prompts(p, 2) == ["first prompt", "second prompt"]
    from sd35trt.errors import ConfigError

    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ConfigError, match="holds no prompt"):
        load_prompts(tmp_path / "empty.txt")
    with pytest.raises(ConfigError, match="does not exist"):
        load_prompts(tmp_path / "missing.txt")


def test_aggregate_keeps_identical_pairs_out_of_psnr_statistics():
    rows = [
        {"psnr_db": None, "ssim": 1.0, "lpips": None},
        {"psnr_db": 30.0, "ssim": 0.9, "lpips": None},
        {"psnr_db": 40.0, "ssim": 0.95, "lpips": None},
    ]
    agg = aggregate(rows)
    assert agg["identical"] == 1 and agg["prompts"] == 3
    assert agg["psnr_db"]["mean"] == pytest.approx(35.0) and agg["psnr_db"]["min"] == 30.0
    assert agg["ssim"]["min"] == 0.9 and agg["lpips"] is None
    assert all(v is None for v in aggregate(rows[:1])["psnr_db"].values())  # all identical: no finite PSNR


def test_lpips_is_reported_as_skipped_without_local_weights():
    status = lpips_status()
    if status.available:  # a machine with lpips and its AlexNet weights
        pytest.skip("LPIPS weights are present here")
    assert status.reason.startswith(LPIPS_SKIPPED)


def test_format_eval_table():
    rows = [
        {"index": 0, "seed": 0, "prompt": "a cat", "psnr_db": None, "ssim": 1.0, "lpips": None},
        {"index": 1, "seed": 1, "prompt": "x" * 80, "psnr_db": 31.234, "ssim": 0.95, "lpips": None},
    ]
    result = {
        "engines": {"label": "sd35trt ONNX Runtime FP8"},
        "reference": {"label": "diffusers PyTorch float32"},
        "params": {"height": 128, "width": 128, "num_inference_steps": 8},
        "per_prompt": rows,
        "aggregate": aggregate(rows),
        "lpips": {"available": False, "reason": LPIPS_SKIPPED},
    }
    table = format_eval(result)
    assert "| 0 | 0 | a cat | inf | 1.0000 |" in table
    assert "31.23" in table and "…" in table
    assert LPIPS_SKIPPED in table and "LPIPS |" not in table
    assert not math.isnan(aggregate(rows)["ssim"]["mean"])
