"""Run manifests: records, digests, atomic writes and verification.

A run directory ``runs/<name>/`` holds one sub-directory per stage (``calibrate/``, ``onnx/``,
``engines/``) and ``manifest.json`` with one record per stage. A record lists every file the
stage wrote (path relative to the run directory, size, sha256), the digest of the config
sections the stage depends on, the digests of the upstream records it used, and tool versions;
the records are typed (:mod:`sd35trt.artifacts.records`) and a manifest that does not validate is one
:class:`~sd35trt.errors.ManifestError` line naming the file and the field. ``Stage`` and
``FileRecord`` live with the record models and are importable from here too.

Stages publish atomically: they write into a temporary sibling directory, rename it into place,
and only then add their record (the manifest itself is replaced with ``os.replace``). Between
the rename and the record a marker file (``.<dir>.unrecorded``) says that the directory on disk
is not the recorded one, so a stage killed in that window is named as interrupted by every
later check, and re-done by its own next run. A stage killed at any other point leaves the old
complete state or a record-less directory that the next stage refuses; its leftovers are
removed by the next run of the same stage, whatever that run decides.

Every path a record names must stay inside the directory it is anchored at: absolute paths,
``..`` and symlinks anywhere on the way are refused before a byte is read.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import mmap
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from sd35trt.artifacts.containment import contained_path
from sd35trt.artifacts.records import RECORD_TYPES, FileRecord, ManifestFile, Stage, StageRecord
from sd35trt.errors import (
    ManifestError,
    StaleArtifactError,
    UnsafeArtifactError,
    VerificationError,
    validation_message,
)

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _mismatch(path: Path, digest: str, expected: str, what: str, fix: str) -> VerificationError:
    return VerificationError(
        f"{path} sha256 {digest[:12]}… does not match the {what}'s {expected[:12]}… (modified or "
        f"corrupted); {fix}"
    )


def check_file_digest(path: str | Path, sha256: str, what: str, fix: str) -> None:
    """Hash ``path`` once and compare with ``sha256``.

    Raises:
        VerificationError: naming the file, both digests' prefixes, ``what`` recorded it and ``fix``.
    """
    digest = sha256_file(path)
    if digest != sha256:
        raise _mismatch(Path(path), digest, sha256, what, fix)


def read_verified(path: str | Path, sha256: str, what: str, fix: str) -> bytes:
    """The bytes of ``path``, read once and checked against ``sha256`` before anyone parses them.

    Raises:
        VerificationError: the bytes read do not match (see :func:`check_file_digest`).
    """
    data = Path(path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise _mismatch(Path(path), digest, sha256, what, fix)
    return data


@contextlib.contextmanager
def map_verified(path: str | Path, sha256: str, size: int, what: str, fix: str) -> Iterator[mmap.mmap]:
    """Memory-map ``path`` read-only and check its sha256 on the mapping itself.

    The mapping is the only host copy: hashing pages it in from the page cache, and a consumer
    (TensorRT's ``deserialize_cuda_engine``) reads the very same buffer, so the bytes it sees are
    the bytes that were checked, with no second copy in process memory. Files are replaced by
    rename (the atomic writers here, ``tar``, ``cp`` to a new name), which leaves the mapped inode
    intact; only a writer modifying the file in place during the load could change what is read,
    and that needs write access to the engines directory.

    Args:
        path: the file.
        sha256: its expected sha256.
        size: its expected size in bytes (checked first: a truncated file fails without hashing).
        what: who recorded the digest (for the message), e.g. ``"engine manifest"``.
        fix: what to do about a mismatch, e.g. ``"rebuild with `sd35trt build`"``.

    Raises:
        VerificationError: missing, another size, or another sha256.
    """
    path = Path(path)
    try:
        f = open(path, "rb")  # noqa: SIM115 -- closed below, after the mapping
    except FileNotFoundError:
        raise VerificationError(f"{path} is missing; {fix}") from None
    with f:
        found = os.fstat(f.fileno()).st_size
        if found != size or size == 0:
            raise VerificationError(f"{path} has {found} bytes, the {what} records {size}; {fix}")
        mapping = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    try:
        digest = hashlib.sha256(mapping).hexdigest()
        if digest != sha256:
            raise _mismatch(path, digest, sha256, what, fix)
        yield mapping
    finally:
        mapping.close()


class HashCache:
    """sha256 of files keyed on (size, mtime, inode), for freshness checks in ``make`` chains.

    A file whose size, modification time (ns) and inode are unchanged since it was hashed is not
    read again. This is for deciding whether a stage has anything to do; anything that loads or
    ships bytes (``run``, ``serve``, ``verify``, ``package``) hashes them itself.
    The cache lives in ``<run dir>/.sha256-cache.json`` and is rewritten atomically.
    """

    NAME = ".sha256-cache.json"

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / self.NAME
        self._entries: dict[str, list] = {}
        self._dirty = False
        try:
            data = json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return
        if isinstance(data, dict):
            self._entries = {k: v for k, v in data.items() if isinstance(v, list) and len(v) == 4}

    def sha256(self, path: str | Path) -> str:
        """The file's sha256, from the cache when its size, mtime and inode match."""
        path = Path(path)
        st = path.stat()
        key = str(path.absolute())
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        entry = self._entries.get(key)
        if entry is not None and entry[:3] == stamp:
            return str(entry[3])
        digest = sha256_file(path)
        self._entries[key] = [*stamp, digest]
        self._dirty = True
        return digest

    def save(self) -> None:
        """Write the cache back (when anything was hashed); a failure to write is not an error."""
        if self._dirty:
            with contextlib.suppress(OSError):
                atomic_write_json(self.path, self._entries)
            self._dirty = False


def file_record(root: str | Path, path: str | Path) -> FileRecord:
    """Record ``path`` (absolute, or relative to ``root``) with its size and sha256."""
    root, path = Path(root).absolute(), Path(path)
    full = path if path.is_absolute() else root / path
    return FileRecord(full.relative_to(root).as_posix(), full.stat().st_size, sha256_file(full))


def records_for_tree(root: str | Path, subdir: str | Path) -> list[FileRecord]:
    """Records of every regular file below ``root/subdir``, sorted by path."""
    root = Path(root).absolute()
    base = root / subdir
    return [file_record(root, p) for p in sorted(base.rglob("*")) if p.is_file()]


def verify_files(
    root: str | Path,
    files: Iterable[FileRecord],
    what: str = "",
    *,
    cache: HashCache | None = None,
    contents: bool = True,
) -> None:
    """Check that every file exists with its recorded size and sha256.

    Paths are checked first (inside ``root``, no symlink: see :func:`contained_path`); sizes are
    checked before hashing, so a truncated multi-GB file fails fast. Every problem is collected
    and reported together.

    Args:
        root: the directory the records are relative to.
        files: the records.
        what: prefix of the error message.
        cache: reuse digests of unchanged files (freshness checks only; see :class:`HashCache`).
        contents: ``False`` checks presence and sizes only, for files whose reader hashes the
            bytes it loads itself (engines).

    Raises:
        UnsafeArtifactError: a recorded path leaves ``root`` or goes through a symlink (every
            other problem is listed with it).
        VerificationError: naming each missing, resized or modified file.
    """
    root = Path(root)
    problems = []
    unsafe = False
    for rec in files:
        try:
            p = contained_path(root, rec.path)
        except UnsafeArtifactError as err:
            problems.append(str(err))
            unsafe = True
            continue
        if not p.is_file():
            problems.append(f"{p} is missing")
            continue
        size = p.stat().st_size
        if size != rec.size:
            problems.append(f"{p} has {size} bytes, the manifest records {rec.size} (truncated or replaced)")
            continue
        if not contents:
            continue
        digest = cache.sha256(p) if cache is not None else sha256_file(p)
        if digest != rec.sha256:
            problems.append(
                f"{p} sha256 {digest[:12]}… does not match the manifest's {rec.sha256[:12]}… (modified)"
            )
    if cache is not None:
        cache.save()
    if problems:
        prefix = f"{what}: " if what else ""
        raise (UnsafeArtifactError if unsafe else VerificationError)(prefix + "; ".join(problems))


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


def record_digest(record: StageRecord) -> str:
    """Digest of a stage record: downstream records name their inputs by it."""
    return record.digest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def published_file_mode() -> int:
    """The mode a new file gets under the process umask (``mkstemp`` files are 0600 until set)."""
    return 0o666 & ~_umask()


def atomic_write_bytes(path: str | Path, data: bytes | memoryview) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place.

    A reader sees either the old file or the whole new one; a killed writer leaves only a hidden
    ``.<name>.*.tmp`` file, never a partial ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, published_file_mode())  # mkstemp makes 0600
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (see :func:`atomic_write_text`)."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: Path, what: str) -> dict:
    """The JSON object in ``path``.

    Raises:
        ManifestError: the file is missing, not JSON or not an object (``what``: what to do then).
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(f"{path} does not exist") from None
    return _json_object(path, raw, what)


def _json_object(path: Path, raw: bytes, what: str) -> dict:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path} is not valid JSON ({err}); {what}") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path} is not a JSON object; {what}")
    return data


def _leftovers(run_dir: Path, name: str) -> list[Path]:
    return [*run_dir.glob(f".{name}.tmp-*"), *run_dir.glob(f".{name}.old-*")]


def clean_leftovers(run_dir: str | Path, name: str) -> list[Path]:
    """Remove what a killed run of the stage writing ``run_dir/name`` left behind.

    Also removes the temporary files of an interrupted write of the run manifest or the hash
    cache. Call it only
    while holding the run directory's lock (:mod:`sd35trt.artifacts.runlock`): another writer's staging
    directory looks the same.
    """
    run_dir = Path(run_dir)
    removed = [
        *_leftovers(run_dir, name),
        *run_dir.glob(f".{MANIFEST_NAME}.*.tmp"),
        *run_dir.glob(f".{HashCache.NAME}.*.tmp"),
    ]
    for p in removed:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return removed


def unrecorded_marker(run_dir: str | Path, stage: Stage) -> Path:
    """The file saying ``stage``'s directory was published and its record not yet written."""
    return Path(run_dir) / f".{stage.directory}.unrecorded"


