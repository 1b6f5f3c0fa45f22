"""Shared fixtures: the tiny model carried through the stages once per test session.

Stage fixtures chain on one run directory (calibrate -> export -> build). Tests that damage
artefacts must work on a copy (``copy_run``), never on the shared directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    has_trt = importlib.util.find_spec("tensorrt") is not None
    has_cuda = _has_cuda()
    has_rtx = importlib.util.find_spec("tensorrt_rtx") is not None
    skip_rtx = pytest.mark.skip(
        reason="needs tensorrt_rtx (pip install tensorrt_rtx_cu13; make setup installs it)"
    )
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_trt = pytest.mark.skip(
        reason="needs TensorRT and a CUDA GPU (run `make test-gpu` on such a machine)"
    )
    for item in items:
        if "tensorrt_rtx" in item.keywords and not has_rtx:
            item.add_marker(skip_rtx)
        if "tensorrt" in item.keywords and not (has_trt and has_cuda):
            item.add_marker(skip_trt)
        elif "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_config():
    """configs/tiny.yaml, trimmed so the whole suite stays fast (fewer calibration prompts)."""
    from sd35trt.config import load_config

    cfg = load_config(REPO / "configs" / "tiny.yaml")
    cal = cfg.calibrate.model_copy(
        update={
            "num_prompts": 4,
            "steps": 3,
            "prompts": REPO / cfg.calibrate.prompts,
            "heldout_prompts": REPO / cfg.calibrate.heldout_prompts,
        }
    )
    return cfg.model_copy(update={"calibrate": cal})


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_config, tmp_path_factory) -> Path:
    """The built-in tiny pipeline written once as a diffusers directory."""
    from sd35trt.models.loading import model_dir

    return model_dir(tiny_config, tmp_path_factory.mktemp("tiny-model-run"))


def _shared_run(tmp_path_factory, tiny_config, stages: int) -> Path:
    """The tiny run directory carried through the first ``stages`` stages, built once per test run.

    With pytest-xdist the workers share it: the first worker that needs a stage runs it under a
    file lock, the others find it fresh (the stages do nothing when their record is fresh).
    """
    from filelock import FileLock

    from sd35trt.config import Backend
    from sd35trt.stages.build import build
    from sd35trt.stages.calibrate import calibrate
    from sd35trt.stages.export import export

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # this run's directory, shared by its workers
    run_dir = base / "shared-run" / "tiny"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    steps = (
        lambda: calibrate(tiny_config, run_dir, log=lambda _line: None),
        lambda: export(tiny_config, run_dir, progress=lambda _line: None),
        lambda: build(tiny_config, run_dir, Backend.ONNXRUNTIME, progress=lambda _line: None),
    )
    with FileLock(str(run_dir.parent / "stages.lock")):
        for step in steps[:stages]:
            step()
    return run_dir


@pytest.fixture(scope="session")
def calibrated_run(tiny_config, tmp_path_factory) -> Path:
    """A run directory after ``calibrate`` (shared: copy it before damaging it)."""
    return _shared_run(tmp_path_factory, tiny_config, 1)


@pytest.fixture(scope="session")
def exported_run(tiny_config, tmp_path_factory) -> Path:
    """The same run directory after ``export``."""
    return _shared_run(tmp_path_factory, tiny_config, 2)


@pytest.fixture(scope="session")
def built_run(tiny_config, tmp_path_factory) -> Path:
    """The same run directory after ``build`` with the ONNX Runtime backend."""
    return _shared_run(tmp_path_factory, tiny_config, 3)


@pytest.fixture(scope="session")
def unquantized_run(tiny_config, tmp_path_factory):
    """A run directory with engines built from a non-quantized export (no calibration needed).

    Shared by the xdist workers like :func:`_shared_run`'s (run parity and image-to-image parity
    tests use it).
    """
    from filelock import FileLock

    from sd35trt.config import Backend
    from sd35trt.stages.build import build
    from sd35trt.stages.export import export

    config = tiny_config.model_copy(
        update={"export": tiny_config.export.model_copy(update={"quantize": False})}
    )
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    run_dir = base / "shared-run-unquantized" / "tiny"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(run_dir.parent / "stages.lock")):
        export(config, run_dir, progress=lambda _line: None)
        build(config, run_dir, Backend.ONNXRUNTIME, progress=lambda _line: None)
    return run_dir


@pytest.fixture(scope="session")
def reference_pipe(tiny_config, unquantized_run):
    """diffusers' StableDiffusion3Pipeline on the tiny weights, on the CPU in float32."""
    from sd35trt.models.loading import load_pipeline

    p = load_pipeline(tiny_config, unquantized_run, device="cpu")
    p.set_progress_bar_config(disable=True)
    return p


