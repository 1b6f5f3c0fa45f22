"""Config checked against the model before any stage runs (faults.md case 28)."""

import pytest

from sd35trt.artifacts.manifest import Stage
from sd35trt.config import Architecture, ModelSource, config_from_dict
from sd35trt.errors import ConfigError
from sd35trt.models.tiny import model_dims
from sd35trt.stages.check import check_config, config_problems, scheduler_problems

TINY = model_dims(Architecture.TINY)  # max image size 512 (pos_embed_max_size 32 x 16), 3 blocks


def _config(**sections):
    base = {
        "name": "t",
        "build": {
            "height": {"min": 64, "opt": 128, "max": 256},
            "width": {"min": 64, "opt": 128, "max": 256},
        },
        "calibrate": {"height": 128, "width": 128},
        "runtime": {"height": 128, "width": 128, "skip_layer_guidance": {"layers": [1]}},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return config_from_dict(base)


def test_a_fitting_config_has_no_problem():
    assert config_problems(_config(), TINY) == []
    check_config(_config(), TINY)


def test_every_problem_is_listed_before_the_first_stage():
    """faults.md 28: build.height.max beyond the positional embedding was refused only at export,
    after calibration; now calibrate refuses it, with every other problem, before anything runs."""
    cfg = _config(
        build={"height": {"min": 64, "opt": 128, "max": 1024}, "width": {"min": 64, "opt": 128, "max": 544}},
        calibrate={"height": 640, "high_precision_blocks": [7]},
        runtime={"skip_layer_guidance": {"layers": [2]}},
    )
    with pytest.raises(ConfigError) as err:
        check_config(cfg, TINY, Stage.CALIBRATE)
    message = str(err.value)
    assert "before `sd35trt calibrate` started" in message and "\n" not in message
    for text in (
        "build.height.max = 1024 exceeds what the positional embedding covers (512",
        "build.width.max = 544 exceeds",
        "calibrate.height = 640 exceeds what the positional embedding covers",
        "calibrate.high_precision_blocks has [7], the transformer has 3 blocks",
        "runtime.skip_layer_guidance.layers has [2]; this transformer has 3 blocks",
    ):
        assert text in message, text
    assert "(5 problems" in message


def test_later_stages_check_only_what_is_still_ahead():
    cfg = _config(calibrate={"height": 640}, build={"height": {"min": 64, "opt": 128, "max": 1024}})
    at_export = config_problems(cfg, TINY, Stage.EXPORT)
    assert len(at_export) == 1 and at_export[0].startswith("build.height.max = 1024")
    assert config_problems(cfg, TINY, Stage.BUILD) == at_export
    # Calibration problems do not matter when nothing is quantized (calibrate does not run).
    fp32 = _config(calibrate={"height": 640}, export={"quantize": False})
    assert config_problems(fp32, TINY, Stage.CALIBRATE) == []


def test_fp8_attention_with_a_float32_transformer_is_refused_when_the_config_loads():
    """Knowable from the config alone: refused by config validation, naming both keys."""
    with pytest.raises(
        ConfigError, match=r"calibrate\.fp8_attention needs export\.precision\.transformer fp16"
    ):
        _config(calibrate={"fp8_attention": True})
    _config(calibrate={"fp8_attention": True}, export={"precision": {"transformer": "bf16"}})
    _config(calibrate={"fp8_attention": True}, export={"quantize": False})


def test_a_scheduler_the_runtime_cannot_honour_is_refused_before_calibrate(
    tiny_config, tiny_model_dir, tmp_path
):
    """faults.md #39: ``use_dynamic_shifting: true`` was refused only by ``run``, after calibrate,
    export and build had succeeded (hours at full size)."""
    import json
    import shutil

    from sd35trt.stages.calibrate import calibrate

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    scheduler = model / "scheduler" / "scheduler_config.json"
    data = json.loads(scheduler.read_text())
    assert scheduler_problems(model) == []
    scheduler.write_text(json.dumps(data | {"use_dynamic_shifting": True}))
    config = tiny_config.model_copy(
        update={"model": tiny_config.model.model_copy(update={"source": ModelSource.LOCAL, "path": model})}
    )
    with pytest.raises(ConfigError) as err:
        calibrate(config, tmp_path / "run")
    message = str(err.value)
    assert "before `sd35trt calibrate` started" in message and "\n" not in message
    assert "scheduler_config.json: use_dynamic_shifting = true is not supported" in message
    assert not (tmp_path / "run" / "calibrate").exists()


def test_controlnet_and_the_first_block_cache_are_refused_together_in_one_line():
    """The ControlNet's residuals feed the whole transformer engine; runtime.cache splits it in two."""
    both = _config(model={"controlnet": {"type": "canny"}}, runtime={"cache": {"threshold": 0.1}})
    problems = config_problems(both, TINY, Stage.BUILD)
    assert len(problems) == 1 and "\n" not in problems[0]
    assert "model.controlnet" in problems[0] and "runtime.cache" in problems[0]
    with pytest.raises(ConfigError, match=r"model\.controlnet and runtime\.cache"):
        check_config(both, TINY, Stage.EXPORT)
    assert config_problems(_config(model={"controlnet": {"type": "canny"}}), TINY) == []
    assert config_problems(_config(runtime={"cache": {"threshold": 0.1}}), TINY) == []


def test_controlnets_of_another_layout_are_refused_by_the_config_check_before_export(
    tiny_config, tiny_model_dir, tmp_path
):
    from sd35trt.models.tiny import tiny_controlnet

    large = tmp_path / "large-layout"
    tiny_controlnet(own_pos_embed=False).save_pretrained(large)
    two = _config(model={"controlnet": [{"type": "canny"}, {"type": "blur", "path": str(large)}]})
    problems = config_problems(two, TINY, Stage.EXPORT, tiny_model_dir)
    assert len(problems) == 1 and problems[0].startswith(f"model.controlnet[1].path {large}: text input")
    assert config_problems(two, TINY, Stage.BUILD, tiny_model_dir) == []  # exported already
    with pytest.raises(ConfigError, match=r"model\.controlnet\[1\]\.path"):
        check_config(two, TINY, Stage.CALIBRATE, tiny_model_dir)
