"""Paths recorded in run directories and artefacts stay inside them.

A manifest or ``SHA256SUMS`` names files by paths relative to the directory it describes; one
edited (or crafted) to name ``../../elsewhere`` or to pass through a symlink would make
``verify`` vouch for, and ``run`` load, a file outside that directory. :func:`contained_path` is
the one check every reader of a recorded path goes through.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from sd35trt.errors import UnsafeArtifactError


def contained_path(root: str | Path, rel: str) -> Path:
    """``root / rel`` after checking that ``rel`` stays inside ``root`` with no symlink on the way.

    Only the components below ``root`` are checked: ``root`` itself may be reached through a
    symlink (``/srv`` -> ``/data/srv``), but nothing recorded inside it may lead elsewhere.

    Raises:
        UnsafeArtifactError: ``rel`` is empty, absolute, contains ``..`` or a NUL, or a
            component of it is a symlink (its target is named).
    """
    root = Path(root)
    parts = PurePosixPath(rel).parts if isinstance(rel, str) else ()
    if not parts or "\0" in rel or parts[0] == "/" or ".." in parts:
        raise UnsafeArtifactError(
            f"path {rel!r} recorded in {root} leaves it (absolute, empty or with '..'); "
            "recorded paths must stay inside their directory"
        )
    current = root
    for part in parts:
        current = current / part
        if current.is_symlink():
            raise UnsafeArtifactError(
                f"{current} is a symlink (to {os.readlink(current)}); artefacts and run directories "
                "hold regular files only"
            )
    return current
