"""What fixes damaged engines: a rebuild where they were built, a fresh copy where they are served."""

from __future__ import annotations

from pathlib import Path

from sd35trt.artifacts.manifest import MANIFEST_NAME

REBUILD = "rebuild with `sd35trt build`"


def repair_hint(path: str | Path) -> str:
    """What fixes a damaged or modified engine file at ``path`` (a file or its engines directory).

    Engines inside a run directory (``runs/<name>/engines``, a run manifest beside them) are
    rebuilt; anywhere else (an unpacked artefact on a serving machine, where nothing can be built)
    they are copied again from where they were built, and checked with ``sd35trt verify``.
    """
    path = Path(path)
    engines = next((d for d in (path, *path.parents) if (d / MANIFEST_NAME).is_file()), path)
    if (engines.parent / MANIFEST_NAME).is_file():
        return REBUILD
    return (
        f"copy the engines again (or unpack the artefact again) from where they were built, then "
        f"check them with `sd35trt verify {engines}`"
    )
