from pathlib import Path

import pytest
import yaml

from sd35trt.config import Config, Precision, Range, load_config
from sd35trt.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    # The runtime default size must be buildable: the validator checks it against the profile.
    assert cfg.build.height.contains(cfg.runtime.height)


def _write(tmp_path, data) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_misspelt_key_names_key_and_file(tmp_path):
    p = _write(tmp_path, {"name": "x", "calibrate": {"stpes": 4}})
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "calibrate.stpes" in msg and str(p) in msg and "unknown key" in msg


def test_wrong_type_names_key_and_value(tmp_path):
    p = _write(tmp_path, {"name": "x", "runtime": {"num_inference_steps": "many"}})
    with pytest.raises(ConfigError, match=r"runtime\.num_inference_steps.*'many'"):
        load_config(p)


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("calibrate", "num_prompts", True),
        ("calibrate", "guidance_scale", "4.5"),
        ("build", "optimization_level", 2.0),
    ],
)
def test_numbers_are_not_coerced_from_booleans_strings_or_floats(tmp_path, section, key, value):
    """faults.md #42: YAML ``true`` is not a count of 1, ``"4.5"`` is not a number."""
    p = _write(tmp_path, {"name": "x", section: {key: value}})
    with pytest.raises(ConfigError, match=rf"{section}\.{key}.*found {value!r}"):
        load_config(p)


def test_runtime_steps_is_read_as_num_inference_steps(tmp_path):
    # configs and engine manifests written before the rename say `steps`
    cfg = load_config(_write(tmp_path, {"name": "x", "runtime": {"steps": 6}}))
    assert cfg.runtime.num_inference_steps == 6
    assert "steps" not in cfg.runtime.model_dump()


def test_t5_fp16_refused(tmp_path):
    p = _write(tmp_path, {"name": "x", "export": {"precision": {"t5": "fp16"}}})
    with pytest.raises(ConfigError, match=r"export\.precision\.t5.*fp16"):
        load_config(p)


def test_runtime_size_outside_profile_refused(tmp_path):
    data = {
        "name": "x",
        "build": {"height": {"min": 512, "opt": 512, "max": 768}},
        "runtime": {"height": 1024},
    }
    with pytest.raises(
        ConfigError, match=r"runtime\.height = 1024 is outside build\.height range 512\.\.768"
    ):
        load_config(_write(tmp_path, data))


def test_size_not_multiple_of_16_refused(tmp_path):
    data = {"name": "x", "build": {"width": {"min": 500, "opt": 1024, "max": 1024}}}
    with pytest.raises(ConfigError, match=r"width\.min = 500 is not a multiple of 16") as err:
        load_config(_write(tmp_path, data))
    # the validator's own words, without pydantic's "Value error," and a second copy of the value
    assert "Value error" not in str(err.value) and "(found" not in str(err.value)


def test_range_order_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="min <= opt <= max"):
        Range(min=4, opt=2, max=8)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write_text(tmp_path, "name: [unclosed"))


def _write_text(tmp_path, text):
    p = tmp_path / "broken.yaml"
    p.write_text(text)
    return p


def test_local_source_needs_path(tmp_path):
    with pytest.raises(ConfigError, match=r"model.*needs 'path'"):
        load_config(_write(tmp_path, {"name": "x", "model": {"source": "local"}}))


def test_digest_tracks_only_named_sections():
    a = Config(name="a")
    b = a.model_copy(update={"runtime": a.runtime.model_copy(update={"num_inference_steps": 3})})
    assert a.digest("model", "calibrate") == b.digest("model", "calibrate")
    assert a.digest("runtime") != b.digest("runtime")
    assert a.export.precision.t5 is Precision.FP32
    slg = a.model_copy(update={"runtime": a.runtime.model_copy(update={"max_sequence_length": 128})})
    assert a.digest("runtime.num_inference_steps") == slg.digest("runtime.num_inference_steps")
    assert a.digest("runtime.max_sequence_length") != slg.digest("runtime.max_sequence_length")


def test_large_configs_run_block_35_in_fp32_and_out_of_fp8():
    for name in ("sd3.5-large", "sd3.5-large-turbo", "sd3.5-large-random"):
        cfg = load_config(REPO / "configs" / f"{name}.yaml")
        assert cfg.export.fp32_blocks == (35,) and 35 in cfg.calibrate.high_precision_blocks, name
        assert cfg.export.precision.transformer is Precision.BF16


@pytest.mark.parametrize(
    ("export", "calibrate", "message"),
    [
        (
            {"fp32_blocks": [3], "quantize": False},
            {},
            r"export\.fp32_blocks \[3\] has no effect with export\.precision\.transformer fp32",
        ),
        (
            {"fp32_blocks": [3, 5], "precision": {"transformer": "bf16"}},
            {"high_precision_blocks": [3]},
            r"export\.fp32_blocks \[5\] must also be in calibrate\.high_precision_blocks \(now \[3\]\)",
        ),
        ({"fp32_blocks": [-1], "precision": {"transformer": "bf16"}}, {}, r"export\.fp32_blocks.*\[-1\]"),
    ],
)
def test_fp32_blocks_that_cannot_work_are_refused(tmp_path, export, calibrate, message):
    data = {"name": "x", "export": export, "calibrate": calibrate}
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, data))
    ok = {**export, "precision": {"transformer": "bf16"}, "fp32_blocks": [3]}
    load_config(_write(tmp_path, {"name": "x", "export": ok, "calibrate": {"high_precision_blocks": [3]}}))


@pytest.mark.parametrize(
    "path", ["runtime.max_sequnce_length", "runtimes", "runtime.skip_layer_guidance.layer", "name.x"]
)
def test_digest_refuses_a_path_that_names_no_field(path):
    """Issue 22.5: a misspelt path used to hash None, so a real change went unnoticed."""
    with pytest.raises(ValueError, match=r"is not a config field"):
        Config(name="a").digest(path)


def test_a_path_below_an_unset_section_is_none_not_an_error():
    assert Config(name="a").values("runtime.skip_layer_guidance.layers") == {
        "runtime.skip_layer_guidance.layers": None
    }


def test_cache_settings_default_off_refuse_a_skipped_first_block_and_stale_the_export():
    from sd35trt.artifacts.records import Stage
    from sd35trt.config import CacheMethod, config_from_dict

    base = {"name": "t", "runtime": {"skip_layer_guidance": {"layers": [0, 1]}}}
    assert config_from_dict(base).runtime.cache is None
    with_cache = {"name": "t", "runtime": {"cache": {"method": "first_block", "threshold": 0.1}}}
    cfg = config_from_dict(with_cache)
    assert (cfg.runtime.cache.method, cfg.runtime.cache.threshold) == (CacheMethod.FIRST_BLOCK, 0.1)
    plain = config_from_dict({"name": "t"})
    sections = Stage.EXPORT.config_sections
    assert cfg.digest(*sections) != plain.digest(*sections)  # the transformer is exported as two parts
    assert cfg.digest(*Stage.CALIBRATE.config_sections) == plain.digest(*Stage.CALIBRATE.config_sections)
    bad = {"name": "t", "runtime": {**base["runtime"], "cache": {"threshold": 0.1}}}
    with pytest.raises(ConfigError, match=r"includes block 0, which runtime.cache compares"):
        config_from_dict(bad)
    with pytest.raises(ConfigError, match=r"runtime\.cache\.threshold"):
        config_from_dict({"name": "t", "runtime": {"cache": {"threshold": -1}}})
