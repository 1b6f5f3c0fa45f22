"""``sd35trt run``: generate PNGs from an engines directory.

The engines directory is self-contained (engines, manifest, tokenizers, scheduler config); no
config file or diffusers model is read. Options left out take the runtime defaults recorded in
the engine manifest. PNGs are written only after every stage succeeded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sd35trt.errors import RequestError
from sd35trt.parameters import canonical_fields, check_value, listed
from sd35trt.runtime.images import read_image
from sd35trt.runtime.pipeline import GenerationRequest, GenerationResult, Sd35Runtime

DEFAULT_OUT = Path("sd35trt.png")


@dataclass(frozen=True)
class RunOutput:
    """What ``sd35trt run`` wrote and how it went.

    Attributes:
        paths: the PNGs written, one per image.
        result: the generation result (parameters used, timings, warnings).
        load_s: seconds to verify and load the engines (with ``low_vram``: verify only).
    """

    paths: list[Path]
    result: GenerationResult
    load_s: float = 0.0

    def warning_lines(self) -> list[str]:
        """``warning: ...`` per setting without effect and per truncated prompt (for stderr)."""
        return [f"warning: {w}" for w in self.result.warnings]

    def report(self, timings: bool = False) -> str:
        """Lines for the terminal: the files and the seed; the stage timings if asked."""
        p = self.result.params
        seeds = self.result.seeds
        lines = [
            f"wrote {path}" + (f" (seed {seed})" if len(seeds) > 1 else "")
            for path, seed in zip(self.paths, seeds, strict=True)
        ]
        parts = self.result.engine_batches
        several = f" in {parts} engine batches" if parts > 1 else ""
        img2img = f", image-to-image at strength {p.strength:g}" if p.strength is not None else ""
        cache = (
            f", cache threshold {p.cache_threshold:g} skipped {p.cache_skipped_steps} steps"
            if p.cache_threshold is not None
            else ""
        )
        lines.append(
            (f"seed {p.seed}" if len(seeds) == 1 else f"seeds {seeds[0]}..{seeds[-1]} (image i: seed + i)")
            + f", {p.num_inference_steps} steps, guidance {p.guidance_scale:g}, "
            f"{p.width}x{p.height}{img2img}{cache}, "
            f"engines {self.result.engine_digest}{several}"
        )
        if timings:
            lines.append(f"engine loading  {self.load_s * 1000:10.1f} ms")
            lines.append(self.result.timings.format())
        return "\n".join(lines)


def output_paths(out: Path, num_images: int) -> list[Path]:
    """``out`` for one image, ``<stem>-<i>.png`` beside it for several; checked before anything runs.

    Raises:
        RequestError: ``out`` is not a ``.png`` path, a path to write is an existing directory,
            or a parent on the way is a file.
    """
    if out.is_dir():
        raise RequestError(
            "out", f"output {out} is a directory; give a .png file path, e.g. -o {out / DEFAULT_OUT.name}"
        )
    if out.suffix.lower() != ".png":
        raise RequestError("out", f"output {out} must be a .png file path")
    paths = (
        [out]
        if num_images == 1
        else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(num_images)]
    )
    for path in paths:
        if path.is_dir():
            raise RequestError("out", f"output {path} is an existing directory; choose another -o")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise RequestError("out", f"output {out} cannot be written: {parent} is a file, not a directory")
    return paths


def run(
    engines_dir: Path, prompt: str, *, low_vram: bool = False, out: Path = DEFAULT_OUT, **params: Any
) -> RunOutput:
    """Generate images from ``prompt`` with the engines in ``engines_dir`` and write PNGs.

    Args:
        engines_dir: a build's ``engines/`` directory.
        prompt: the text prompt.
        low_vram: load each engine only for its stage.
        out: the PNG path; several images get ``-0``, ``-1``, ... suffixes.
        params: the other generation parameters (:data:`sd35trt.parameters.GENERATION_PARAMS`) by
            name or alias, e.g. ``num_inference_steps=4`` or ``steps=4``; ``None`` or left out:
            the engines' recorded default (a drawn seed, reported). ``image`` is a file path.

    Returns:
        The paths written and the generation result.

    Raises:
        RequestError: an invalid option (named) or an output path that cannot be written, before
            any engine loads.
        ManifestError, VerificationError, IncompatibleEngineError: the engines can't be used.
        NonFiniteError: a stage produced NaN or inf (named); no PNG is written.
    """
    fields = canonical_fields({"prompt": prompt, **params}, wire=False)
    num_images = check_value("num_images", fields.get("num_images", 1))
    if num_images < 1:  # the upper bound is the runtime's max_images, made from this count below
        raise RequestError("num_images", f"num_images {num_images} is not 1 or more")
    paths = output_paths(Path(out), num_images)
    if fields.get("image") is not None:  # files on the command line
        fields["image"] = read_image(Path(fields["image"]), "image")
    if fields.get("control_image") is not None:  # one or several (a list, paired with control_type)
        given = fields["control_image"]
        images = [read_image(Path(p), "control_image") for p in listed(given)]
        fields["control_image"] = images if isinstance(given, (list, tuple)) else images[0]
    request = GenerationRequest(**fields)
    start = time.perf_counter()
    with Sd35Runtime.load(engines_dir, low_vram=low_vram, activate=False, max_images=num_images) as runtime:
        used = runtime.validate(request)  # a bad request fails before any engine loads
        runtime.engines.activate_all()  # so stage timings don't include loading (except with low_vram)
        load_s = time.perf_counter() - start
        result = runtime.generate(used)
    for i, path in enumerate(paths):
        try:
            result.save(path, i)
        except OSError as err:  # permissions, a full disk: the user's to fix, named
            raise RequestError("out", f"cannot write {path}: {err.strerror or err}") from None
    return RunOutput(paths=paths, result=result, load_s=load_s)