@contextlib.contextmanager
def staged_directory(run_dir: str | Path, name: str, marker: Path | None = None) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces ``run_dir/name`` on success.

    On an exception the temporary directory is removed and ``run_dir/name`` is untouched.

    Args:
        run_dir: the parent of the published directory.
        name: the published directory's name.
        marker: a file created just before the rename (stages pass :func:`unrecorded_marker`,
            which :meth:`RunManifest.put` removes once the record is written).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    clean_leftovers(run_dir, name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=run_dir)).absolute()
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; published dirs get the usual mode
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
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


def staged_output(run_dir: str | Path, stage: Stage) -> contextlib.AbstractContextManager[Path]:
    """:func:`staged_directory` for ``stage``'s output, with its :func:`unrecorded_marker`."""
    return staged_directory(run_dir, stage.directory, marker=unrecorded_marker(run_dir, stage))


class RunManifest:
    """``runs/<name>/manifest.json``: at most one typed record per stage.

    The records are :mod:`sd35trt.artifacts.records`'s.

    Every read parses and validates the whole file, so a record edited by hand or written by
    another version is reported (one line naming the file and the field) before it is used.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / MANIFEST_NAME

    def load(self) -> dict[Stage, StageRecord]:
        """The records in the file (none when it does not exist yet).

        Raises:
            ManifestError: the file is not JSON, has another format version, or a field does not
                match its schema (the message names the file and the field, e.g.
                ``records.export.details.components.transformer.onnx``).
        """
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        fix = "delete it and re-run the stages"
        data = _json_object(self.path, raw, fix)
        if data.get("format") != FORMAT_VERSION:
            raise ManifestError(
                f"{self.path} has format {data.get('format')!r}, this sd35trt reads format "
                f"{FORMAT_VERSION}: {fix}"
            )
        try:
            # JSON-mode strict validation: no coercion, so a valid record dumps back to the same
            # JSON and keeps the digest its downstream records name it by.
            parsed = ManifestFile.model_validate_json(raw, strict=True)
        except ValidationError as err:
            raise ManifestError(validation_message(err, str(self.path)) + f"; {fix}") from None
        return parsed.records.by_stage()

    def get(self, stage: Stage) -> StageRecord | None:
        return self.load().get(stage)

    def require(self, stage: Stage, hint: str = "") -> StageRecord:
        """The record of ``stage``.

        Raises:
            ManifestError: there is none (the message says which command to run), or the
                manifest does not validate.
        """
        rec = self.get(stage)
        if rec is None:
            raise self._missing(stage, hint)
        return rec

    def _missing(self, stage: Stage, hint: str) -> ManifestError:
        cmd = f"`sd35trt {stage.value}`" + (f" {hint}" if hint else "")
        return ManifestError(f"{self.run_dir} has no {stage.value} record: run {cmd} first")

    def put(self, stage: Stage, record: StageRecord) -> None:
        """Add or replace the record of ``stage`` (atomically, after its files are in place).

        Removes the stage's :func:`unrecorded_marker`: directory and record agree again.

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

    def verified(
        self,
        stage: Stage,
        config_digest: str | None = None,
        hint: str = "",
        *,
        cache: HashCache | None = None,
    ) -> StageRecord:
        """The record of ``stage`` after checking its files, its config digest and its upstream.

        Args:
            stage: the stage whose output is about to be used.
            config_digest: the current digest of ``stage.config_sections``; ``None`` skips it.
            hint: appended to the suggested command (e.g. ``--config configs/tiny.yaml``).
            cache: reuse digests of unchanged files (a freshness check, not a load).

        Raises:
            ManifestError: no record, or the manifest does not validate.
            StaleArtifactError: the config changed since, an upstream stage re-ran since, or the
                stage was interrupted between publishing its directory and recording it.
            VerificationError: a file is missing or differs from its record.
        """
        records = self.load()
        rec = records.get(stage)
        if rec is None:
            raise self._missing(stage, hint)
        rerun = f"`sd35trt {stage.value}" + (f" {hint}`" if hint else "`")
        if unrecorded_marker(self.run_dir, stage).exists():
            raise StaleArtifactError(
                f"the {stage.value} output in {self.run_dir} was published but never recorded (the last "
                f"`sd35trt {stage.value}` was interrupted); re-run {rerun}, which redoes it"
            )
        if config_digest is not None and rec.config_digest != config_digest:
            sections = ", ".join(stage.config_sections)
            raise StaleArtifactError(
                f"the {stage.value} output in {self.run_dir} is stale: config sections [{sections}] changed "
                f"since it was made; re-run {rerun}"
            )
        up = stage.upstream
        if up is not None and up in rec.upstream:
            current = records.get(up)
            if current is None or current.digest() != rec.upstream[up]:
                raise StaleArtifactError(
                    f"the {stage.value} output in {self.run_dir} was made from an older {up.value} output; "
                    f"re-run {rerun}"
                )
        verify_files(self.run_dir, rec.files, what=f"{stage.value} output (re-run {rerun})", cache=cache)
        return rec


