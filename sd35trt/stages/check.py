"""Checking a config against the model before any stage runs.

A valid config can still not fit the model (image sizes beyond the positional embedding, layers
the transformer lacks, FP8 attention for a head size TensorRT cannot take, a scheduler option the
runtime does not reproduce). Every stage verb calls :func:`check_config` first, for itself and
every later stage, so ``export`` never stops after hours of calibration.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sd35trt.artifacts.records import Stage
from sd35trt.components import ModelDims, latent_range, size_problems
from sd35trt.config import Config
from sd35trt.errors import ConfigError, ManifestError

#: The model's scheduler config, which the engines carry and the runtime reproduces.
SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"


def _collect(problems: list[str], check: Callable[[], object]) -> None:
    try:
        check()
    except ConfigError as err:
        problems.append(str(err))


def skip_layer_indices(config: Config, dims: ModelDims) -> tuple[int, ...]:
    """The transformer blocks the skip-layer-guidance input gates (``()`` without SLG).

    Raises:
        ConfigError: a layer outside ``0..num_layers-2``.
    """
    slg = config.runtime.skip_layer_guidance
    if slg is None:
        return ()
    # The last block returns no text stream (context_pre_only), so SD3.5 never skips it.
    bad = [i for i in slg.layers if not 0 <= i < dims.num_layers - 1]
    if bad:
        raise ConfigError(
            f"runtime.skip_layer_guidance.layers has {bad}; this transformer has {dims.num_layers} blocks "
            f"and the last one can't be skipped: allowed 0..{dims.num_layers - 2}"
        )
    return tuple(slg.layers)


def check_fp32_blocks(config: Config, dims: ModelDims) -> None:
    """Refuse ``export.fp32_blocks`` outside the transformer.

    Raises:
        ConfigError: a block index of ``num_layers`` or more.
    """
    bad = [b for b in config.export.fp32_blocks if b >= dims.num_layers]
    if bad:
        raise ConfigError(
            f"export.fp32_blocks has {bad}; this transformer has {dims.num_layers} blocks: "
            f"allowed 0..{dims.num_layers - 1}"
        )


def scheduler_problems(model_dir: str | Path) -> list[str]:
    """What in the model's scheduler config the runtime cannot honour (``use_dynamic_shifting:
    true``, another scheduler class, Karras sigmas, ...): read as ``sd35trt run`` will read it.

    Returns:
        One line per problem; none when ``model_dir`` has no scheduler config (the build names
        the missing file).
    """
    from sd35trt.runtime.scheduler import FlowMatchEuler

    path = Path(model_dir) / SCHEDULER_CONFIG
    if not path.is_file():
        return []
    try:
        FlowMatchEuler.from_config(path)
    except ManifestError as err:
        return [f"the model's {err}"]
    return []


def _calibration_problems(config: Config, dims: ModelDims) -> list[str]:
    from sd35trt.models.quantize import quant_config

    s = config.calibrate
    problems = [
        p for name in ("height", "width") for p in size_problems(f"calibrate.{name}", getattr(s, name), dims)
    ]
    _collect(problems, lambda: quant_config(s, dims.num_layers, dims.head_dim))
    return problems


def _build_problems(config: Config, dims: ModelDims) -> list[str]:
    problems: list[str] = []
    for name in ("height", "width"):
        _collect(problems, lambda name=name: latent_range(getattr(config.build, name), dims, name))
        problems += size_problems(f"runtime.{name}", getattr(config.runtime, name), dims, limit=False)
    return problems


def config_problems(
    config: Config, dims: ModelDims, first: Stage = Stage.CALIBRATE, model_dir: str | Path | None = None
) -> list[str]:
    """Everything in ``config`` that cannot work with a model of ``dims``, from ``first`` on.

    Args:
        config: the validated config.
        dims: the model's sizes (from its diffusers configs, or the export record).
        first: the stage about to run; it and every later stage are checked (calibration only
            when ``export.quantize`` is on, since only then does it run).
        model_dir: the diffusers directory, whose scheduler config is checked against what the
            runtime reproduces (:func:`scheduler_problems`); ``None`` skips that check.

    Returns:
        One line per problem (empty when the config fits).
    """
    order = list(Stage)
    ahead = order[order.index(first) :]
    problems: list[str] = []
    if Stage.CALIBRATE in ahead and config.export.quantize:
        problems += _calibration_problems(config, dims)
    if Stage.EXPORT in ahead:
        _collect(problems, lambda: skip_layer_indices(config, dims))
        if config.runtime.cache is not None and dims.num_layers < 2:
            problems.append(
                f"runtime.cache needs a transformer of 2 blocks or more (a first block and the rest); "
                f"this one has {dims.num_layers}"
            )
        _collect(problems, lambda: check_fp32_blocks(config, dims))
    if config.model.controlnets and config.runtime.cache is not None:
        problems.append(
            "model.controlnet and runtime.cache are set together: the ControlNet's residuals feed the "
            "whole transformer engine, which runtime.cache splits in two; unset one of them"
        )
    problems += _build_problems(config, dims)  # the build and runtime sections: every stage
    if model_dir is not None:
        problems += scheduler_problems(model_dir)
        if len(config.model.controlnets) > 1 and Stage.EXPORT in ahead:
            from sd35trt.models.controlnet import resolve_controlnets

            # exported together, they must share block count and layout (they are summed)
            _collect(problems, lambda: resolve_controlnets(config.model, model_dir))
    return problems


def check_config(
    config: Config, dims: ModelDims, first: Stage = Stage.CALIBRATE, model_dir: str | Path | None = None
) -> None:
    """Refuse ``config`` before ``first`` runs when it cannot work with the model (see
    :func:`config_problems`).

    Raises:
        ConfigError: naming every problem, each with the key, the value and what is allowed.
    """
    problems = config_problems(config, dims, first, model_dir)
    if problems:
        raise ConfigError(
            f"config {config.name!r} does not fit the model ({len(problems)} problem"
            f"{'s' if len(problems) > 1 else ''}, found before `sd35trt {first.value}` started): "
            + "; ".join(problems)
        )
