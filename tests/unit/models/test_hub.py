"""Models and LoRAs by Hugging Face repo id, offline, from a cache laid out as huggingface_hub does.

Every test runs with ``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE`` pointed at a temporary cache;
``huggingface_hub.scan_cache_dir`` reading the repos back shows the layout is the library's own.
"""

from __future__ import annotations

import shutil

import pytest

from sd35trt.artifacts.manifest import Stage
from sd35trt.artifacts.records import Fingerprint
from sd35trt.components import ModelDims
from sd35trt.config import config_from_dict
from sd35trt.errors import ModelError
from sd35trt.models.loading import resolve_model, weights_identity

REPO_ID = "sd35trt-test/tiny-sd35"
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


def _config(**model):
    return config_from_dict({"name": "hub", "model": {"source": "hub", "path": REPO_ID, **model}})


def test_repo_id_resolves_offline_to_the_cached_snapshot(cache, tiny_model_dir, hf_repo_writer, tmp_path):
    from huggingface_hub import scan_cache_dir

    snapshot = hf_repo_writer(cache, REPO_ID, tiny_model_dir, COMMIT_A)
    ((repo,),) = [scan_cache_dir(cache).repos]  # the library reads our layout back
    assert (repo.repo_id, [r.commit_hash for r in repo.revisions], set(repo.refs)) == (
        REPO_ID,
        [COMMIT_A],
        {"main"},
    )

    resolved = resolve_model(_config(), tmp_path / "run")
    assert resolved.directory == snapshot and resolved.hub.commit == COMMIT_A
    assert resolved.provenance()["hub"] == {"repo_id": REPO_ID, "revision": "main", "commit": COMMIT_A}
    assert ModelDims.from_model_dir(resolved.directory) == ModelDims.from_model_dir(tiny_model_dir)
    assert not (tmp_path / "run").exists()  # nothing is copied: the cache is used in place


def test_a_new_commit_makes_the_chain_stale_and_a_pinned_revision_does_not_move(
    cache, tiny_model_dir, hf_repo_writer
):
    hf_repo_writer(cache, REPO_ID, tiny_model_dir, COMMIT_A)
    before = Fingerprint.of(_config(), Stage.CALIBRATE, weights_identity(_config())).digest
    hf_repo_writer(cache, REPO_ID, tiny_model_dir, COMMIT_B)  # refs/main moves on
    after = Fingerprint.of(_config(), Stage.CALIBRATE, weights_identity(_config())).digest
    assert before != after
    pinned = _config(revision=COMMIT_A)
    assert resolve_model(pinned, cache).hub.commit == COMMIT_A


def test_missing_model_is_one_line_saying_how_to_download_it(cache, tmp_path):
    with pytest.raises(ModelError) as err:
        resolve_model(_config(), tmp_path / "run")
    msg = str(err.value)
    assert "\n" not in msg
    assert f"model.path: {REPO_ID} (revision main) is not in the Hugging Face cache ({cache})" in msg
    assert f"`hf download {REPO_ID} --include 'model_index.json' 'transformer/*'" in msg
    assert "model.allow_download: true or SD35TRT_ALLOW_DOWNLOAD=1" in msg


