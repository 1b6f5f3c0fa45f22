"""sd35trt.models.quantize: ModelOpt configs built fresh, what gets quantized, amax checks, save/restore."""

import copy
import fnmatch

import pytest

from sd35trt.config import Architecture, CalibrateSettings
from sd35trt.errors import CalibrationError, ConfigError
from sd35trt.models.quantize import (
    QuantizerKind,
    quant_config,
    quantize,
    quantizers,
    restore_calibration,
    save_calibration,
)

DEFAULT_EXCLUDE = CalibrateSettings().exclude


def _entries(cfg, name):
    return [e for e in cfg["quant_cfg"] if e["quantizer_name"] == name]


def test_config_disables_exclusions_and_high_precision_blocks_after_enabling():
    cfg = quant_config(CalibrateSettings(high_precision_blocks=(35,)), num_layers=38)
    names = [e["quantizer_name"] for e in cfg["quant_cfg"]]
    assert cfg["algorithm"] == "max"
    assert names[0] == "*" and cfg["quant_cfg"][0]["enable"] is False
    for kind in ("*weight_quantizer", "*input_quantizer"):
        (entry,) = _entries(cfg, kind)
        assert entry["parent_class"] == "nn.Linear"
        assert tuple(entry["cfg"]["num_bits"]) == (4, 3) and entry["cfg"]["axis"] is None
    last_enable = max(i for i, e in enumerate(cfg["quant_cfg"]) if "cfg" in e)
    for pattern in (*DEFAULT_EXCLUDE, "transformer_blocks.35"):
        (entry,) = _entries(cfg, f"{pattern}.*")
        assert entry == {"quantizer_name": f"{pattern}.*", "enable": False}
        assert names.index(entry["quantizer_name"]) > last_enable  # later entries win
    # Block 35's pattern must not catch block 3 or 350-style names.
    assert not fnmatch.fnmatch("transformer_blocks.3.attn.to_q.input_quantizer", "transformer_blocks.35.*")
    assert not any("bmm" in n or "softmax" in n for n in names)


def test_configs_are_fresh_and_modelopt_globals_untouched():
    import modelopt.torch.quantization as mtq

    before = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
    a = quant_config(CalibrateSettings(), num_layers=3)
    a["quant_cfg"][1]["cfg"]["num_bits"] = 8
    a["quant_cfg"].clear()
    b = quant_config(CalibrateSettings(), num_layers=3)
    assert tuple(b["quant_cfg"][1]["cfg"]["num_bits"]) == (4, 3)
    assert before == mtq.FP8_DEFAULT_CFG


def test_high_precision_block_out_of_range_is_refused():
    with pytest.raises(
        ConfigError, match=r"high_precision_blocks has \[3\], the transformer has 3 blocks \(0\.\.2\)"
    ):
        quant_config(CalibrateSettings(high_precision_blocks=(0, 3)), num_layers=3)


def test_fp8_attention_needs_head_dim_multiple_of_16():
    s = CalibrateSettings(fp8_attention=True)
    with pytest.raises(ConfigError, match=r"multiple of 16, this transformer's is 8"):
        quant_config(s, num_layers=3, head_dim=8)
    cfg = quant_config(s, num_layers=3, head_dim=64)
    for name in ("q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer", "softmax_quantizer"):
        assert len(_entries(cfg, f"*.{name}")) == 1
    # Head dim 8 is fine while FP8 attention is off.
    quant_config(CalibrateSettings(), num_layers=3, head_dim=8)


def test_quantizer_kind_from_name():
    assert QuantizerKind.of("a.to_q.weight_quantizer") is QuantizerKind.WEIGHT
    assert QuantizerKind.of("a.to_q.input_quantizer") is QuantizerKind.INPUT
    assert QuantizerKind.of("a.attn.k_bmm_quantizer") is QuantizerKind.ATTENTION
    assert QuantizerKind.of("a.attn.softmax_quantizer") is QuantizerKind.ATTENTION
    assert QuantizerKind.of("a.attn.bmm2_output_quantizer") is QuantizerKind.OUTPUT


# --- on the tiny transformer (3 blocks, head dim 16) -------------------------------------------


def _transformer(num_layers=None):
    import torch
    from diffusers import SD3Transformer2DModel

    from sd35trt.models.tiny import architecture_config

    kwargs = dict(architecture_config(Architecture.TINY).transformer)
    if num_layers is not None:
        kwargs.update(num_layers=num_layers, dual_attention_layers=())
    torch.manual_seed(0)
    return SD3Transformer2DModel(**kwargs).eval()


