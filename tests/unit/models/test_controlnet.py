"""Locating ``model.controlnet`` (model folder, local directory, Hub repo id) and the positional
embedding SD3.5-large's ControlNets borrow from the transformer."""

from __future__ import annotations

import pytest

from sd35trt.artifacts.manifest import Stage
from sd35trt.artifacts.records import Fingerprint
from sd35trt.config import Architecture, ControlType, config_from_dict
from sd35trt.errors import ConfigError, ModelError
from sd35trt.models.controlnet import ResolvedControlNet, check_paths, resolve_controlnets
from sd35trt.models.loading import load_controlnet, resolve_model, weights_identity

REPO_ID = "stabilityai/stable-diffusion-3.5-large-controlnet-canny"
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


@pytest.fixture(scope="module")
def large_layout(tmp_path_factory):
    """The tiny ControlNet in SD3.5-large's layout, saved as diffusers saves it."""
    from sd35trt.models.tiny import tiny_controlnet

    path = tmp_path_factory.mktemp("controlnet-large-layout")
    tiny_controlnet(own_pos_embed=False).save_pretrained(path)
    return path


def _config(**controlnet):
    return config_from_dict({"name": "cn", "model": {"controlnet": {"type": "canny", **controlnet}}})


def resolve_controlnet(model, model_dir):
    """The single configured ControlNet, located."""
    (net,) = resolve_controlnets(model, model_dir)
    return net


def _one_line_error(call, error=ModelError) -> str:
    with pytest.raises(error) as err:
        call()
    assert "\n" not in str(err.value)
    return str(err.value)


def test_default_is_the_model_folder_in_the_sd3_layout(tiny_model_dir):
    cn = resolve_controlnet(_config().model, tiny_model_dir)
    assert cn.directory == tiny_model_dir / "controlnet" and cn.hub is None
    assert (cn.layers, cn.takes_text, cn.own_pos_embed) == (2, True, True)
    assert resolve_controlnets(config_from_dict({"name": "x"}).model, tiny_model_dir) == ()


def test_local_directory_in_the_large_layout(tiny_model_dir, large_layout, tmp_path):
    config = _config(path=str(large_layout))
    cn = resolve_controlnet(config.model, tiny_model_dir)
    assert cn.directory == large_layout
    assert (cn.layers, cn.takes_text, cn.own_pos_embed) == (2, False, False)
    provenance = resolve_model(config, tmp_path / "run").provenance()
    assert provenance["controlnets"] == [{"type": "canny", "directory": str(large_layout), "hub": None}]


def test_repo_id_resolves_offline_and_its_commit_makes_the_chain_stale(
    cache, tiny_model_dir, large_layout, hf_repo_writer
):
    snapshot = hf_repo_writer(cache, REPO_ID, large_layout, COMMIT_A)
    config = _config(path=REPO_ID)
    cn = resolve_controlnet(config.model, tiny_model_dir)
    assert cn.directory == snapshot and cn.hub.commit == COMMIT_A and not cn.takes_text
    before = Fingerprint.of(config, Stage.EXPORT, weights_identity(config)).digest
    hf_repo_writer(cache, REPO_ID, large_layout, COMMIT_B)  # refs/main moves on
    assert weights_identity(config) == {"controlnet_commit": COMMIT_B}
    assert Fingerprint.of(config, Stage.EXPORT, weights_identity(config)).digest != before
    pinned = _config(path=REPO_ID, revision=COMMIT_A)
    assert resolve_controlnet(pinned.model, tiny_model_dir).hub.commit == COMMIT_A


def test_repo_id_not_cached_says_how_to_download_it(cache, tiny_model_dir):
    msg = _one_line_error(lambda: resolve_controlnet(_config(path=REPO_ID).model, tiny_model_dir))
    assert f"model.controlnet.path: {REPO_ID} (revision main) is not in the Hugging Face cache" in msg
    assert f"`hf download {REPO_ID} --include 'config.json' 'diffusion_pytorch_model*.safetensors'" in msg
    assert "model.allow_download: true or SD35TRT_ALLOW_DOWNLOAD=1" in msg


