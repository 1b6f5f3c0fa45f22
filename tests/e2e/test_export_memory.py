"""Export frees the traced module before the ONNX side starts, in a fresh process.

ModelOpt's first import stores exceptions whose tracebacks hold the importing frames (its
dependency ``pulp``); imported while a frame held the transformer, the module stayed alive
through rewrite, save and validation (5.3 GiB at 12 sd3.5-large blocks). Only a process that has
not imported ModelOpt yet shows it, so the export runs in a subprocess; weak references to every
module it loads say which ones were still alive at each step.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import gc, json, sys, weakref
    from pathlib import Path
    from sd35trt.components import Component
    from sd35trt.config import load_config
    from sd35trt.models.loading import model_dir
    from sd35trt.stages.export import export_component, tracing

    if sys.argv[4] == "late":  # ModelOpt imported inside restore_calibration, as before
        tracing.import_modelopt = lambda: None
    cfg = load_config(sys.argv[1])
    run = Path(sys.argv[2])
    refs, alive = [], {}
    load = tracing.load_module

    def spy(*args, **kwargs):
        module = load(*args, **kwargs)
        refs.append(weakref.ref(module))
        return module

    def phase(name):
        gc.collect()
        alive[name] = [r() is not None for r in refs]

    tracing.load_module = spy
    export_component(
        cfg, model_dir(cfg, run), Component.TRANSFORMER, Path(sys.argv[3]),
        calibration=run / "calibrate" / "amax.safetensors", phase=phase, progress=lambda line: None,
    )
    gc.collect()
    alive["end"] = [r() is not None for r in refs]
    print(json.dumps(alive))
    """
)


def _alive(calibrated_run: Path, tmp_path: Path, order: str) -> dict[str, list[bool]]:
    config = REPO / "configs" / "tiny.yaml"
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(config), str(calibrated_run), str(tmp_path / order), order],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_traced_module_is_collected_before_the_onnx_side(calibrated_run, tmp_path):
    alive = _alive(calibrated_run, tmp_path, "early")
    # Loaded twice: to trace, and for the reference after ONNX Runtime has run.
    assert alive["rewrite"] == [False] and alive["validate"] == [False]
    assert alive["end"] == [False, False]
