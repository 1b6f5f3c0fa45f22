"""PNG files that record how they were made, with deterministic bytes.

The generation parameters go into one ``parameters`` text chunk as sorted JSON (prompt, negative
prompt, seed, num_inference_steps, guidance_scale, size, skip-layer guidance, image-to-image
strength and the input image's sha256, engine digest, image index, the engine batch the image was
made in, and the model the engines hold when it is more than the config says: the Hub commit and
the fused LoRAs with their sha256 and scale), next to a ``Software`` chunk. What is recorded is
what was used: without classifier-free guidance the negative prompt and skip-layer guidance are
``null``. No timestamps or other varying chunks are written, so the same pixels and parameters
always give the same bytes.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sd35trt.artifacts.manifest import atomic_write_bytes
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

    ``model`` is the engine manifest's record of the weights (:attr:`EngineManifest.model`): its
    Hub commit and LoRAs are added when present.
    """
    data = {
        **params.to_json(),
        "engine_digest": engine_digest,
        "image_index": index,
        "engine_batch": (batch or EngineBatch(images=params.num_images)).to_json(),
    }
    model = model or {}
    if model.get("hub"):
        data["model"] = {k: model["hub"][k] for k in ("repo_id", "commit")}
    if model.get("loras"):
        data["loras"] = [{k: lora[k] for k in ("file", "sha256", "scale")} for lora in model["loras"]]
    return data


def png_bytes(
    image: Image.Image,
    params: GenerationParams,
    engine_digest: str,
    index: int = 0,
    batch: EngineBatch | None = None,
    model: Mapping | None = None,
) -> bytes:
    """Encode ``image`` as PNG with the generation parameters in a text chunk.

    Args:
        image: an RGB image.
        params: the parameters it was generated with.
        engine_digest: the engines' digest.
        index: the image's position in its request.
        batch: the engine batch it was made in (default: the request alone).
        model: the weights the engines hold (Hub commit, LoRAs), from the engine manifest.

    Returns:
        The PNG file's bytes (the same for the same pixels and parameters).
    """
    info = PngInfo()
    # Non-Latin-1 text (a prompt in any script) makes Pillow write an iTXt chunk instead of tEXt.
    text = json.dumps(png_parameters(params, engine_digest, index, batch, model), sort_keys=True)
    info.add_text(PARAMETERS_KEY, text)
    info.add_text("Software", _software())
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def save_png(
    path: str | Path,
    image: Image.Image,
    params: GenerationParams,
    engine_digest: str,
    index: int = 0,
    batch: EngineBatch | None = None,
    model: Mapping | None = None,
) -> Path:
    """Write ``image`` to ``path`` atomically (a temporary file renamed into place).

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    data = png_bytes(image, params, engine_digest, index, batch, model)
    atomic_write_bytes(path, data)
    return path


def read_png_parameters(path: str | Path) -> dict:
    """The parameters recorded in a PNG written by :func:`save_png` (empty if there are none)."""
    with Image.open(path) as image:
        text = getattr(image, "text", {}).get(PARAMETERS_KEY)
    return json.loads(text) if text else {}
