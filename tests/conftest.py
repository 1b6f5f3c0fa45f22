"""Shared fixtures: the tiny model carried through the stages once per test session.

Stage fixtures chain on one run directory (calibrate -> export -> build). Tests that damage
artefacts must work on a copy (``copy_run``), never on the shared directory.
"""

from __future__ import annotations

import importlib.util
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


@pytest.fixture(scope="session")
def calibrated_run(tiny_config, tmp_path_factory) -> Path:
    """A run directory after ``calibrate``."""
    from sd35trt.calibrate import calibrate

    run_dir = tmp_path_factory.mktemp("run") / "tiny"
    calibrate(tiny_config, run_dir)
    return run_dir


@pytest.fixture(scope="session")
def exported_run(tiny_config, calibrated_run) -> Path:
    """The same run directory after ``export``."""
    from sd35trt.export import export

    export(tiny_config, calibrated_run)
    return calibrated_run


@pytest.fixture(scope="session")
def built_run(tiny_config, exported_run) -> Path:
    """The same run directory after ``build`` with the ONNX Runtime backend."""
    from sd35trt.build import build
    from sd35trt.config import Backend

    build(tiny_config, exported_run, Backend.ONNXRUNTIME)
    return exported_run


@pytest.fixture
def copy_run(tmp_path):
    """Copy a shared run directory so a test can damage it."""

    def _copy(run_dir: Path) -> Path:
        dst = tmp_path / run_dir.name
        shutil.copytree(run_dir, dst, symlinks=True)
        return dst

    return _copy
