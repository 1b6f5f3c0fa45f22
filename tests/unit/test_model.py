import shutil

import pytest

from sd35trt.errors import ModelError
from sd35trt.model import check_weights


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
    assert len(check_weights(tiny_model_dir)) == 5
