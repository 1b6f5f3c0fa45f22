"""A bounded, shape-keyed cache of captured CUDA graphs (no torch import: tested on CPU).

Inside skip-layer guidance's window the transformer alternates two input shapes (batch 2N for
CFG, N for the skip pass), so the cache holds several, least recently used evicted first. A shape
is captured on its second call only: the first runs eagerly, the warm-up TensorRT needs before a
capture, and engines called once per image (text encoders, VAE) never pay a capture.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

G = TypeVar("G")


class GraphCache(Generic[G]):
    """Captured graphs keyed by input shapes, at most ``capacity`` of them.

    Args:
        capture: captures a graph for a key (its static buffers bound to that key's shapes).
        capacity: graphs kept; the least recently used one is dropped beyond it.
        on_evict: called with each dropped graph (free its memory).
    """

    def __init__(
        self,
        capture: Callable[[Hashable], G],
        capacity: int = 4,  # CFG and skip passes, plus room for a second image size
        on_evict: Callable[[G], None] | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self._capture = capture
        self.capacity = capacity
        self._on_evict = on_evict
        self._graphs: OrderedDict[Hashable, G] = OrderedDict()
        self._seen: set[Hashable] = set()
        self.captures = 0

    def lookup(self, key: Hashable) -> G | None:
        """The graph for ``key``: cached, or captured now if ``key`` was seen before.

        Returns ``None`` on the first sight of ``key``: the caller runs eagerly then.
        """
        graph = self._graphs.get(key)
        if graph is not None:
            self._graphs.move_to_end(key)
            return graph
        if key not in self._seen:
            self._seen.add(key)
            return None
        graph = self._capture(key)
        self.captures += 1
        self._graphs[key] = graph
        while len(self._graphs) > self.capacity:
            _, dropped = self._graphs.popitem(last=False)
            if self._on_evict is not None:
                self._on_evict(dropped)
        return graph

    def clear(self) -> None:
        """Drop every graph (their device addresses changed); shapes seen stay seen."""
        graphs = list(self._graphs.values())
        self._graphs.clear()
        if self._on_evict is not None:
            for graph in graphs:
                self._on_evict(graph)

    def __len__(self) -> int:
        return len(self._graphs)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._graphs