def test_download_allowed_but_offline_says_so(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("SD35TRT_ALLOW_DOWNLOAD", "1")
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE is set, so nothing can be downloaded"):
        resolve_model(_config(), tmp_path / "run")
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE is set"):
        resolve_model(_config(allow_download=True), tmp_path / "run")


def test_incomplete_snapshot_is_named(cache, tiny_model_dir, hf_repo_writer, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(tiny_model_dir, partial)
    (partial / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    hf_repo_writer(
        cache, REPO_ID, partial, COMMIT_A, extra_listed=("vae/diffusion_pytorch_model.safetensors",)
    )
    with pytest.raises(
        ModelError, match=rf"the cached snapshot of {REPO_ID} \(revision main\) is incomplete"
    ):
        resolve_model(_config(), tmp_path / "run")


def test_pickle_and_unrelated_files_are_never_asked_for(cache, tiny_model_dir, hf_repo_writer, tmp_path):
    # The listing has a pickle copy and a single-file checkpoint (as SD3.5 repos do) that were never
    # downloaded: resolution still succeeds, because sd35trt asks for the diffusers folders only.
    listed = (
        "transformer/diffusion_pytorch_model.bin",
        "sd3.5_large.safetensors",
        "text_encoders/t5xxl.safetensors",
    )
    snapshot = hf_repo_writer(cache, REPO_ID, tiny_model_dir, COMMIT_A, extra_listed=listed)
    assert resolve_model(_config(), tmp_path / "run").directory == snapshot


def test_hub_source_needs_a_repo_id():
    from sd35trt.errors import ConfigError

    with pytest.raises(ConfigError, match="source 'hub' needs 'path' as a Hugging Face repo id"):
        config_from_dict({"name": "x", "model": {"source": "hub", "path": "/models/sd35"}})
    with pytest.raises(ConfigError, match="'revision' is only used with source 'hub'"):
        config_from_dict({"name": "x", "model": {"revision": "main"}})


def test_lora_by_repo_id(cache, hf_repo_writer, tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    lora_dir = tmp_path / "lora"
    lora_dir.mkdir()
    save_file(
        {"transformer.x.lora_A.weight": np.zeros((2, 4), np.float32)},
        lora_dir / "pytorch_lora_weights.safetensors",
    )
    hf_repo_writer(cache, "someone/tiny-lora", lora_dir, COMMIT_B)
    cfg = config_from_dict({"name": "x", "model": {"loras": [{"path": "someone/tiny-lora", "scale": 0.5}]}})
    (lora,) = resolve_model(cfg, tmp_path / "run").loras
    assert lora.file.name == "pytorch_lora_weights.safetensors" and lora.scale == 0.5
    assert lora.to_json()["hub"] == {"repo_id": "someone/tiny-lora", "revision": "main", "commit": COMMIT_B}
    missing = config_from_dict({"name": "x", "model": {"loras": [{"path": "someone/other-lora"}]}})
    with pytest.raises(
        ModelError, match=r"model.loras\[0\].path: someone/other-lora \(revision main\) is not in"
    ):
        weights_identity(missing)


SHIPPED = {
    "sd3.5-medium": "stabilityai/stable-diffusion-3.5-medium",
    "sd3.5-large": "stabilityai/stable-diffusion-3.5-large",
    "sd3.5-large-turbo": "stabilityai/stable-diffusion-3.5-large-turbo",
}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_the_shipped_real_model_configs_resolve_from_the_hugging_face_cache(
    name, tiny_model_dir, hf_repo_writer, tmp_path, monkeypatch
):
    """configs/sd3.5-*.yaml name their model by Hub id and are read from the cache under HF_HOME
    (HF_HUB_CACHE unset, as on a user's machine), offline; a tiny pipeline stands in for the weights."""
    from pathlib import Path

    from sd35trt.config import ModelSource, load_config

    home = tmp_path / "hf-home"
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("SD35TRT_ALLOW_DOWNLOAD", raising=False)
    config = load_config(Path(__file__).parents[3] / "configs" / f"{name}.yaml")
    assert (config.model.source, str(config.model.path)) == (ModelSource.HUB, SHIPPED[name])
    with pytest.raises(
        ModelError, match=f"{SHIPPED[name]} \\(revision main\\) is not in the Hugging Face cache"
    ):
        resolve_model(config, tmp_path / "run")
    snapshot = hf_repo_writer(home / "hub", SHIPPED[name], tiny_model_dir, COMMIT_A)
    resolved = resolve_model(config, tmp_path / "run")
    assert resolved.directory == snapshot and resolved.hub.commit == COMMIT_A
