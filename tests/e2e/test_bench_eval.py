"""``bench`` and ``eval`` on the tiny FP8 engines (ONNX Runtime, CPU): files, figures, metric behaviour.

No timing is asserted: benchmarks print figures, tests check what the files hold.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sd35trt.bench.benchmark import BenchOptions, bench
from sd35trt.bench.eval_report import EVAL_GRID, EVAL_JSON, EVAL_TABLE, read_eval
from sd35trt.bench.eval_report import SCHEMA as EVAL_SCHEMA
from sd35trt.bench.evaluate import compare, evaluate
from sd35trt.bench.report import BENCH_JSON, BENCH_PNG, STAGES, read_bench
from sd35trt.bench.report import SCHEMA as BENCH_SCHEMA
from sd35trt.metrics import psnr, ssim

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]

RUNS, OVERHEAD_RUNS, PROMPTS = 2, 2, 2


def _strict_json(path):
    """Parse as strict JSON: NaN or Infinity would make the file unreadable to other tools."""

    def bad(constant):
        raise AssertionError(f"{path} holds the non-JSON constant {constant}")

    return json.loads(path.read_text(), parse_constant=bad)


@pytest.fixture(scope="module")
def bench_out(built_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    options = BenchOptions(runs=RUNS, warmup=1, out_dir=out, overhead_runs=OVERHEAD_RUNS)
    returned = bench([built_run / "engines"], built_run / "model", options)
    return out, returned


@pytest.fixture(scope="module")
def eval_out(built_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    returned = evaluate(
        built_run / "engines",
        built_run / "model",
        REPO / "calibration_prompts" / "heldout.txt",
        out,
        num_prompts=PROMPTS,
    )
    return out, returned


def _check_stats(st, n):
    assert st["n"] == n
    assert 0 < st["min"] <= st["median"] <= st["p90"] <= st["max"]


def test_bench_json_structure(bench_out, built_run):
    out, returned = bench_out
    data = _strict_json(out / BENCH_JSON)
    assert data == returned.to_json()  # the file is what the function returned
    assert read_bench(out / BENCH_JSON) == returned  # and its readers see the same
    assert data["schema"] == BENCH_SCHEMA and data["runs"] == RUNS
    assert data["host"]["device"] == "cpu" and data["host"]["timer"] == "time.perf_counter"
    steps = data["params"]["num_inference_steps"]
    labels = [c["label"] for c in data["configurations"]]
    assert labels == ["sd35trt ONNX Runtime FP8", "diffusers PyTorch FP32"]
    for c in data["configurations"]:
        for stage in STAGES:
            _check_stats(c["stages"][stage], RUNS)
        # every denoising step calls the transformer at least once (SLG adds calls)
        assert c["stages"]["transformer_call"]["n"] >= RUNS * steps
        assert c["stages"]["total"]["median"] > c["stages"]["vae_decoder"]["median"]
        assert c["images_per_second"] == pytest.approx(1e3 / c["stages"]["total"]["median"])
        assert c["memory"]["kind"] == "peak_rss" and c["memory"]["peak_rss_bytes"] > 50 * 2**20
    assert data["configurations"][0]["engines_dir"] == str(built_run / "engines")
    # the loop's host time (sd35trt only) is part of the whole generation's host time
    ours, theirs = (c["stages"] for c in data["configurations"])
    _check_stats(ours["host_loop"], RUNS)
    assert 0 < ours["host_loop"]["median"] < ours["host"]["median"] and theirs["host_loop"] is None


def test_bench_times_image_to_image_with_the_vae_encoder(bench_out):
    from sd35trt.bench.report import IMG2IMG_STAGES, format_bench

    out, returned = bench_out
    i2i = _strict_json(out / BENCH_JSON)["img2img"]
    assert i2i["label"] == "sd35trt ONNX Runtime FP8 img2img" and i2i["strength"] == 0.6
    assert i2i["steps_run"] == 5  # 8 steps at strength 0.6, as diffusers' get_timesteps cuts them
    for stage in IMG2IMG_STAGES:
        _check_stats(i2i["stages"][stage], RUNS)
    assert i2i["stages"]["transformer_call"]["n"] == RUNS * i2i["steps_run"]  # no skip-layer pass
    assert "image-to-image, sd35trt ONNX Runtime FP8 img2img (strength 0.6, 5 of 8 steps): VAE encode" in (
        format_bench(returned)
    )


def test_bench_overhead_is_measured_on_both_sides(bench_out):
    o = bench_out[0] / BENCH_JSON
    o = _strict_json(o)["overhead"]
    samples = OVERHEAD_RUNS * (o["num_inference_steps"] - 1)  # the last step has no successor
    for side in ("sd35trt", "diffusers"):
        st = o[side]["per_step"]
        assert st["unit"] == "us" and st["n"] == samples
        assert 0 < st["median"] < 1e5  # host work outside an instant transformer: well under 100 ms
    assert o["ratio"] == pytest.approx(
        o["sd35trt"]["per_step"]["median"] / o["diffusers"]["per_step"]["median"]
    )
    assert o["meets_target"] == (o["ratio"] <= o["target_ratio"])


def test_bench_png_is_an_image(bench_out):
    with Image.open(bench_out[0] / BENCH_PNG) as im:
        assert im.format == "PNG" and im.size[0] >= 1000 and im.size[1] >= 600
        assert len(set(im.convert("L").getdata())) > 20  # drawn, not blank


def test_eval_json_structure(eval_out):
    out, returned = eval_out
    data = _strict_json(out / EVAL_JSON)
    assert data == returned.to_json()
    assert read_eval(out / EVAL_JSON) == returned
    assert data["schema"] == EVAL_SCHEMA
    assert data["engines"]["label"] == "sd35trt ONNX Runtime FP8"
    rows = data["per_prompt"]
    assert [r["index"] for r in rows] == list(range(PROMPTS))
    assert [r["seed"] for r in rows] == list(range(PROMPTS))
    for r in rows:
        assert r["psnr_db"] is None or r["psnr_db"] > 0
        assert -1.0 <= r["ssim"] <= 1.0
        for key in ("reference_image", "engine_image"):
            with Image.open(out / r[key]) as im:
                assert im.size == (data["params"]["width"], data["params"]["height"])
    agg = data["aggregate"]
    assert agg["prompts"] == PROMPTS and agg["ssim"]["min"] == min(r["ssim"] for r in rows)
    if not data["lpips"]["available"]:
        assert data["lpips"]["reason"].startswith("LPIPS skipped: weights not available offline")
        assert agg["lpips"] is None and data["lpips"]["reason"] in (out / EVAL_TABLE).read_text()


def test_eval_grid_png_is_an_image(eval_out):
    with Image.open(eval_out[0] / EVAL_GRID) as im:
        assert im.format == "PNG" and im.size[0] >= 900 and im.size[1] >= 300 * PROMPTS


def _images(eval_out, index):
    out, report = eval_out
    row = report.per_prompt[index]
    load = lambda name: np.asarray(Image.open(out / name).convert("RGB"))  # noqa: E731
    return load(row.reference_image), load(row.engine_image)


def test_eval_pairs_each_engine_image_with_its_own_reference(eval_out):
    """The matched pair (same prompt and seed) is far closer than a mismatched one."""
    ref0, eng0 = _images(eval_out, 0)
    ref1, _ = _images(eval_out, 1)
    matched = psnr(ref0, eng0)
    assert matched > psnr(ref1, eng0) + 5
    assert matched > 20  # FP8 on the tiny model stays close to FP32


def test_identical_images_give_infinite_psnr_and_ssim_one(eval_out):
    _, eng = _images(eval_out, 0)
    assert math.isinf(psnr(eng, eng.copy())) and ssim(eng, eng.copy()) == pytest.approx(1.0)
    m = compare(eng, eng.copy())
    assert m["psnr_db"] is None and m["ssim"] == pytest.approx(1.0)  # None = infinite in eval.json


def test_noise_lowers_psnr_and_ssim(eval_out):
    ref, eng = _images(eval_out, 0)
    rng = np.random.default_rng(0)
    clean = compare(ref, eng)
    previous = (psnr(eng, eng), 1.0)
    for sigma in (4.0, 16.0, 48.0):
        noisy = (
            np.clip(eng.astype(np.float64) + rng.normal(0, sigma, eng.shape), 0, 255).round().astype(np.uint8)
        )
        now = (psnr(eng, noisy), ssim(eng, noisy))
        assert now[0] < previous[0] and now[1] < previous[1]  # more noise, lower both
        previous = now
        if sigma >= 16.0:
            m = compare(ref, noisy)
            assert m["psnr_db"] < clean["psnr_db"] and m["ssim"] < clean["ssim"]


def test_eval_inside_a_run_finds_the_run_model_without_reference(built_run, tmp_path):
    """``sd35trt eval --engines runs/<name>/engines`` needs no ``--reference``: the export record
    names the model; engines outside a run (an artefact) are told to give one."""
    from sd35trt.errors import ModelError
    from sd35trt.models.reference import run_model_dir

    assert run_model_dir(built_run / "engines").resolve() == (built_run / "model").resolve()
    (tmp_path / "engines").mkdir()
    with pytest.raises(ModelError, match="--reference is needed"):
        run_model_dir(tmp_path / "engines")