def test_bad_paths_are_one_line_naming_the_field(tiny_model_dir, large_layout, tmp_path):
    msg = _one_line_error(lambda: resolve_controlnet(_config(path="./nowhere").model, tiny_model_dir))
    assert msg.startswith("model.controlnet.path ./nowhere: no such directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    msg = _one_line_error(lambda: resolve_controlnet(_config(path=str(empty)).model, tiny_model_dir))
    assert msg == (
        f"model.controlnet.path {empty} has no config.json: it is not a diffusers SD3ControlNetModel "
        "directory (config.json and diffusion_pytorch_model*.safetensors)"
    )
    file = large_layout / "config.json"
    msg = _one_line_error(lambda: resolve_controlnet(_config(path=str(file)).model, tiny_model_dir))
    assert msg.startswith(f"model.controlnet.path {file} is a file; give a diffusers SD3ControlNetModel")
    assert msg.endswith(f"(the directory that holds it: {large_layout}), or a Hugging Face repo id")
    local_pinned = _config(path=str(large_layout), revision="main").model
    msg = _one_line_error(lambda: resolve_controlnet(local_pinned, tiny_model_dir))
    assert "model.controlnet.revision applies to Hugging Face repo ids only" in msg
    with pytest.raises(ConfigError, match="revision"):
        _config(revision="main")  # a revision needs a path


def test_path_faults_name_the_list_element(tiny_model_dir, tmp_path):
    """With several ControlNets the messages name ``model.controlnet[i]``, here and in the check."""
    config = _two({"type": "canny"}, {"type": "blur", "path": str(tmp_path)})
    for call in (
        lambda: resolve_controlnets(config.model, tiny_model_dir),
        lambda: check_paths(config.model),
    ):
        msg = _one_line_error(call)
        assert msg.startswith(f"model.controlnet[1].path {tmp_path} has no config.json")


BAD_PATHS = {
    "missing": lambda base: str(base / "nowhere"),
    "uncached-repo-id": lambda base: REPO_ID,
    "file": lambda base: str(base / "weights.safetensors"),
    "empty-directory": lambda base: str(base / "empty"),
}


@pytest.mark.parametrize("stage", ["calibrate", "export", "build"])
@pytest.mark.parametrize("kind", list(BAD_PATHS))
def test_a_path_naming_nothing_is_refused_before_the_run_directory_is_written(
    cache, tiny_config, tmp_path, stage, kind
):
    """faults.md #46: refused before the run directory, its lock file or the built-in model
    (``RUN_DIR/model/``) exist; an existing empty run directory stays empty."""
    from sd35trt.config import Backend, ControlNetSettings
    from sd35trt.stages.build import build
    from sd35trt.stages.calibrate import calibrate
    from sd35trt.stages.export import export

    (tmp_path / "weights.safetensors").write_bytes(b"not a directory")
    (tmp_path / "empty").mkdir()
    settings = ControlNetSettings(type=ControlType.CANNY, path=BAD_PATHS[kind](tmp_path))
    config = tiny_config.model_copy(
        update={"model": tiny_config.model.model_copy(update={"controlnet": settings})}
    )
    run = {
        "calibrate": lambda d: calibrate(config, d, log=lambda _line: None),
        "export": lambda d: export(config, d, progress=lambda _line: None),
        "build": lambda d: build(config, d, Backend.ONNXRUNTIME, progress=lambda _line: None),
    }[stage]
    new, existing = tmp_path / "new-run", tmp_path / "existing-run"
    existing.mkdir()
    for run_dir in (new, existing):
        msg = _one_line_error(lambda run_dir=run_dir: run(run_dir))
        assert msg.startswith("model.controlnet.path"), msg
    assert not new.exists() and list(existing.iterdir()) == []


def test_an_uncached_repo_id_is_left_to_the_stage_when_downloads_are_allowed(cache, tiny_model_dir):
    """The check only reads the cache: the download waits for the stage, which holds the lock."""
    allowed = config_from_dict(
        {"name": "cn", "model": {"allow_download": True, "controlnet": {"type": "canny", "path": REPO_ID}}}
    )
    assert check_paths(allowed.model) is None
    with pytest.raises(ModelError, match="is not in the Hugging Face cache"):
        check_paths(_config(path=REPO_ID).model)
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE is set"):  # what the stage then says here
        resolve_controlnets(allowed.model, tiny_model_dir)


def test_configs_without_a_path_keep_their_digest_keys():
    assert _config().model.model_dump(mode="json")["controlnet"] == {"type": "canny"}


def test_the_large_layout_borrows_the_transformers_positional_embedding(tiny_model_dir, large_layout):
    import torch

    from sd35trt.components import Component
    from sd35trt.models.loading import load_model

    config = _config(path=str(large_layout))
    net = load_controlnet(
        resolve_controlnet(config.model, tiny_model_dir), config.model, tiny_model_dir, torch.bfloat16
    )
    transformer = load_model(tiny_model_dir, Component.TRANSFORMER, torch.bfloat16)
    theirs = transformer.pos_embed.state_dict()
    assert set(net.pos_embed.state_dict()) == set(theirs) == {"proj.weight", "proj.bias", "pos_embed"}
    for name, value in net.pos_embed.state_dict().items():
        assert value.dtype == torch.bfloat16 and torch.equal(value, theirs[name]), name
    # the SD3 layout keeps its own
    model = _config().model
    own = load_controlnet(resolve_controlnet(model, tiny_model_dir), model, tiny_model_dir, torch.float32)
    assert not torch.equal(own.pos_embed.proj.weight, transformer.pos_embed.proj.weight.float())


def test_random_architectures_draw_the_transformers_positional_embedding_alone():
    import torch

    from sd35trt.models.controlnet import random_pos_embed
    from sd35trt.models.tiny import build_components

    whole = build_components(Architecture.TINY, seed=7, only={"transformer"})["transformer"].pos_embed
    alone = random_pos_embed(Architecture.TINY, seed=7)
    for name, value in whole.state_dict().items():
        assert torch.equal(value, alone.state_dict()[name]), name
    assert not torch.equal(random_pos_embed(Architecture.TINY, 8).proj.weight, whole.proj.weight)


def test_published_large_controlnet_shape_and_no_medium_one():
    import torch

    from sd35trt.models.tiny import controlnet_config, make_controlnet

    large = controlnet_config(Architecture.SD35_LARGE)
    assert (large["num_layers"], large["num_attention_heads"], large["joint_attention_dim"]) == (19, 38, None)
    assert large["use_pos_embed"] is False and large["force_zeros_for_pooled_projection"] is False
    with torch.device("meta"):
        net = make_controlnet(large)
    assert sum(p.numel() for p in net.parameters()) == 2_153_518_976
    assert controlnet_config(Architecture.SD35_MEDIUM) is None


def test_random_medium_has_no_controlnet_to_draw(tmp_path):
    import torch

    model = config_from_dict(
        {
            "name": "m",
            "model": {"source": "random", "architecture": "sd3.5-medium", "controlnet": {"type": "blur"}},
        }
    ).model
    net = ResolvedControlNet(ControlType.BLUR, tmp_path / "controlnet", {"num_layers": 19})
    msg = _one_line_error(lambda: load_controlnet(net, model, tmp_path, torch.float32))
    assert "sd3.5-medium has no published controlnet shape" in msg and "model.controlnet.path" in msg


def _two(first: dict, second: dict):
    return config_from_dict({"name": "cn2", "model": {"controlnet": [first, second]}})


def test_several_controlnets_resolve_in_order_with_their_types(tiny_model_dir, large_layout, tmp_path):
    from sd35trt.components import Component

    sd3_layout = tmp_path / "blur"
    from sd35trt.models.tiny import tiny_controlnet

    tiny_controlnet(seed=1).save_pretrained(sd3_layout)
    config = _two({"type": "canny"}, {"type": "blur", "path": str(sd3_layout)})
    nets = resolve_controlnets(config.model, tiny_model_dir)
    assert [(n.component, n.directory, n.key) for n in nets] == [
        (Component.CONTROLNET_CANNY, tiny_model_dir / "controlnet", "model.controlnet[0]"),
        (Component.CONTROLNET_BLUR, sd3_layout, "model.controlnet[1]"),
    ]
    provenance = resolve_model(config, tmp_path / "run").provenance()
    assert provenance["controlnets"] == [
        {"type": "canny"},
        {"type": "blur", "directory": str(sd3_layout), "hub": None},
    ]


def test_a_list_of_one_is_the_single_mapping_and_keeps_its_digest():
    from sd35trt.config import sha256_json

    single = _config().model
    listed = config_from_dict({"name": "cn", "model": {"controlnet": [{"type": "canny"}]}}).model
    assert listed.controlnet == single.controlnet and listed.controlnets == single.controlnets
    assert sha256_json(listed.model_dump(mode="json")) == sha256_json(single.model_dump(mode="json"))
    assert single.model_dump(mode="json")["controlnet"] == {"type": "canny"}  # no list in old dumps


def test_config_faults_name_the_list_element():
    with pytest.raises(
        ConfigError, match=r"model\.controlnet\[1\]\.type canny is also model\.controlnet\[0\]'s"
    ):
        _two({"type": "canny"}, {"type": "canny", "path": "./x"})
    with pytest.raises(ConfigError, match="empty list"):
        config_from_dict({"name": "cn", "model": {"controlnet": []}})
    # faults.md #43: two ControlNets of the same weights (both the model's controlnet/, or one path twice)
    with pytest.raises(
        ConfigError,
        match=r"model\.controlnet\[1\]\.path: the model's controlnet/ folder is also",
    ):
        _two({"type": "canny"}, {"type": "blur"})
    with pytest.raises(ConfigError, match=r"model\.controlnet\[1\]\.path: './x' is also"):
        _two({"type": "canny", "path": "./x"}, {"type": "blur", "path": "./x"})
    with pytest.raises(ConfigError, match="type"):
        _two({"type": "canny"}, {"type": "sketch"})


def test_controlnets_of_another_block_count_or_layout_are_refused(tiny_model_dir, large_layout, tmp_path):
    from sd35trt.models.tiny import controlnet_config, make_controlnet

    # the large layout: no text input, no positional embedding of its own
    msg = _one_line_error(
        lambda: resolve_controlnets(
            _two({"type": "canny"}, {"type": "blur", "path": str(large_layout)}).model, tiny_model_dir
        ),
        ConfigError,
    )
    assert (
        msg.startswith(f"model.controlnet[1].path {large_layout}: text input")
        and "model.controlnet[0]'s" in msg
    )
    deeper = tmp_path / "three-blocks"
    make_controlnet({**controlnet_config(Architecture.TINY), "num_layers": 3}).save_pretrained(deeper)
    config = _two({"type": "canny"}, {"type": "depth", "path": str(deeper)})
    msg = _one_line_error(lambda: resolve_controlnets(config.model, tiny_model_dir), ConfigError)
    assert msg == (
        f"model.controlnet[1].path {deeper}: block count (num_layers) is 3, model.controlnet[0]'s is 2; "
        "ControlNets exported together must share it"
    )
