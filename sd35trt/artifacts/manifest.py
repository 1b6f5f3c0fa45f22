"""Run manifests: records, staged publishing and verification.

``runs/<name>/manifest.json`` holds one typed record per stage (:mod:`sd35trt.artifacts.records`):
every file the stage wrote (path relative to the run directory, size, sha256), the digest of the
config sections it depends on, the digests of the upstream records it used, and tool versions.

Stages publish atomically: into a temporary sibling directory, renamed into place, then the record
(the manifest is replaced with ``os.replace``). Between rename and record a marker file
(``.<dir>.unrecorded``) names the stage as interrupted to every later check, and its next run
redoes it. A stage killed at any other point leaves the old state or a record-less directory that
the next stage refuses; the next run of the same stage removes the leftovers.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from sd35trt.artifacts.files import (
    HashCache,
    atomic_write_json,
    atomic_write_text,
    current_umask,
    verify_files,
)
from sd35trt.artifacts.records import RECORD_TYPES, FileRecord, Fingerprint, ManifestFile, Stage, StageRecord
from sd35trt.component_table import refuse_untyped_controlnet
from sd35trt.errors import (
    ManifestError,
    StaleArtifactError,
    validation_message,
    write_error,
)
from sd35trt.user_files import json_object

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


#: The toolchain, by distribution name (import names differ; metadata needs no import): recorded
#: with every stage's output and reported by ``sd35trt info``.
TOOL_DISTRIBUTIONS = (
    "sd35trt",
    "torch",
    "diffusers",
    "transformers",
    "nvidia-modelopt",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "polygraphy",
    "tensorrt",
    "tensorrt_rtx_cu13",
)


def tool_versions(include_missing: bool = False) -> dict[str, str | None]:
    """Installed versions of :data:`TOOL_DISTRIBUTIONS` (missing ones: ``None`` if asked for, else absent)."""
    out: dict[str, str | None] = {}
    for dist in TOOL_DISTRIBUTIONS:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            if include_missing:
                out[dist] = None
    return out


def now_utc() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def clean_leftovers(run_dir: str | Path, name: str) -> None:
    """Remove what a killed run of the stage writing ``run_dir/name`` left behind, and temporary
    files of the run manifest and the hash cache.

    Call it only while holding the run directory's lock (:mod:`sd35trt.artifacts.runlock`): another
    writer's staging directory looks the same.
    """
    run_dir = Path(run_dir)
    for pattern in (
        f".{name}.tmp-*",
        f".{name}.old-*",
        f".{MANIFEST_NAME}.*.tmp",
        f".{HashCache.NAME}.*.tmp",
    ):
        for p in run_dir.glob(pattern):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def unrecorded_marker(run_dir: str | Path, stage: Stage) -> Path:
    """The file saying ``stage``'s directory was published and its record not yet written."""
    return Path(run_dir) / f".{stage.directory}.unrecorded"


