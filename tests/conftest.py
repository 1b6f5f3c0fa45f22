"""Shared fixtures: the tiny model carried through the stages once per test session.

Stage fixtures chain on one run directory (calibrate -> export -> build). Tests that damage
artefacts must work on a copy (``copy_run``), never on the shared directory.
"""

from __future__ import annotations

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
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_trt = pytest.mark.skip(
        reason="needs TensorRT and a CUDA GPU (run `make test-gpu` on such a machine)"
    )
    for item in items:
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
    from sd35trt.model import model_dir

    return model_dir(tiny_config, tmp_path_factory.mktemp("tiny-model-run"))


def _shared_run(tmp_path_factory, tiny_config, stages: int) -> Path:
    """The tiny run directory carried through the first ``stages`` stages, built once per test run.

    With pytest-xdist the workers share it: the first worker that needs a stage runs it under a
    file lock, the others find it fresh (the stages do nothing when their record is fresh).
    """
    from filelock import FileLock

    from sd35trt.build import build
    from sd35trt.calibrate import calibrate
    from sd35trt.config import Backend
    from sd35trt.export import export

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


@pytest.fixture
def copy_run(tmp_path):
    """Copy a shared run directory so a test can damage it."""

    def _copy(run_dir: Path) -> Path:
        dst = tmp_path / run_dir.name
        shutil.copytree(run_dir, dst, symlinks=True)
        return dst

    return _copy
