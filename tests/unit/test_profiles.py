"""Optimization profiles from the config: static, dynamic, CFG doubling, refusals, TensorRT glue."""

import pytest

from sd35trt.backends.tensorrt_build import add_profile
from sd35trt.components import Component, ModelDims, ShapeRange
from sd35trt.config import Config, config_from_dict
from sd35trt.errors import BuildError, ConfigError
from sd35trt.stages.build import check_inputs_match, engine_profile

# SD3.5-medium as published (pos_embed_max_size 384 covers up to 384 * 2 * 8 = 6144 px).
MEDIUM = ModelDims(
    clip_l_hidden=768,
    clip_l_projection=768,
    clip_g_hidden=1280,
    clip_g_projection=1280,
    t5_hidden=4096,
    latent_channels=16,
    patch_size=2,
    num_layers=24,
    head_dim=64,
    num_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=2048,
    pos_embed_max_size=384,
    vae_scale_factor=8,
    vae_scaling_factor=1.5305,
    vae_shift_factor=0.0609,
)
LARGE = ModelDims(**{**MEDIUM.to_json(), "num_layers": 38, "num_heads": 38, "pos_embed_max_size": 192})


def _config(build: dict, runtime: dict | None = None) -> Config:
    return config_from_dict({"name": "t", "build": build, "runtime": runtime or {}}, "test.yaml")


def _static(v: int) -> dict:
    return {"min": v, "opt": v, "max": v}


def test_static_profile():
    cfg = _config(
        {"batch": _static(1), "height": _static(1024), "width": _static(1024)}, {"guidance_scale": 4.5}
    )
    tr = engine_profile(cfg, MEDIUM, Component.TRANSFORMER)
    # CFG runs [negative, positive] as one batch of 2; guidance can be switched off, so min stays 1.
    assert tr["hidden_states"] == ShapeRange((1, 16, 128, 128), (2, 16, 128, 128), (2, 16, 128, 128))
    assert tr["encoder_hidden_states"] == ShapeRange((1, 333, 4096), (2, 333, 4096), (2, 333, 4096))
    assert tr["pooled_projections"] == ShapeRange((1, 2048), (2, 2048), (2, 2048))
    assert tr["timestep"] == ShapeRange((1,), (2,), (2,))
    vae = engine_profile(cfg, MEDIUM, Component.VAE_DECODER)
    assert vae == {"latent": ShapeRange((1, 16, 128, 128), (1, 16, 128, 128), (1, 16, 128, 128))}
    assert engine_profile(cfg, MEDIUM, Component.CLIP_G)["input_ids"] == ShapeRange((1, 77), (2, 77), (2, 77))
    assert engine_profile(cfg, MEDIUM, Component.T5)["input_ids"] == ShapeRange((1, 256), (2, 256), (2, 256))


def test_dynamic_profile_converts_pixels_to_latents():
    cfg = _config(
        {
            "batch": {"min": 1, "opt": 2, "max": 4},
            "height": {"min": 512, "opt": 1024, "max": 1536},
            "width": {"min": 768, "opt": 1024, "max": 1280},
        },
        {"max_sequence_length": 128},
    )
    vae = engine_profile(cfg, MEDIUM, Component.VAE_DECODER)["latent"]
    assert vae == ShapeRange((1, 16, 64, 96), (2, 16, 128, 128), (4, 16, 192, 160))
    tr = engine_profile(cfg, MEDIUM, Component.TRANSFORMER)
    assert tr["hidden_states"] == ShapeRange((1, 16, 64, 96), (4, 16, 128, 128), (8, 16, 192, 160))
    # 77 CLIP tokens + the T5 sequence length.
    assert tr["encoder_hidden_states"].max == (8, 77 + 128, 4096)
    assert engine_profile(cfg, MEDIUM, Component.T5)["input_ids"].max == (8, 128)


@pytest.mark.parametrize(
    ("guidance", "opt"),
    [(4.5, 4), (1.0, 2), (0.0, 2)],  # CFG only above 1, as in diffusers (turbo runs at 0)
)
def test_cfg_doubles_the_encoders_and_transformer_batch_not_the_vae(guidance, opt):
    cfg = _config({"batch": {"min": 1, "opt": 2, "max": 3}}, {"guidance_scale": guidance})
    for component in (Component.CLIP_L, Component.CLIP_G, Component.T5, Component.TRANSFORMER):
        r = next(iter(engine_profile(cfg, MEDIUM, component).values()))
        assert (r.min[0], r.opt[0], r.max[0]) == (1, opt, 6), component
    vae = engine_profile(cfg, MEDIUM, Component.VAE_DECODER)["latent"]
    assert (vae.min[0], vae.opt[0], vae.max[0]) == (1, 2, 3)