@contextlib.contextmanager
def staged_directory(run_dir: str | Path, name: str, marker: Path | None = None) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces ``run_dir/name`` on success.

    On an exception it is removed and ``run_dir/name`` is untouched. ``marker``: a file created
    just before the rename (stages pass :func:`unrecorded_marker`; :meth:`RunManifest.put` removes it).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    clean_leftovers(run_dir, name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=run_dir)).absolute()
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; published dirs get the usual mode
    try:
        yield tmp
    except BaseException as err:
        # a full disk, read-only, no permission: one line naming the path (free space counted first)
        user = write_error(err, run_dir / name) if isinstance(err, OSError) else None
        shutil.rmtree(tmp, ignore_errors=True)
        if user is not None:
            raise user from None
        raise
    if marker is not None:
        atomic_write_text(marker, f"{name} published at {now_utc()}, not recorded yet\n")
    final = run_dir / name
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{name}.old-", dir=run_dir))
        old.rmdir()
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class RunManifest:
    """``runs/<name>/manifest.json``: at most one typed record per stage.

    Every read validates the whole file, so a record edited by hand or written by another version
    is reported (one line naming the file and the field) before it is used.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / MANIFEST_NAME

    def load(self) -> dict[Stage, StageRecord]:
        """The records in the file (none when it does not exist yet).

        Raises:
            ManifestError: the file is not JSON, has another format version, or a field does not
                match its schema (naming the file and the field).
        """
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        fix = "delete it and re-run the stages"
        data = json_object(self.path, raw, fix)
        if data.get("format") != FORMAT_VERSION:
            raise ManifestError(
                f"{self.path} has format {data.get('format')!r}, this sd35trt reads format "
                f"{FORMAT_VERSION}: {fix}"
            )
        records = data.get("records")
        for stage, record in records.items() if isinstance(records, dict) else ():
            details = record.get("details") if isinstance(record, dict) else None
            # an export's components, and the single ControlNet type a stage's model once recorded
            parts = [details.get(k) for k in ("components", "model")] if isinstance(details, dict) else []
            names = [name for part in parts if isinstance(part, dict) for name in part]
            refuse_untyped_controlnet(names, f"the {stage} record in {self.path}")
        try:
            # JSON-mode strict validation: no coercion, so a valid record dumps back to the same
            # JSON and keeps the digest its downstream records name it by.
            parsed = ManifestFile.model_validate_json(raw, strict=True)
        except ValidationError as err:
            raise ManifestError(validation_message(err, str(self.path)) + f"; {fix}") from None
        return parsed.records.by_stage()

    def get(self, stage: Stage) -> StageRecord | None:
        return self.load().get(stage)

    def put(self, stage: Stage, record: StageRecord) -> None:
        """Add or replace the record of ``stage`` (atomically, after its files are in place) and remove
        its :func:`unrecorded_marker`.

        Raises:
            ValueError: ``record`` is another stage's (a bug).
            ManifestError: the existing manifest does not validate (it is left as it is).
        """
        if record.stage is not stage or not isinstance(record, RECORD_TYPES[stage]):
            raise ValueError(f"a {record.stage.value} record cannot be put as the {stage.value} record")
        records = self.load()
        records[stage] = record
        ordered = {s.value: records[s].to_json() for s in Stage if s in records}
        atomic_write_json(self.path, {"format": FORMAT_VERSION, "records": ordered})
        unrecorded_marker(self.run_dir, stage).unlink(missing_ok=True)

    def no_record(self, stage: Stage, hint: str = "") -> ManifestError:
        """The error for a missing ``stage`` record: the command to run first (``hint``: its options)."""
        cmd = f"`sd35trt {stage.value}" + (f" {hint}`" if hint else "`")
        return ManifestError(f"{self.run_dir} has no {stage.value} record: run {cmd} first")

    def verified(
        self,
        stage: Stage,
        fingerprint: Fingerprint | str | None = None,
        hint: str = "",
        *,
        cache: HashCache | None = None,
        chain: str | None = None,
    ) -> StageRecord:
        """The record of ``stage`` after checking its files, its config digest and its upstream.

        Args:
            fingerprint: the stage's current :class:`Fingerprint` (or only its digest); ``None``
                skips the check. With a fingerprint, a stale record names what changed.
            hint: appended to the suggested command (e.g. ``--config configs/tiny.yaml``).
            cache: reuse digests of unchanged files (a freshness check, not a load).
            chain: the one command that brings the chain up to date (e.g. ``sd35trt build
                --upstream ...``), suggested instead of re-running ``stage`` alone.

        Raises:
            ManifestError: no record, or the manifest does not validate.
            StaleArtifactError: the config changed since, an upstream stage re-ran since, or the
                stage was interrupted between publishing its directory and recording it.
            VerificationError: a file is missing or differs from its record.
        """
        records = self.load()
        rec = records.get(stage)
        if rec is None:
            raise self.no_record(stage, hint)
        rerun = f"`sd35trt {stage.value}" + (f" {hint}`" if hint else "`")
        fix = f"bring the chain up to date with `{chain}`" if chain else f"re-run {rerun}"
        output = f"the {stage.value} output in {self.run_dir}"
        if unrecorded_marker(self.run_dir, stage).exists():
            raise StaleArtifactError(
                f"{output} was published but never recorded (the last `sd35trt {stage.value}` was "
                f"interrupted); {fix}, which redoes it"
            )
        digest = fingerprint.digest if isinstance(fingerprint, Fingerprint) else fingerprint
        if digest is not None and rec.config_digest != digest:
            changed = isinstance(fingerprint, Fingerprint) and fingerprint.changes(rec.inputs)
            what = changed or f"config sections [{', '.join(stage.config_sections)}]"
            raise StaleArtifactError(f"{output} is stale: {what} changed since it was made; {fix}")
        up = stage.upstream
        if up is not None and up in rec.upstream:
            current = records.get(up)
            if current is None or current.digest() != rec.upstream[up]:
                raise StaleArtifactError(f"{output} was made from an older {up.value} output; {fix}")
        verify_files(self.run_dir, rec.files, what=f"{stage.value} output ({fix})", cache=cache)
        return rec


def new_record(
    stage: Stage,
    fingerprint: Fingerprint | str,
    files: Iterable[FileRecord],
    upstream: dict[Stage, StageRecord] | None = None,
    *,
    details: Any,
) -> StageRecord:
    """A record of ``stage`` ready for :meth:`RunManifest.put`, created now with this machine's versions.

    Args:
        fingerprint: what the stage's output was made from (:meth:`Fingerprint.of`), or only
            its digest (then the record keeps no inputs).
        files: the files it wrote (relative to the run directory).
        upstream: the upstream records it read (named by their digests).
        details: the stage's own details model (e.g. :class:`~sd35trt.artifacts.records.ExportDetails`).

    Raises:
        pydantic.ValidationError: ``details`` is not the stage's details model (a bug).
    """
    return RECORD_TYPES[stage](
        stage=stage,
        created=now_utc(),
        config_digest=fingerprint.digest if isinstance(fingerprint, Fingerprint) else fingerprint,
        upstream={s: r.digest() for s, r in (upstream or {}).items()},
        versions=tool_versions(),
        files=tuple(files),
        inputs=fingerprint.inputs if isinstance(fingerprint, Fingerprint) else None,
        details=details,
    )
