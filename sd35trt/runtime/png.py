"""PNG files that record how they were made, with deterministic bytes.

The generation parameters (:func:`png_parameters`) go into one ``parameters`` text chunk as sorted
JSON, next to a ``Software`` chunk. What is recorded is what was used: without classifier-free
guidance the negative prompt and skip-layer guidance are ``null``. No timestamps or other varying
chunks are written, so the same pixels and parameters always give the same bytes.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sd35trt.artifacts.files import atomic_write_bytes
from sd35trt.runtime.request import EngineBatch, GenerationParams

PARAMETERS_KEY = "parameters"


def _software() -> str:
    try:
        return f"sd35trt {metadata.version('sd35trt')}"
    except metadata.PackageNotFoundError:
        return "sd35trt"


def png_parameters(
    params: GenerationParams,
    engine_digest: str,
    index: int = 0,
    batch: EngineBatch | None = None,
    model: Mapping | None = None,
) -> dict:
    """The parameters recorded in the PNG of image ``index`` of a request.

    The request's own (:meth:`GenerationParams.to_json`), with the image's own ``seed`` (``seed + i``
    for image ``i``: a one-image request with it makes this image again) and ``image_index``, the
    engine digest and the engine batch it was made in. ``params`` may be a part of a larger request
    (:func:`sd35trt.runtime.parts.engine_parts`): ``index`` is then the image's position in the
    part. ``model`` is the engine manifest's record of the weights (:attr:`EngineManifest.model`):
    its Hub commit and fused LoRAs (sha256, scale) are added when present.
    """
    data = {
        **params.to_json(),
        "seed": params.seed + index,
        "engine_digest": engine_digest,
        "image_index": params.first_image + index,
        "engine_batch": (batch or EngineBatch(images=params.num_images)).to_json(),
    }
    model = model or {}
    if model.get("hub"):
        data["model"] = {k: model["hub"][k] for k in ("repo_id", "commit")}
    if model.get("loras"):
        data["loras"] = [{k: lora[k] for k in ("file", "sha256", "scale")} for lora in model["loras"]]
    return data


def png_bytes(image: Image.Image, parameters: Mapping) -> bytes:
    """PNG bytes of ``image`` (RGB) with ``parameters`` (:func:`png_parameters`) in a text chunk.

    The same pixels and parameters always give the same bytes.
    """
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=_png_info(parameters))
    return buf.getvalue()


def _png_info(parameters: Mapping) -> PngInfo:
    info = PngInfo()
    # Non-Latin-1 text (a prompt in any script) makes Pillow write an iTXt chunk instead of tEXt.
    info.add_text(PARAMETERS_KEY, json.dumps(parameters, sort_keys=True))
    info.add_text("Software", _software())
    return info


def attach_parameters(
    image: Image.Image,
    params: GenerationParams,
    engine_digest: str,
    index: int = 0,
    batch: EngineBatch | None = None,
    model: Mapping | None = None,
) -> None:
    """Make a plain ``image.save("x.png")`` write the chunks :func:`png_bytes` writes (same bytes).

    The arguments are :func:`png_parameters`'. Sets ``image.info["parameters"]`` (the JSON text,
    for reading in memory) and Pillow's per-image ``encoderinfo`` (``pnginfo``), which
    ``Image.save`` merges into its options (Pillow's documented per-image writer parameters; the
    lock's Pillow 13). Explicit ``save`` options win.
    """
    parameters = png_parameters(params, engine_digest, index, batch, model)
    image.info[PARAMETERS_KEY] = json.dumps(parameters, sort_keys=True)
    image.encoderinfo = {"pnginfo": _png_info(parameters)}


def save_png(path: str | Path, image: Image.Image, *args, **kwargs) -> Path:
    """Write ``image`` to ``path`` atomically (a temporary file renamed into place), with the
    parameters of :func:`png_parameters` (``*args``, ``**kwargs``) in its text chunk.
    """
    path = Path(path)
    atomic_write_bytes(path, png_bytes(image, png_parameters(*args, **kwargs)))
    return path


def read_png_parameters(path: str | Path) -> dict:
    """The parameters recorded in a PNG written by :func:`save_png` (empty if there are none)."""
    with Image.open(path) as image:
        text = getattr(image, "text", {}).get(PARAMETERS_KEY)
    return json.loads(text) if text else {}
