"""Calibration inputs and report maths that need no model: prompt files, sigma buckets."""

import pytest

from sd35trt.errors import ConfigError
from sd35trt.models.reference import encode_batches
from sd35trt.stages.calibrate import calibrate, prompt_set_sha256, read_prompts
from sd35trt.stages.calibration_quality import bucketize


def test_prompts_skip_blanks_and_comments(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# header\nfirst prompt\n\n   \n  second prompt  \n# note\nthird\n")
    assert read_prompts(f, 2, "prompts") == ["first prompt", "second prompt"]
    assert read_prompts(f, 3, "prompts") == ["first prompt", "second prompt", "third"]
    with pytest.raises(ConfigError, match=r"calibrate\.prompts: .*p\.txt has 3 prompts, 4 are needed"):
        read_prompts(f, 4, "prompts")
    with pytest.raises(ConfigError, match=r"heldout_prompts: prompt file .*nope\.txt does not exist"):
        read_prompts(tmp_path / "nope.txt", 1, "heldout_prompts")


def test_prompt_set_hash_depends_on_content_and_order():
    assert prompt_set_sha256(["a", "b"]) != prompt_set_sha256(["b", "a"])
    assert prompt_set_sha256(["a", "b"]) != prompt_set_sha256(["a b"])


def test_heldout_prompts_overlapping_calibration_are_refused(tiny_config, tmp_path):
    cal = tiny_config.calibrate.model_copy(update={"heldout_prompts": tiny_config.calibrate.prompts})
    config = tiny_config.model_copy(update={"calibrate": cal})
    with pytest.raises(ConfigError, match=r"heldout_prompts shares 2 prompts with calibrate\.prompts"):
        calibrate(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_sigma_buckets():
    records = [(1.0, 0.1), (0.8, 0.3), (0.5, 0.2), (0.0, 0.05), (0.1, 0.15)]
    b = bucketize(records)
    assert [(x.low, x.high) for x in b] == [(0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)]
    assert [x.calls for x in b] == [2, 1, 0, 2]
    assert b[0].mean == pytest.approx(0.1) and b[0].max == 0.15
    assert b[2].mean is None and b[2].max is None
    assert b[3].mean == pytest.approx(0.2) and b[3].max == 0.3


class _RecordingPipe:
    """Stands in for StableDiffusion3Pipeline.encode_prompt, recording what it is asked."""

    def __init__(self):
        self.calls = []

    def encode_prompt(self, **kwargs):
        self.calls.append(kwargs)
        return "embeds", "negative", "pooled", "negative_pooled"


@pytest.mark.parametrize(("guidance_scale", "cfg"), [(4.5, True), (1.0, False)])
def test_prompts_are_encoded_with_the_runtime_negative_prompt_and_length(guidance_scale, cfg):
    pipe = _RecordingPipe()
    batches = encode_batches(
        pipe, ["a", "b", "c"], 2, 7, guidance_scale, "cpu", negative_prompt="blurry", max_sequence_length=77
    )
    assert [b.prompts for b in batches] == [("a", "b"), ("c",)] and [b.seed for b in batches] == [7, 8]
    assert [c["negative_prompt"] for c in pipe.calls] == [["blurry", "blurry"], ["blurry"]]
    assert {c["max_sequence_length"] for c in pipe.calls} == {77}
    assert {c["do_classifier_free_guidance"] for c in pipe.calls} == {cfg}


def test_calibrate_tables_say_what_they_measure():
    """The two tables calibrate prints carry a title saying what their numbers are."""
    from sd35trt.artifacts.records import QuantizerCounts
    from sd35trt.models.quantize import QuantizerKind, quantizer_table
    from sd35trt.stages.calibration_quality import BucketError, CalibrationReport, ImageScore

    counts = QuantizerCounts(enabled={QuantizerKind.WEIGHT: 4}, disabled={}, high_precision_linears=())
    quantizers = quantizer_table(counts)
    assert quantizers.splitlines()[0].startswith("FP8 quantizers in the transformer")
    report = CalibrationReport(
        steps=4,
        buckets=(BucketError(0.5, 1.0, 2, 0.01, 0.02),),
        images=(ImageScore("a cat", 0, 40.0, 0.99),),
        overall_mean_error=0.01,
    ).table()
    assert "relative error ||fp8 - ref|| / ||ref||" in report.splitlines()[0]
    assert "held-out prompts" in report.splitlines()[0]
    assert report.splitlines()[-1].startswith("final images (1, FP8 vs unquantized pipeline, same seed)")
