"""What the server needs from a runtime: the narrow :class:`Generator` interface and its records."""

from __future__ import annotations

import io
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class Prepared:
    """A validated request: its batch ``key`` (size, steps, guidance), ``size`` in images, the
    ``capacity`` (images) and ``max_requests`` (text-encoder rows) of an engine batch with its key,
    the ``params`` used (defaults filled in, the seed drawn), the runtime's ``native`` request, and
    ``split(capacity)`` cutting it into parts of at most ``capacity`` images, each keeping its seed
    (``None``: it cannot be cut)."""

    key: Hashable
    size: int
    capacity: int
    max_requests: int
    params: Mapping[str, Any]
    native: Any
    split: Callable[[int], list[Prepared]] | None = field(default=None, compare=False, repr=False)


def _plain_png(image: Any, index: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class ImageSet:
    """The images of one request, each one's seed, stage timings (seconds) and warnings;
    ``png(image, index)`` encodes one image, outside the engine thread."""

    images: list  # PIL images
    seeds: list[int]  # per image: seed + i
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    png: Callable[[Any, int], bytes] = _plain_png
    #: the parameters as generated, when generating added to the prepared ones (the cache's skipped steps).
    parameters: Mapping[str, Any] | None = None

    @classmethod
    def joined(cls, parts: Sequence[ImageSet]) -> ImageSet:
        """The image set of a request that ran as ``parts`` (in order): stage times summed."""
        if len(parts) == 1:
            return parts[0]
        offsets, n = [], 0
        for part in parts:
            offsets.append(n)
            n += len(part.images)

        def png(image: Any, index: int) -> bytes:
            k = max(i for i, start in enumerate(offsets) if start <= index)
            return parts[k].png(image, index - offsets[k])

        timings: dict[str, float] = {}
        for part in parts:
            for name, value in part.timings.items():
                timings[name] = timings.get(name, 0.0) + value
        parameters = None  # the request's (every part records it), with the cache's skipped steps summed
        if all(p.parameters is not None for p in parts):
            skipped = [p.parameters.get("cache_skipped_steps") for p in parts]
            parameters = {
                **parts[0].parameters,
                "cache_skipped_steps": None if None in skipped else sum(skipped),
            }
        return cls(
            images=[im for p in parts for im in p.images],
            seeds=[s for p in parts for s in p.seeds],
            timings=timings,
            warnings=list(dict.fromkeys(w for p in parts for w in p.warnings)),
            png=png,
            parameters=parameters,
        )


@runtime_checkable
class Generator(Protocol):
    @property
    def max_batch(self) -> int:
        """Most images one engine batch can hold (the engines' profile maximum)."""

    def limits(self) -> dict:
        """Allowed ranges read from the engine manifest, for ``/ready`` and error messages."""

    def prepare(self, fields: Mapping[str, Any]) -> Prepared:
        """Validate one request (``None`` fields take the engine defaults); RequestError names the
        field and the allowed range."""

    def run_batch(self, requests: Sequence[Prepared]) -> list[ImageSet | BaseException]:
        """Run ``requests`` (all with the same key) as one engine batch: one result per request;
        raises when the batch fails as a whole (the server then re-runs each request alone)."""

    def warmup(self) -> None:
        """One small generation, so the first request doesn't pay for lazy initialisation."""


def run_alone_on_failure(
    run_batch: Callable[[list[Any]], Sequence[Any]],
    items: Sequence[Any],
    *,
    skip: Callable[[Any], bool] = lambda item: False,
    on_failure: Callable[[BaseException], None] = lambda err: None,
) -> tuple[list[Any], bool]:
    """Run ``items`` as one engine batch; when it fails as a whole (a NaN, out of memory, any
    exception), run each item alone, so only the item at fault gets the error (``sd35trt serve``'s
    batcher and the Triton model both batch this way).

    ``run_batch`` returns one result (or exception) per item, or raises; ``skip`` names items not to
    re-run alone (a request whose client left: ``None``); ``on_failure`` is told the merged batch's
    exception. Returns one result or exception per item, and whether they were re-run alone.
    """
    try:
        return list(run_batch(list(items))), False
    except Exception as err:
        if len(items) == 1:
            return [err], False
        on_failure(err)
    results: list[Any] = []
    for item in items:
        if skip(item):
            results.append(None)
            continue
        try:
            results.extend(run_batch([item]))
        except Exception as single:
            results.append(single)
    return results, True
