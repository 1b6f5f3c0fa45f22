"""``sd35trt package`` and ``sd35trt verify``: the deployment artefact.

An artefact is a ``.tar.gz`` with one top-level directory::

    sd35trt-<name>/
      SHA256SUMS          sha256 of every other file (``sha256sum -c`` format); first member
      engines/            engines/manifest.json (second member: the size of every other file),
                          engines, tokenizers, scheduler config, and config.yaml (the config the
                          engines were made with)

An artefact comes from elsewhere and is hostile until verified (faults.md cases 20 and 21).
Unpacking streams the archive once and extracts nothing it has not declared: the two leading index
files under a size cap, then only regular files the engine manifest lists, with exactly the size
it records (bounded by the archive's size times :data:`MAX_EXPANSION`). Absolute names, ``..``,
links, devices, sparse files, duplicates and paths deeper than :data:`MAX_DEPTH` are refused with
one line; nothing is left behind.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import tarfile
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from sd35trt.artifacts.containment import check_onnx_external_data, contained_path
from sd35trt.artifacts.files import published_file_mode, sha256_file, verify_files
from sd35trt.artifacts.manifest import MANIFEST_NAME, RunManifest, Stage
from sd35trt.artifacts.runlock import engines_instead_of_run, run_dir_lock
from sd35trt.artifacts.tar_stream import tar_stream
from sd35trt.errors import (
    ManifestError,
    RunDirError,
    Sd35TrtError,
    UnsafeArtifactError,
    VerificationError,
    write_error,
)

CHECKSUMS = "SHA256SUMS"
ENGINES = "engines"
ENGINE_MANIFEST = f"{ENGINES}/manifest.json"
#: Deepest path in an artefact, its top-level directory included (the layout needs 4).
MAX_DEPTH = 16
#: Largest ``SHA256SUMS`` or engine manifest read into memory (bytes).
MAX_INDEX_BYTES = 16 * 2**20
#: Most the declared contents may exceed the archive's own size by: engines and weights barely
#: compress (x1.1 to x2), so a larger ratio is a decompression bomb, not an artefact.
MAX_EXPANSION = 100
_CHUNK = 1 << 20


@dataclass
class VerifyReport:
    """What ``verify`` found. ``ok`` when ``problems`` is empty."""

    root: Path
    files_checked: int = 0
    problems: list[str] = field(default_factory=list)
    #: Not problems: e.g. TensorRT-RTX engines checked on a machine without a GPU, and where they run.
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def engines_dir_of(path: str | Path) -> Path:
    """The engines directory of ``path``: an engines directory itself, or an unpacked artefact."""
    path = Path(path)
    if (path / ENGINES / "manifest.json").is_file():
        return path / ENGINES
    return path


def _refuse_engines_dir(run_dir: Path) -> None:
    """Raises RunDirError when ``run_dir`` is an engines directory or an unpacked artefact."""
    engines = engines_instead_of_run(run_dir)
    if engines is None or (engines != run_dir and not (run_dir / CHECKSUMS).is_file()):
        return
    parent = run_dir.parent
    built_in = (
        f" (this one's is {parent})" if engines == run_dir and (parent / MANIFEST_NAME).is_file() else ""
    )
    raise RunDirError(
        f"{run_dir} is an engines directory (or an unpacked artefact), not a run directory: `sd35trt "
        f"package` packs the run directory the engines were built in{built_in}; the engines are served as "
        f"they are with `--engines {engines}`; nothing was written"
    )


def package(run_dir: str | Path, out: str | Path) -> Path:
    """Pack a built run directory into a verified ``.tar.gz`` artefact, under the run directory's lock.

    The archive is written beside ``out`` and renamed into place. ``SHA256SUMS`` and
    ``engines/manifest.json`` come first, so :func:`unpack` knows every size before it extracts
    anything. Exactly the files the engine manifest declares are shipped (faults.md #32).

    Returns:
        ``out`` as a Path.

    Raises:
        ManifestError / VerificationError: the run has no intact build.
        RunDirBusyError: a stage is writing the run directory.
        RunDirError: the run directory cannot be locked (read-only).
        Sd35TrtError: ``out`` does not end in ``.tar.gz``.
    """
    from sd35trt.artifacts.engine_manifest import ENGINE_MANIFEST_NAME, read_engine_manifest

    run_dir, out = Path(run_dir), Path(out)
    if not out.name.endswith(".tar.gz"):
        raise Sd35TrtError(f"--out {out} must end in .tar.gz")
    _refuse_engines_dir(run_dir)
    if not (run_dir / MANIFEST_NAME).is_file():  # refused before the lock file is written beside it
        state = "does not exist" if not run_dir.exists() else f"has no {MANIFEST_NAME}, so no build record"
        raise ManifestError(
            f"{run_dir} {state}: `sd35trt package` packs a run directory after `sd35trt build`; "
            "nothing was written"
        )
    with run_dir_lock(run_dir, "package"):
        RunManifest(run_dir).verified(Stage.BUILD)
        engines = run_dir / Stage.BUILD.directory
        # Files only: the machine that packs need not be the one that runs (``verify`` checks that).
        manifest = read_engine_manifest(engines)
        declared = _engine_files(manifest)
        verify_files(manifest.directory, declared, what=f"engines in {engines}")
        members = [
            (engines / rel, f"{ENGINES}/{rel}") for rel in (ENGINE_MANIFEST_NAME, *(f.path for f in declared))
        ]
        sums = "".join(f"{sha256_file(src)}  {name}\n" for src, name in members).encode()
        top = f"sd35trt-{run_dir.name}"
        out.parent.mkdir(parents=True, exist_ok=True)
        for stale in out.parent.glob(f".{out.name}.*.tmp"):  # a killed package's leftovers
            stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.fchmod(fd, published_file_mode())  # readable by a service user, as any file written here
        os.close(fd)
        try:
            with tarfile.open(tmp, "w:gz") as tar:
                info = tarfile.TarInfo(f"{top}/{CHECKSUMS}")
                info.size, info.mode, info.mtime = len(sums), 0o644, int(time.time())
                tar.addfile(info, io.BytesIO(sums))
                for src, name in members:
                    tar.add(src, arcname=f"{top}/{name}")
            os.replace(tmp, out)
        except BaseException as err:
            user = write_error(err, out) if isinstance(err, OSError) else None
            Path(tmp).unlink(missing_ok=True)
            if user is not None:
                raise user from None
            raise
    return out


def _member_parts(member: tarfile.TarInfo, archive: Path) -> tuple[str, ...]:
    """The path components of a member; raises UnsafeArtifactError for an absolute name, ``..``, a
    path deeper than :data:`MAX_DEPTH`, or a member that is not a regular file or directory."""
    name = member.name
    parts = PurePosixPath(name).parts
    if not parts or name.startswith("/") or ".." in parts or "\0" in name:
        raise UnsafeArtifactError(f"{archive}: member {name!r} is absolute or leaves the archive ('..')")
    if len(parts) > MAX_DEPTH:
        raise UnsafeArtifactError(
            f"{archive}: member {name[:80]!r}… is nested {len(parts)} levels deep; an artefact has at most "
            f"{MAX_DEPTH}"
        )
    if member.issparse() or not (member.isfile() or member.isdir()):
        kind = (
            "a link"
            if member.issym() or member.islnk()
            else "a sparse file"
            if member.issparse()
            else "a device or fifo"
        )
        raise UnsafeArtifactError(f"{archive}: member {name!r} is {kind}; artefacts hold regular files only")
    return parts


def _copy_member(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    """Write exactly ``member.size`` bytes of ``member`` to a new file ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    source = tar.extractfile(member)
    if source is None:
        raise UnsafeArtifactError(f"member {member.name!r} has no data")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    left = member.size
    with os.fdopen(os.open(target, flags, 0o644), "wb") as f:
        while left > 0:
            chunk = source.read(min(_CHUNK, left))
            if not chunk:
                raise VerificationError(f"member {member.name!r} is truncated")
            f.write(chunk)
            left -= len(chunk)


class _Extraction:
    """The state of one streamed extraction: the index files first, then declared files only."""

    def __init__(self, archive: Path, root: Path) -> None:
        self.archive, self.root = archive, root
        self.top: str | None = None
        self.declared: dict[str, int] | None = None
        self.seen: set[str] = set()
        self.index = 0

    def add(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        parts = _member_parts(member, self.archive)
        if self.top is None:
            self.top = parts[0]
        elif parts[0] != self.top:
            raise UnsafeArtifactError(
                f"{self.archive} should hold one top-level directory, found {self.top!r} and {parts[0]!r}"
            )
        if member.isdir():
            return
        rel = "/".join(parts[1:])
        if not rel or rel in self.seen:
            what = "a file at the top level" if not rel else "twice"
            raise UnsafeArtifactError(f"{self.archive}: member {member.name!r} is {what}")
        self.seen.add(rel)
        expected = {0: CHECKSUMS, 1: ENGINE_MANIFEST}.get(self.index)
        self.index += 1
        if expected is not None:
            if rel != expected:
                raise VerificationError(
                    f"{self.archive}: member {self.index} is {member.name!r}, expected {self.top}/{expected} "
                    "(artefacts made by `sd35trt package` start with SHA256SUMS and engines/manifest.json; "
                    "re-package it)"
                )
            if member.size > MAX_INDEX_BYTES:
                raise UnsafeArtifactError(
                    f"{self.archive}: {member.name} is {member.size} bytes, over the {MAX_INDEX_BYTES} "
                    "bytes an index file may have"
                )
            _copy_member(tar, member, self.root / self.top / rel)
            if rel == ENGINE_MANIFEST:
                self.declared = self._declared_sizes()
            return
        assert self.declared is not None  # set by the second member
        size = self.declared.get(rel)
        if size is None:
            raise UnsafeArtifactError(
                f"{self.archive}: member {member.name!r} is not declared by {ENGINE_MANIFEST}; "
                "nothing beyond the declared files is extracted"
            )
        if member.size != size:
            raise UnsafeArtifactError(
                f"{self.archive}: member {member.name!r} is {member.size} bytes, "
                f"{ENGINE_MANIFEST} declares {size}"
            )
        _copy_member(tar, member, self.root / self.top / rel)

    def _declared_sizes(self) -> dict[str, int]:
        """Engine-manifest path -> size of every file it declares (paths checked for safety)."""
        from sd35trt.artifacts.engine_manifest import read_engine_manifest

        assert self.top is not None
        manifest = read_engine_manifest(self.root / self.top / ENGINES)
        declared = {}
        for rec in _engine_files(manifest):
            parts = PurePosixPath(rec.path).parts
            if not parts or rec.path.startswith("/") or ".." in parts or rec.size < 0:
                raise UnsafeArtifactError(
                    f"{self.archive}: {ENGINE_MANIFEST} declares {rec.path!r} ({rec.size} bytes), which "
                    "leaves the artefact"
                )
            declared[f"{ENGINES}/{PurePosixPath(rec.path).as_posix()}"] = rec.size
        total, limit = sum(declared.values()), MAX_EXPANSION * self.archive.stat().st_size + (1 << 20)
        if total > limit:
            raise UnsafeArtifactError(
                f"{self.archive}: {ENGINE_MANIFEST} declares {total} bytes for an archive of "
                f"{self.archive.stat().st_size} bytes (over {MAX_EXPANSION}x): refused as a "
                "decompression bomb"
            )
        return declared


def unpack(archive: str | Path, dest: str | Path) -> Path:
    """Extract an artefact into ``dest``, through a staging directory renamed into place only when
    every member passed.

    Returns:
        The artefact's top-level directory inside ``dest``.

    Raises:
        UnsafeArtifactError: an unsafe or undeclared member, a size other than the declared
            one, a declared total far beyond the archive's size, or deep nesting (one line).
        VerificationError: not a readable archive, not laid out as ``sd35trt package`` writes
            it, or its top-level directory exists in ``dest`` already.
        ManifestError: the engine manifest inside is malformed (the field is named).
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".unpack.tmp-", dir=dest))
    try:
        job = _Extraction(archive, staging)
        try:
            with tar_stream(archive) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    job.add(tar, member)
        except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
            raise VerificationError(f"{archive} is not a readable artefact: {err}") from None
        if job.top is None or job.declared is None:
            raise VerificationError(f"{archive} holds no {CHECKSUMS} and {ENGINE_MANIFEST}: not an artefact")
        final = dest / job.top
        if final.exists():
            raise VerificationError(f"{final} exists already; unpack into an empty directory")
        os.replace(staging / job.top, final)
        return final
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _engine_files(manifest) -> list:
    return [f for rec in manifest.engines.values() for f in rec.files] + list(manifest.support_files)


def _tree(root: Path, report: VerifyReport) -> set[str]:
    """Regular files below ``root`` (POSIX paths relative to it); symlinks and deep nesting are
    problems. Iterative, so a maliciously deep tree cannot exhaust the recursion limit."""
    files: set[str] = set()
    stack: list[tuple[Path, int]] = [(root, 0)]
    while stack:
        directory, depth = stack.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                path = Path(entry.path)
                rel = path.relative_to(root).as_posix()
                if entry.is_symlink():
                    report.problems.append(
                        f"{rel} is a symlink (to {os.readlink(path)}); artefacts hold regular files only"
                    )
                elif entry.is_dir(follow_symlinks=False):
                    if depth + 1 >= MAX_DEPTH:
                        report.problems.append(f"{rel[:80]}… is nested deeper than {MAX_DEPTH} levels")
                    else:
                        stack.append((path, depth + 1))
                elif stat.S_ISREG(entry.stat(follow_symlinks=False).st_mode):
                    files.add(rel)
                else:
                    report.problems.append(f"{rel} is not a regular file")
    return files


def verify(path: str | Path, machine=None) -> VerifyReport:
    """Check an artefact (archive or unpacked), an engines directory or a run directory holding one.

    Checksums against ``SHA256SUMS`` (else the engine manifest's records), missing, stray and
    symlinked files, and whether ``machine`` (detected when the backend needs it) loads the engines.

    Returns:
        A report listing every problem (empty when the artefact verifies and fits this machine).
    """
    path = Path(path)
    if path.is_file():
        with tempfile.TemporaryDirectory(prefix="sd35trt-verify-") as tmp:
            try:
                top = unpack(path, tmp)
            except ManifestError as err:
                return VerifyReport(root=path, problems=[str(err)])
            report = verify(top, machine)
            report.root = path
            return report
    report = VerifyReport(root=path)
    if not path.is_dir():
        report.problems.append(
            f"{path} does not exist (give an artefact, its unpacked directory or an engines directory)"
        )
        return report
    if (path / CHECKSUMS).is_file():
        _check_sums(path, report)
        _check_engines(engines_dir_of(path), machine, report)
    else:
        engines = engines_dir_of(path)
        _check_engines(engines, machine, report, count_files=True)
        _check_strays(engines, report)
    return report


def _check_sums(root: Path, report: VerifyReport) -> None:
    listed: dict[str, str] = {}
    for n, line in enumerate((root / CHECKSUMS).read_text().splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            report.problems.append(f"{CHECKSUMS} line {n} is malformed: {line[:80]!r}")
            continue
        try:
            contained_path(root, name)
        except UnsafeArtifactError as err:
            report.problems.append(f"{CHECKSUMS} line {n}: {err}")
            continue
        listed[PurePosixPath(name).as_posix()] = digest
    present = _tree(root, report) - {CHECKSUMS}
    for name in sorted(set(listed) - present):
        report.problems.append(f"{name} is missing")
    for name in sorted(present - set(listed)):
        report.problems.append(f"{name} is an unexpected file (not in {CHECKSUMS})")
    for name in sorted(set(listed) & present):
        report.files_checked += 1
        if sha256_file(root / name) != listed[name]:
            report.problems.append(f"{name} sha256 does not match {CHECKSUMS} (modified or corrupted)")


def _check_strays(engines: Path, report: VerifyReport) -> None:
    from sd35trt.artifacts.engine_manifest import ENGINE_MANIFEST_NAME, read_engine_manifest

    if not engines.is_dir():
        return
    try:
        recorded = {PurePosixPath(f.path).as_posix() for f in _engine_files(read_engine_manifest(engines))}
    except ManifestError:
        return  # reported by _check_engines; a folder without a manifest is not walked (`verify /tmp`)
    present = _tree(engines, report)
    for name in sorted(present - recorded - {ENGINE_MANIFEST_NAME}):
        report.problems.append(
            f"{name} is an unexpected file (not recorded in {engines}/{ENGINE_MANIFEST_NAME})"
        )


def _check_engines(engines: Path, machine, report: VerifyReport, count_files: bool = False) -> None:
    from sd35trt.artifacts.engine_manifest import read_engine_manifest
    from sd35trt.backends.load import check_compatible
    from sd35trt.backends.machine import MachineInfo
    from sd35trt.backends.registry import backend_of

    try:
        manifest = read_engine_manifest(engines)
    except ManifestError as err:
        report.problems.append(str(err))
        return
    files = _engine_files(manifest)
    try:
        verify_files(manifest.directory, files, what="engine manifest")
        report.files_checked += len(files) if count_files else 0
    except VerificationError as err:
        report.problems.append(str(err))
    else:  # ONNX engines whose external data leaves the directory, whatever the ONNX Runtime (faults.md #40)
        for onnx in (f for f in files if PurePosixPath(f.path).suffix == ".onnx"):
            try:
                check_onnx_external_data(manifest.directory / onnx.path)
            except UnsafeArtifactError as err:
                report.problems.append(str(err))
    backend = backend_of(manifest.backend)
    report.problems.extend(backend.runtime_problems())
    if backend.needs_machine_check:
        here = machine or MachineInfo.detect()
        if backend.portable and here.gpu is None:
            # Built for GPU targets on a machine without one (CI): the files are what is checked.
            report.notes.append(f"this machine has no CUDA GPU to run them: {backend.runs_on(manifest)}")
            return
        try:
            check_compatible(manifest, here)
        except VerificationError as err:
            report.problems.append(str(err))
