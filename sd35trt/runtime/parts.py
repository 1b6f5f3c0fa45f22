"""Requests for more images than one engine batch holds, and the seed of each image.

Image ``i`` of a request seeded ``s`` is drawn from its own CPU generator seeded ``s + i``, as
diffusers' pipelines draw a batch given a list of generators (``randn_tensor`` draws one
``[1, C, h, w]`` sample per generator). So a request for ``n`` images is the same as ``n``
requests for one image each, seeds ``s .. s + n - 1``, and can be cut anywhere: a request beyond
the engine batch runs as several engine batches (:func:`engine_parts`), each image keeping its
seed. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import replace

from sd35trt.runtime.request import GenerationParams


def image_seeds(params: GenerationParams) -> tuple[int, ...]:
    """The seed of each image of ``params``: ``seed + i`` for image ``i``."""
    return tuple(params.seed + i for i in range(params.num_images))


def engine_parts(params: GenerationParams, per_batch: int, min_batch: int = 1) -> list[GenerationParams]:
    """``params`` as parts of ``min_batch..per_batch`` images, one engine batch each.

    Args:
        params: a validated request.
        per_batch: most images one engine batch of this kind holds
            (:meth:`RequestLimits.images_per_batch`).
        min_batch: fewest images an engine batch takes (the engines' smallest batch).

    Returns:
        ``[params]`` when it fits one engine batch; else full parts first (5 at 2: 2, 2, 1; a last
        part below ``min_batch`` takes images from the one before). The part starting at image
        ``k`` has seed ``seed + k``, ``first_image`` ``k`` and ``request_images`` ``num_images``,
        so what it records (PNG, HTTP ``parameters``) is the whole request's.
    """
    if params.num_images <= per_batch:
        return [params]
    sizes = [per_batch] * (params.num_images // per_batch)
    if rest := params.num_images % per_batch:
        short = max(0, min_batch - rest)
        sizes[-1] -= short
        sizes.append(rest + short)
    out, start = [], 0
    for count in sizes:
        out.append(
            replace(
                params,
                seed=params.seed + start,
                num_images=count,
                first_image=params.first_image + start,
                request_images=params.num_images,
            )
        )
        start += count
    return out
