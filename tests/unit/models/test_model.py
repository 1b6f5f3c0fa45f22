import shutil

import pytest

from sd35trt.errors import ModelError
from sd35trt.models.loading import check_weights


def test_pickle_weights_refused(tiny_model_dir, tmp_path):
    d = shutil.copytree(tiny_model_dir, tmp_path / "m")
    (d / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ModelError, match=r"vae/diffusion_pytorch_model\.bin is a pickle weight file"):
        check_weights(d)


def test_truncated_shard_named(tiny_model_dir, tmp_path):
    d = shutil.copytree(tiny_model_dir, tmp_path / "m")
    shard = d / "text_encoder" / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelError, match=r"text_encoder/model\.safetensors is truncated"):
        check_weights(d)
    shard.write_bytes(data[:5])
    with pytest.raises(ModelError, match=r"text_encoder/model\.safetensors is damaged or truncated"):
        check_weights(d)


def test_intact_model_passes(tiny_model_dir):
    assert len(check_weights(tiny_model_dir)) == 6  # five pipeline models and the tiny ControlNet


def test_component_table_names_real_classes_wrappers_and_pipeline_keywords():
    import importlib
    import inspect

    from diffusers import StableDiffusion3ControlNetPipeline

    from sd35trt.components import MODELS, Component
    from sd35trt.models import modules

    # the ControlNet pipeline's keywords: StableDiffusion3Pipeline's and ``controlnet``
    pipeline_keywords = set(inspect.signature(StableDiffusion3ControlNetPipeline.__init__).parameters)
    assert set(MODELS) == set(Component)
    for component, facts in MODELS.items():
        assert hasattr(importlib.import_module(facts.library.value), facts.class_name), component
        assert issubclass(getattr(modules, facts.wrapper), modules.nn.Module), component
        assert facts.subfolder in pipeline_keywords, component


def test_one_loader_gives_every_stage_the_same_models(tiny_model_dir):
    import torch

    from sd35trt.components import Component
    from sd35trt.models.loading import LoadPurpose, load_model, load_pipeline_dir
    from sd35trt.models.modules import ClipTextEncoder, Transformer, wrap

    run = load_model(tiny_model_dir, Component.CLIP_L, torch.float32)
    trace = load_model(tiny_model_dir, Component.CLIP_L, torch.float32, purpose=LoadPurpose.TRACE)
    # export traces eager attention (SDPA's export breaks 16-bit CLIP graphs); running keeps the default
    assert trace.config._attn_implementation == "eager" != run.config._attn_implementation
    assert not run.training and not any(p.requires_grad for p in run.parameters())
    half = load_model(tiny_model_dir, Component.TRANSFORMER, torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    pipe = load_pipeline_dir(tiny_model_dir, "cpu", torch.float32)
    for name, a in pipe.text_encoder.state_dict().items():
        assert torch.equal(a, run.state_dict()[name])
    assert isinstance(wrap(Component.CLIP_G, pipe.text_encoder_2), ClipTextEncoder)
    assert isinstance(wrap(Component.TRANSFORMER, half, slg_layers=(1,)), Transformer)


def test_loader_refuses_pickle_weights_of_its_component(tiny_model_dir, tmp_path):
    import torch

    from sd35trt.components import Component
    from sd35trt.models.loading import load_model

    d = shutil.copytree(tiny_model_dir, tmp_path / "m")
    (d / "text_encoder_3" / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ModelError, match=r"text_encoder_3/pytorch_model\.bin is a pickle weight file"):
        load_model(d, Component.T5, torch.float32)
    assert load_model(d, Component.CLIP_L, torch.float32) is not None  # other components are unaffected


def test_random_source_draws_the_same_weights_as_the_tiny_builder(tiny_model_dir):
    import torch

    from sd35trt.components import Component
    from sd35trt.config import ModelSettings, ModelSource
    from sd35trt.models.loading import load_model
    from sd35trt.models.tiny import build_components

    random = ModelSettings(source=ModelSource.RANDOM, seed=3)
    vae = load_model(tiny_model_dir, Component.VAE_DECODER, torch.float32, model=random)
    drawn = build_components(random.architecture, 3, only={"vae"})["vae"]
    assert all(torch.equal(v, drawn.state_dict()[n]) for n, v in vae.state_dict().items())