def write_hf_repo(
    cache: Path, repo_id: str, source: Path, commit: str, extra_listed: tuple[str, ...] = ()
) -> Path:
    """Lay ``source``'s files out in a Hugging Face hub cache as ``huggingface_hub`` downloads them.

    ``models--<ns>--<name>/blobs/<etag>`` holds each file once (etag: sha256 for LFS files such as
    ``.safetensors``, the git blob sha1 otherwise), ``snapshots/<commit>/<path>`` are relative
    symlinks to the blobs, ``refs/main`` names the commit, and ``trees/<commit>.json`` is the
    repo listing the library caches (``extra_listed``: files the listing has but the snapshot
    lacks, as after a download filtered by ``allow_patterns``).

    Returns:
        The snapshot folder.
    """
    from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache
    from huggingface_hub.file_download import repo_folder_name

    storage = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    snapshot = storage / "snapshots" / commit
    entries = {}
    for file in sorted(p for p in Path(source).rglob("*") if p.is_file()):
        rel = file.relative_to(source).as_posix()
        data = file.read_bytes()
        git_sha1 = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        lfs = file.suffix == ".safetensors"
        etag = hashlib.sha256(data).hexdigest() if lfs else git_sha1
        blob = storage / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        pointer = snapshot / rel
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.unlink(missing_ok=True)
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
        entries[rel] = TreeCacheEntry(
            size=len(data),
            blob_id=git_sha1,
            lfs_sha256=etag if lfs else None,
            lfs_size=len(data) if lfs else None,
        )
    for rel in extra_listed:
        entries[rel] = TreeCacheEntry(size=1, blob_id="0" * 40)
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / "main").write_text(commit)
    write_tree_cache(str(storage), commit, entries)
    return snapshot


@pytest.fixture(scope="session")
def hf_repo_writer():
    """:func:`write_hf_repo`, for tests that need models or LoRAs in a Hugging Face cache."""
    return write_hf_repo


def make_lora(
    model_dir: Path, out: Path, *, rank: int = 4, seed: int = 0, text_encoder: bool = False
) -> Path:
    """A LoRA for the tiny model made with peft, saved as diffusers saves SD3 LoRAs.

    Random ``lora_A`` and ``lora_B`` (peft's ``init_lora_weights=False``; a trained LoRA has a
    non-zero ``B`` too) on the transformer's attention projections, and with ``text_encoder`` on
    CLIP-L's q/v projections.

    Returns:
        ``out/pytorch_lora_weights.safetensors``.
    """
    import torch
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel.from_pretrained(model_dir, subfolder="transformer")
    transformer.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=rank,
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
            init_lora_weights=False,
        )
    )
    layers = {"transformer_lora_layers": get_peft_model_state_dict(transformer)}
    if text_encoder:
        from peft import get_peft_model
        from transformers import CLIPTextModelWithProjection

        clip = CLIPTextModelWithProjection.from_pretrained(model_dir, subfolder="text_encoder")
        wrapped = get_peft_model(
            clip, LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        )
        # transformers' own add_adapter needs a newer peft than exists; a PeftModel's keys carry its prefix.
        state = get_peft_model_state_dict(wrapped)
        layers["text_encoder_lora_layers"] = {
            k.removeprefix("base_model.model."): v for k, v in state.items()
        }
    StableDiffusion3Pipeline.save_lora_weights(out, **layers)
    return out / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="session")
def lora_maker():
    """:func:`make_lora`."""
    return make_lora


@pytest.fixture
def copy_run(tmp_path):
    """Copy a shared run directory so a test can damage it."""

    def _copy(run_dir: Path) -> Path:
        dst = tmp_path / run_dir.name
        shutil.copytree(run_dir, dst, symlinks=True)
        return dst

    return _copy


@pytest.fixture(scope="module")
def runtime(built_run):
    """The tiny run's engines loaded once per test module (the serve tests' servers share it)."""
    from sd35trt.runtime.pipeline import Sd35Runtime

    rt = Sd35Runtime.load(built_run / "engines")
    yield rt
    rt.close()