def is_fresh(run_dir: str | Path, stage: Stage, config_digest: str) -> bool:
    """Whether ``stage``'s output is complete, intact and made from the current config and upstream.

    Stages use this to do nothing when re-run on unchanged inputs (``make`` chains them); files
    unchanged since they were last hashed (size, mtime, inode) are not hashed again. A manifest
    that does not validate is not "not fresh": its error propagates.

    Raises:
        ManifestError: the manifest is not readable or does not validate (not raised for a
            missing, stale or damaged record: those return ``False``).
    """
    manifest = RunManifest(run_dir)
    manifest.load()  # an unreadable manifest is the user's to fix, not a reason to redo the stage
    try:
        manifest.verified(stage, config_digest, cache=HashCache(run_dir))
    except ManifestError:
        return False
    return True


def new_record(
    stage: Stage,
    config_digest: str,
    files: Iterable[FileRecord],
    upstream: dict[Stage, StageRecord] | None = None,
    *,
    details: Any,
) -> StageRecord:
    """A record of ``stage`` ready for :meth:`RunManifest.put`, created now with this machine's versions.

    Args:
        stage: the stage writing it.
        config_digest: digest of ``stage.config_sections`` of the config it ran with.
        files: the files it wrote (relative to the run directory).
        upstream: the upstream records it read (named by their digests).
        details: the stage's own details model (e.g. :class:`~sd35trt.artifacts.records.ExportDetails`).

    Raises:
        pydantic.ValidationError: ``details`` is not the stage's details model (a bug).
    """
    return RECORD_TYPES[stage](
        stage=stage,
        created=now_utc(),
        config_digest=config_digest,
        upstream={s: r.digest() for s, r in (upstream or {}).items()},
        versions=tool_versions(),
        files=tuple(files),
        details=details,
    )
