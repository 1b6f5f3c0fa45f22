"""The calibrate stage on the tiny model: record, artefacts, report, determinism, failures."""

import json
import math
import shutil
from pathlib import Path

import pytest

from sd35trt.artifacts.files import sha256_file
from sd35trt.artifacts.manifest import RunManifest, Stage
from sd35trt.artifacts.runlock import MODEL_SUBDIR
from sd35trt.errors import CalibrationError
from sd35trt.models.quantize import CALIBRATION_FILE, quantizers, restore_calibration
from sd35trt.stages.calibrate import (
    QUANT_CONFIG_FILE,
    REPORT_FILE,
    SUMMARY_FILE,
    calibrate,
    prompt_set_sha256,
    read_prompts,
)

pytestmark = pytest.mark.slow

FILES = {f"calibrate/{n}" for n in (CALIBRATION_FILE, SUMMARY_FILE, REPORT_FILE, QUANT_CONFIG_FILE)}


def _fresh_run(src_run, tmp_path, name="run"):
    """An empty run directory that reuses the tiny model already written by ``src_run``."""
    dst = tmp_path / name
    shutil.copytree(src_run / MODEL_SUBDIR, dst / MODEL_SUBDIR)
    return dst


def _small(config):
    cal = config.calibrate.model_copy(update={"num_prompts": 2, "steps": 2, "report_prompts": 1})
    return config.model_copy(update={"calibrate": cal})


def _quiet(_line):
    pass


def test_record_names_prompts_seeds_steps_and_files(calibrated_run, tiny_config):
    s = tiny_config.calibrate
    digest = tiny_config.digest(*Stage.CALIBRATE.config_sections)
    rec = RunManifest(calibrated_run).verified(Stage.CALIBRATE, digest)
    d = rec.details
    assert d.prompt_set_sha256 == prompt_set_sha256(read_prompts(s.prompts, s.num_prompts, "prompts"))
    assert d.seeds == (0, 1)  # 4 prompts in batches of 2
    assert (d.steps, d.guidance_scale, d.dtype, d.device) == (3, 4.5, "float32", "cpu")
    # prompts are encoded as the runtime encodes them (config.runtime)
    assert (d.negative_prompt, d.max_sequence_length) == ("", 256)
    assert {f.path for f in rec.files} == FILES
    assert {"torch", "diffusers", "nvidia-modelopt"} <= set(rec.versions)
    assert d.elapsed_s > 0 and d.peak_memory_bytes > 0
    summary = json.loads((calibrated_run / "calibrate" / SUMMARY_FILE).read_text())
    assert summary == d.summary.to_json()
    report = json.loads((calibrated_run / "calibrate" / REPORT_FILE).read_text())
    assert d.report.to_json() == {k: report[k] for k in d.report.to_json()}
    # Linear layers per block: 18 (block 0, with dual attention), 14, 11 (last, context_pre_only).
    assert summary["enabled"]["weight"] == summary["enabled"]["input"] == 18 + 14 + 11
    assert summary["enabled"]["attention"] == 0  # fp8_attention is off in tiny.yaml
    assert set(summary["high_precision_linears"]) == {
        "time_text_embed.timestep_embedder.linear_1",
        "time_text_embed.timestep_embedder.linear_2",
        "time_text_embed.text_embedder.linear_1",
        "time_text_embed.text_embedder.linear_2",
        "context_embedder",
        "norm_out.linear",
        "proj_out",
    }


def test_report_is_written_and_finite(calibrated_run, tiny_config):
    r = json.loads((calibrated_run / "calibrate" / REPORT_FILE).read_text())
    assert r["steps"] == 3 and len(r["buckets"]) == 4
    assert sum(b["calls"] for b in r["buckets"]) == 3  # 2 held-out prompts in one batch x 3 steps
    numbers = [r["overall_mean_error"], r["mean_psnr_db"], r["mean_ssim"]]
    numbers += [b[k] for b in r["buckets"] for k in ("mean", "max") if b["calls"]]
    numbers += [i[k] for i in r["images"] for k in ("psnr_db", "ssim")]
    assert all(isinstance(x, float) and math.isfinite(x) for x in numbers), numbers
    # FP8 E4M3 has a 3-bit mantissa: per-layer errors are a few percent at most, and images stay close.
    assert 0 < r["overall_mean_error"] < 0.05
    assert r["mean_psnr_db"] > 25 and 0.9 < r["mean_ssim"] <= 1.0
    assert [i["prompt"] for i in r["images"]] == read_prompts(tiny_config.calibrate.heldout_prompts, 2, "h")


