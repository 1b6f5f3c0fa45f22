"""diffusers' own FirstBlockCache on the SD3 pipeline, as the engines' first-block cache is checked against.

diffusers 0.42.1 needs two things from the caller for SD3:

- a cache context around each transformer call (the SD3 pipeline sets none, so
  ``apply_first_block_cache`` fails with "No cache context is set"): here a forward pre-hook on
  the transformer names the call ``cond`` (the CFG batch) or ``skip_layers`` (the skip-layer
  pass, recognised by its ``skip_layers`` keyword), as the runtime names its contexts;
- SD3's last block is ``context_pre_only`` and returns ``None`` for the text stream, which the
  cache's tail hook subtracts from (``TypeError``). The last block is made to return its text
  input instead; SD3 never reads the text stream after it, so the image is unchanged.

:func:`first_block_cache` records, per context, which calls skipped the remaining blocks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, apply_first_block_cache
from diffusers.hooks.hooks import CacheContext, _set_cache_context

from sd35trt.runtime.cache import CFG_CONTEXT, SKIP_LAYERS_CONTEXT


def _text_stream_passthrough(block: torch.nn.Module) -> None:
    forward = block.forward

    def passthrough(*args, **kwargs):
        text, hidden = forward(*args, **kwargs)
        return (kwargs["encoder_hidden_states"] if text is None else text), hidden

    block.forward = passthrough


@contextlib.contextmanager
def first_block_cache(transformer: torch.nn.Module, threshold: float) -> Iterator[dict[str, list[int]]]:
    """Apply diffusers' FirstBlockCache to ``transformer`` for the ``with`` block.

    Yields:
        ``{context: [indices of its calls that skipped the remaining blocks]}``, filled as the
        pipeline runs.
    """
    skipped: dict[str, list[int]] = {}
    calls: dict[str, int] = {}
    last = transformer.transformer_blocks[-1]
    _text_stream_passthrough(last)
    apply_first_block_cache(transformer, FirstBlockCacheConfig(threshold=threshold))
    head = HookRegistry.check_if_exists_or_initialize(transformer.transformer_blocks[0])
    state_manager = head.get_hook("fbc_leader_block_hook").state_manager

    def enter(module, args, kwargs):
        name = SKIP_LAYERS_CONTEXT if kwargs.get("skip_layers") else CFG_CONTEXT
        _set_cache_context(module, CacheContext(name))

    def leave(module, args, kwargs, output):
        name = state_manager.context.name
        index = calls.get(name, 0)
        calls[name] = index + 1
        if not state_manager.get_state().should_compute:
            skipped.setdefault(name, []).append(index)
        _set_cache_context(module, None)

    handles = [
        transformer.register_forward_pre_hook(enter, with_kwargs=True),
        transformer.register_forward_hook(leave, with_kwargs=True),
    ]
    try:
        yield skipped
    finally:
        for h in handles:
            h.remove()
        # SD3's transformer has no disable_cache (no CacheMixin): take the hooks off each block
        for block in transformer.transformer_blocks:
            registry = HookRegistry.check_if_exists_or_initialize(block)
            for name in ("fbc_leader_block_hook", "fbc_block_hook"):
                registry.remove_hook(name, recurse=False)
        del last.forward  # the class's forward again