def _inputs(seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(2, 16, 16, 16, generator=g),  # [B, C, h, w]
        "encoder_hidden_states": torch.randn(2, 20, 96, generator=g),  # [B, L, joint_attention_dim]
        "pooled_projections": torch.randn(2, 80, generator=g),  # [B, pooled_projection_dim]
        "timestep": torch.tensor([700.0, 300.0]),
    }


def _loop(model):
    import torch

    with torch.no_grad():
        for seed in range(2):
            model(**_inputs(seed))


def _forward(model):
    import torch

    with torch.no_grad():
        return model(**_inputs(7)).sample


@pytest.fixture
def quantized():
    settings = CalibrateSettings(fp8_attention=True, high_precision_blocks=(1,))
    model = _transformer()
    return model, settings, quantize(model, settings, _loop)


def test_quantizers_only_where_expected(quantized):
    from torch import nn

    model, _, summary = quantized
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        kept = name.startswith("transformer_blocks.1.") or any(
            fnmatch.fnmatch(name, p) for p in DEFAULT_EXCLUDE
        )
        for q in (module.weight_quantizer, module.input_quantizer):
            assert q.is_enabled is not kept, name
            if not kept:
                assert q.num_bits == (4, 3) and q.amax.item() > 0
    for block in (0, 2):
        attn = model.transformer_blocks[block].attn
        assert attn.q_bmm_quantizer.is_enabled and attn.q_bmm_quantizer.amax.item() > 0
        assert attn.softmax_quantizer.amax.item() == 1.0
    assert not model.transformer_blocks[1].attn.q_bmm_quantizer.is_enabled
    assert not model.pos_embed.proj.weight_quantizer.is_enabled  # a Conv2d: not a Linear layer
    # 2 blocks x 2 attention modules (block 0 has dual attention, block 2 is the last) x 4.
    assert summary.enabled[QuantizerKind.ATTENTION] == 12
    enabled = sum(q.is_enabled for q in quantizers(model).values())
    assert sum(summary.enabled.values()) == enabled
    assert "proj_out" in summary.high_precision_linears


def test_quantize_leaves_modelopt_globals_untouched():
    import modelopt.torch.quantization as mtq

    before = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
    quantize(_transformer(), CalibrateSettings(), _loop)
    assert before == mtq.FP8_DEFAULT_CFG


def test_save_restore_roundtrip_gives_the_same_fake_quant_model(quantized, tmp_path):
    import torch

    model, settings, _ = quantized
    path = tmp_path / "amax.safetensors"
    save_calibration(model, path)
    fresh = _transformer()
    restore_calibration(fresh, settings, path)
    assert torch.equal(_forward(fresh), _forward(model))
    # The restored model really is quantized: it differs from the plain one.
    assert not torch.equal(_forward(fresh), _forward(_transformer()))


def test_restore_refuses_another_model_or_other_settings(quantized, tmp_path):
    model, settings, _ = quantized
    path = tmp_path / "amax.safetensors"
    save_calibration(model, path)
    with pytest.raises(
        CalibrationError, match=r"does not match this transformer: 0 .*missing.*unknown to the model"
    ):
        restore_calibration(
            _transformer(num_layers=2), settings.model_copy(update={"high_precision_blocks": (1,)}), path
        )
    with pytest.raises(CalibrationError, match=r"other quantization settings: \d+ \(transformer_blocks\.1\."):
        restore_calibration(_transformer(), settings.model_copy(update={"high_precision_blocks": ()}), path)
    with pytest.raises(CalibrationError, match=r"does not exist"):
        restore_calibration(_transformer(), settings, tmp_path / "nope.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CalibrationError, match=r"not readable safetensors"):
        restore_calibration(_transformer(), settings, tmp_path / "bad.safetensors")


def test_all_zero_weights_give_amax_error_naming_the_quantizer():
    import torch

    model = _transformer()
    with torch.no_grad():
        model.transformer_blocks[0].ff.net[2].weight.zero_()
    with pytest.raises(
        CalibrationError, match=r"transformer_blocks\.0\.ff\.net\.2\.weight_quantizer: amax 0 "
    ):
        quantize(model, CalibrateSettings(), _loop)


def test_nan_input_names_the_quantizer():
    import torch

    model = _transformer()
    layer = model.transformer_blocks[2].ff.net[2]
    layer.register_forward_pre_hook(lambda m, args: (torch.full_like(args[0], float("nan")),))
    with pytest.raises(
        CalibrationError, match=r"transformer_blocks\.2\.ff\.net\.2\.input_quantizer saw non-finite"
    ):
        quantize(model, CalibrateSettings(), _loop)


def test_exclude_pattern_matching_nothing_is_refused():
    with pytest.raises(ConfigError, match=r"exclude pattern 'proj_outt\*' matches no transformer module"):
        quantize(_transformer(), CalibrateSettings(exclude=("proj_outt*",)), _loop)