def test_export_restores_the_calibration_on_a_fresh_transformer(calibrated_run, tiny_config):
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import load_file

    transformer = SD3Transformer2DModel.from_pretrained(calibrated_run / MODEL_SUBDIR / "transformer")
    path = calibrated_run / "calibrate" / CALIBRATION_FILE
    restore_calibration(transformer, tiny_config.calibrate, path)
    stored = load_file(path)
    enabled = {n: q for n, q in quantizers(transformer).items() if q.is_enabled}
    assert set(enabled) == set(stored)
    assert all(q.amax.item() == stored[n].item() for n, q in enabled.items())
    assert not any(n.startswith(("proj_out", "context_embedder", "time_text_embed")) for n in enabled)


def test_same_inputs_give_identical_amax(calibrated_run, tiny_config, tmp_path):
    run = _fresh_run(calibrated_run, tmp_path)
    calibrate(tiny_config, run, log=_quiet)
    first, second = (r / "calibrate" / CALIBRATION_FILE for r in (calibrated_run, run))
    assert sha256_file(first) == sha256_file(second)
    rec1, rec2 = (RunManifest(r).get(Stage.CALIBRATE).details for r in (calibrated_run, run))
    assert rec1.report == rec2.report


def test_prompts_file_is_recorded_wherever_calibrate_ran_from(
    calibrated_run, tiny_config, tmp_path, monkeypatch
):
    """Before: the record held the prompts file as the config named it, relative to the directory
    calibrate ran from; from any other directory it named no file, or another one."""
    run = _fresh_run(calibrated_run, tmp_path)
    prompts = tmp_path / "elsewhere" / "prompts.txt"
    prompts.parent.mkdir()
    shutil.copy(tiny_config.calibrate.prompts, prompts)
    cal = _small(tiny_config).calibrate.model_copy(update={"prompts": Path("elsewhere/prompts.txt")})
    monkeypatch.chdir(tmp_path)
    calibrate(tiny_config.model_copy(update={"calibrate": cal}), Path("run"), log=_quiet)
    monkeypatch.chdir(calibrated_run)
    recorded = RunManifest(run).get(Stage.CALIBRATE).details.prompts_file
    assert Path(recorded) == prompts and Path(recorded).is_file()


def test_up_to_date_calibration_is_reused(calibrated_run, tiny_config, copy_run):
    run = copy_run(calibrated_run)
    before = RunManifest(run).get(Stage.CALIBRATE)
    lines = []
    assert calibrate(tiny_config, run, log=lines.append) == before
    assert lines == [f"calibrate: {run / 'calibrate'} is up to date (--force redoes it)"]


def test_text_encoders_are_dropped_before_the_transformer_loads(
    calibrated_run, tiny_config, tmp_path, monkeypatch
):
    """The text encoders (~11 GB in BF16) and the transformer (16.3 GB for sd3.5-large) are never in
    memory together: the transformer is attached after the prompts are encoded."""
    import sd35trt.stages.calibrate as stage

    attach, seen = stage.attach_transformer, []

    def spy(pipe, *args, **kwargs):
        seen.append((pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3))
        attach(pipe, *args, **kwargs)

    monkeypatch.setattr(stage, "attach_transformer", spy)
    calibrate(_small(tiny_config), _fresh_run(calibrated_run, tmp_path), log=_quiet)
    assert seen == [(None, None, None, None)]


def test_zero_inputs_to_a_layer_fail_naming_it_and_write_nothing(
    calibrated_run, tiny_config, tmp_path, copy_run, monkeypatch
):
    import torch

    import sd35trt.stages.calibrate as stage

    attach = stage.attach_transformer

    def attach_with_dead_layer(pipe, *args, **kwargs):
        attach(pipe, *args, **kwargs)
        layer = pipe.transformer.transformer_blocks[1].ff.net[2]
        layer.register_forward_pre_hook(lambda module, inputs: (torch.zeros_like(inputs[0]),))

    monkeypatch.setattr(stage, "attach_transformer", attach_with_dead_layer)
    expected = r"transformer_blocks\.1\.ff\.net\.2\.input_quantizer: amax 0 \(the layer saw only zeros\)"

    run = _fresh_run(calibrated_run, tmp_path)
    with pytest.raises(CalibrationError, match=expected):
        calibrate(_small(tiny_config), run, log=_quiet)
    assert sorted(p.name for p in run.iterdir()) == [MODEL_SUBDIR]  # no calibrate/, no leftovers
    assert RunManifest(run).get(Stage.CALIBRATE) is None

    # Over an earlier good calibration: it stays, with its record.
    good = copy_run(calibrated_run)
    before = RunManifest(good).get(Stage.CALIBRATE)
    with pytest.raises(CalibrationError, match=expected):
        calibrate(_small(tiny_config), good, force=True, log=_quiet)
    assert RunManifest(good).verified(Stage.CALIBRATE) == before