def test_skip_layer_input_has_a_static_profile():
    cfg = _config({})
    tr = engine_profile(cfg, MEDIUM, Component.TRANSFORMER, skip_layers=3)
    assert tr["skip_layers"] == ShapeRange((3,), (3,), (3,))
    assert "skip_layers" not in engine_profile(cfg, MEDIUM, Component.TRANSFORMER)


def test_size_not_multiple_of_16_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"test\.yaml: .*build.*height.min = 1000 is not a multiple of 16"):
        _config({"height": {"min": 1000, "opt": 1024, "max": 1536}})


def test_unordered_range_is_refused():
    with pytest.raises(ConfigError, match=r"build\.width.*min <= opt <= max, got min=1024 opt=512 max=1536"):
        _config({"width": {"min": 1024, "opt": 512, "max": 1536}})


def test_runtime_size_outside_the_profile_is_refused():
    with pytest.raises(
        ConfigError, match=r"runtime\.height = 2048 is outside build\.height range 512\.\.1536"
    ):
        _config({}, {"height": 2048})


def test_size_beyond_the_positional_embedding_is_refused():
    cfg = _config({"height": {"min": 512, "opt": 1024, "max": 4096}}, {"height": 1024})
    engine_profile(cfg, MEDIUM, Component.TRANSFORMER)  # medium covers 6144 px
    with pytest.raises(
        ConfigError, match=r"build\.height\.max = 4096 exceeds .*\(3072 = pos_embed_max_size 192"
    ):
        engine_profile(cfg, LARGE, Component.TRANSFORMER)


def test_size_must_be_a_multiple_of_the_models_own_multiple():
    patch4 = ModelDims(**{**MEDIUM.to_json(), "patch_size": 4})  # size multiple 8 * 4 = 32
    cfg = _config({"width": {"min": 528, "opt": 1024, "max": 1536}})
    engine_profile(cfg, MEDIUM, Component.VAE_DECODER)
    with pytest.raises(ConfigError, match=r"build\.width\.min = 528 is not a multiple of 32"):
        engine_profile(cfg, patch4, Component.VAE_DECODER)


def test_onnx_inputs_must_fit_the_profile():
    cfg = _config({})
    shapes = engine_profile(cfg, MEDIUM, Component.VAE_DECODER)
    check_inputs_match("onnx/vae.onnx", {"latent": ("batch", 16, "h", "w")}, shapes)
    with pytest.raises(BuildError, match=r"onnx/vae\.onnx has inputs \['z'\], the spec expects \['latent'\]"):
        check_inputs_match("onnx/vae.onnx", {"z": ("batch", 16, "h", "w")}, shapes)
    with pytest.raises(BuildError, match=r"input latent has rank 3, the spec expects 4"):
        check_inputs_match("onnx/vae.onnx", {"latent": ("batch", 16, "h")}, shapes)
    # An export with a fixed height cannot serve a dynamic height profile.
    with pytest.raises(BuildError, match=r"input latent axis 2 is fixed at 128, the profile needs 64\.\.192"):
        check_inputs_match("onnx/vae.onnx", {"latent": ("batch", 16, 128, "w")}, shapes)


class _FakeProfile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, lo, opt, hi):
        self.shapes[name] = (lo, opt, hi)


class _FakeBuilder:
    def create_optimization_profile(self):
        return _FakeProfile()


class _FakeConfig:
    def __init__(self, index):
        self.index, self.profiles = index, []

    def add_optimization_profile(self, p):
        self.profiles.append(p)
        return self.index


def test_tensorrt_profile_gets_one_set_shape_per_input():
    shapes = engine_profile(_config({}), MEDIUM, Component.TRANSFORMER)
    config = _FakeConfig(0)
    assert add_profile(_FakeBuilder(), config, shapes) == 0
    (p,) = config.profiles
    assert p.shapes == {name: (r.min, r.opt, r.max) for name, r in shapes.items()}
    assert p.shapes["hidden_states"] == ((1, 16, 64, 64), (2, 16, 128, 128), (4, 16, 192, 192))
    with pytest.raises(BuildError, match=r"TensorRT rejected the optimization profile \(hidden_states"):
        add_profile(_FakeBuilder(), _FakeConfig(-1), shapes)
