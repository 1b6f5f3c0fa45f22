"""Sample inputs of a component's graph, drawn as its spec says (export validation, verify --compare)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from sd35trt.components import NUM_TRAIN_TIMESTEPS, ComponentSpec, Sampling


def sample_inputs(
    sp: ComponentSpec, shapes: Mapping[str, tuple[int, ...]], case: int, vocab: int | None = None
) -> dict[str, np.ndarray]:
    """Random inputs of ``sp`` at ``shapes``, drawn as each input's :class:`Sampling` says.

    Export validation and ``sd35trt verify --compare`` both draw their inputs here, so an engine
    is compared on the kind of values it was validated on.

    Args:
        sp: the component's I/O contract (names, sampling rules).
        shapes: a concrete shape per input name.
        case: seeds the draw, so every case gets fresh values and a re-run the same ones.
            Gates alternate with it (all skipped, then none): two cases cover both branches.
        vocab: the token vocabulary, for token inputs.

    Returns:
        ``{name: array}`` in the spec's order: int64 token ids, float32 for every float input
        (callers cast to the graph's dtype).

    Raises:
        ValueError: the spec has token inputs and no ``vocab`` is given.
    """
    rng = np.random.default_rng(1234 + case)
    out = {}
    for t in sp.inputs:
        shape = tuple(shapes[t.name])
        if t.sampling is Sampling.TOKENS:
            if not vocab:
                raise ValueError(f"{sp.component.value}: token input {t.name} needs a vocabulary size")
            out[t.name] = rng.integers(0, vocab, shape, dtype=np.int64)  # [B, L]
        elif t.sampling is Sampling.TIMESTEP:
            out[t.name] = (rng.random(shape) * NUM_TRAIN_TIMESTEPS).astype(np.float32)  # [B]
        elif t.sampling is Sampling.GATE:
            out[t.name] = np.full(shape, float((case + 1) % 2), dtype=np.float32)  # [n] in {0, 1}
        elif t.sampling is Sampling.PIXELS:
            out[t.name] = rng.random(shape, dtype=np.float32)  # [B, 3, H, W] in [0, 1]
        else:
            out[t.name] = rng.standard_normal(shape, dtype=np.float32)
    return out
