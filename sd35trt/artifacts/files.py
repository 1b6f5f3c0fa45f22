"""Files of run directories and artefacts: sha256 checks before use, a hash cache, file records
and atomic writes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from sd35trt.artifacts.containment import contained_path
from sd35trt.artifacts.records import FileRecord
from sd35trt.errors import UnsafeArtifactError, VerificationError, write_error

_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _compare(path: str | Path, digest: str, expected: str, what: str, fix: str) -> None:
    if digest != expected:
        HashCache.forget(path)  # a freshness check must not call it intact any more
        raise VerificationError(
            f"{path} sha256 {digest[:12]}… does not match the {what}'s {expected[:12]}… (modified or "
            f"corrupted); {fix}"
        )


def check_file_digest(path: str | Path, sha256: str, what: str, fix: str) -> None:
    """Hash ``path`` once and compare with ``sha256``.

    Raises:
        VerificationError: naming the file, both digests' prefixes, ``what`` recorded it and ``fix``.
    """
    _compare(path, sha256_file(path), sha256, what, fix)


def read_verified(path: str | Path, sha256: str, what: str, fix: str) -> bytes:
    """The bytes of ``path``, read once and checked against ``sha256`` before anyone parses them.

    Raises:
        VerificationError: the bytes read do not match (see :func:`check_file_digest`).
    """
    data = Path(path).read_bytes()
    _compare(path, hashlib.sha256(data).hexdigest(), sha256, what, fix)
    return data


@contextlib.contextmanager
def map_verified(path: str | Path, sha256: str, size: int, what: str, fix: str) -> Iterator[mmap.mmap]:
    """Memory-map ``path`` read-only and check its ``size`` (bytes) and sha256 on the mapping itself.

    The mapping is the only host copy: a consumer (TensorRT's ``deserialize_cuda_engine``) reads the
    very buffer that was hashed. Files are replaced by rename (the atomic writers here, ``tar``,
    ``cp`` to a new name), which leaves the mapped inode intact; only an in-place writer with write
    access to the engines directory could change what is read during the load.

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
        _compare(path, hashlib.sha256(mapping).hexdigest(), sha256, what, fix)
        yield mapping
    finally:
        mapping.close()


class HashCache:
    """sha256 of files keyed on (size, mtime, ctime, inode), in ``<run dir>/.sha256-cache.json``,
    for freshness checks in ``make`` chains.

    ``touch -r`` after an in-place edit restores the mtime but not the ctime, so such an edit is
    rehashed (faults.md #30). Bit rot changes neither: every reader that hashes bytes fully
    (``run``, ``serve``, ``verify``, ``package``) and finds a mismatch drops the file's entry
    (:meth:`forget`), so the next stage rehashes it and agrees.
    """

    NAME = ".sha256-cache.json"
    #: How far above a file its run directory's cache is looked for (``engines/tokenizer/x``).
    SEARCH_DEPTH = 3

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / self.NAME
        self._entries: dict[str, list] = {}
        self._dirty = False
        try:
            data = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return
        if isinstance(data, dict):
            self._entries = {k: v for k, v in data.items() if isinstance(v, list) and len(v) == 5}

    def sha256(self, path: str | Path) -> str:
        """The file's sha256, from the cache when its size, mtime, ctime and inode match."""
        path = Path(path)
        st = path.stat()
        key = str(path.absolute())
        stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        entry = self._entries.get(key)
        if entry is not None and entry[:4] == stamp:
            return str(entry[4])
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

    @classmethod
    def forget(cls, path: str | Path) -> None:
        """Drop ``path``'s entry from the cache of the run directory holding it, if there is one."""
        path = Path(path).absolute()
        for parent in path.parents[: cls.SEARCH_DEPTH]:
            if (parent / cls.NAME).is_file():
                cache = cls(parent)
                if cache._entries.pop(str(path), None) is not None:
                    cache._dirty = True
                    cache.save()
                return


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
    """Check that every file exists inside ``root`` with its recorded size and sha256.

    Paths first (:func:`contained_path`), sizes before hashing (a truncated multi-GB file fails
    fast); every problem is reported together, after ``what``.

    Args:
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
            if cache is None:
                HashCache.forget(p)
            problems.append(
                f"{p} sha256 {digest[:12]}… does not match the manifest's {rec.sha256[:12]}… (modified)"
            )
    if cache is not None:
        cache.save()
    if problems:
        prefix = f"{what}: " if what else ""
        raise (UnsafeArtifactError if unsafe else VerificationError)(prefix + "; ".join(problems))


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def published_file_mode() -> int:
    """The mode a new file gets under the process umask (``mkstemp`` files are 0600 until set)."""
    return 0o666 & ~current_umask()


def atomic_write_bytes(path: str | Path, data: bytes | memoryview) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place: a killed writer
    leaves only a hidden ``.<name>.*.tmp`` file, never a partial ``path``."""
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
    except BaseException as err:
        user = write_error(err, path) if isinstance(err, OSError) else None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if user is not None:
            raise user from None
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode())


def json_text(data: Any) -> str:
    """JSON as every manifest is written: sorted keys, indented, a final newline."""
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def atomic_write_json(path: str | Path, data: Any) -> None:
    """Write :func:`json_text` atomically (see :func:`atomic_write_text`)."""
    atomic_write_text(path, json_text(data))
