"""``sd35trt package`` and ``sd35trt verify``: the deployment artefact.

An artefact is a ``.tar.gz`` with one top-level directory::

    sd35trt-<name>/
      SHA256SUMS          sha256 of every other file (``sha256sum -c`` format)
      engines/            engines, engines/manifest.json, tokenizers, scheduler config, and
                          config.yaml (the config the engines were made with)

``verify`` checks an artefact (file or unpacked directory) completely and reports every problem:
checksum mismatches, missing and unexpected files, and whether this machine can load the engines
(backend installed, TensorRT version, GPU compute capability).
"""

from __future__ import annotations

import os
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from sd35trt.errors import ManifestError, Sd35TrtError, VerificationError
from sd35trt.manifest import RunManifest, Stage, sha256_file, verify_files

CHECKSUMS = "SHA256SUMS"
ENGINES = "engines"


@dataclass
class VerifyReport:
    """What ``verify`` found. ``ok`` when ``problems`` is empty."""

    root: Path
    files_checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def engines_dir_of(path: str | Path) -> Path:
    """The engines directory of ``path``: an engines directory itself, or an unpacked artefact."""
    path = Path(path)
    if (path / ENGINES / "manifest.json").is_file():
        return path / ENGINES
    return path


def package(run_dir: str | Path, out: str | Path) -> Path:
    """Pack a built run directory into a verified ``.tar.gz`` artefact.

    The engines are verified first; the archive is written beside ``out`` and renamed into place.

    Returns:
        ``out`` as a Path.

    Raises:
        ManifestError / VerificationError: the run has no intact build.
        Sd35TrtError: ``out`` does not end in ``.tar.gz``.
    """
    from sd35trt.runtime.engines import read_engine_manifest

    run_dir, out = Path(run_dir), Path(out)
    if not out.name.endswith(".tar.gz"):
        raise Sd35TrtError(f"--out {out} must end in .tar.gz")
    RunManifest(run_dir).verified(Stage.BUILD)
    engines = run_dir / Stage.BUILD.directory
    # Files only: the machine that packs need not be the one that runs (``verify`` checks that).
    manifest = read_engine_manifest(engines)
    verify_files(manifest.directory, _engine_files(manifest), what=f"engines in {engines}")
    top = f"sd35trt-{run_dir.name}"
    members = [
        (p, f"{ENGINES}/{p.relative_to(engines).as_posix()}")
        for p in sorted(engines.rglob("*"))
        if p.is_file()
    ]
    sums = "".join(f"{sha256_file(src)}  {name}\n" for src, name in members)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        with tarfile.open(tmp, "w:gz") as tar:
            sums_file = Path(tmp + ".sums")
            sums_file.write_text(sums)
            try:
                tar.add(sums_file, arcname=f"{top}/{CHECKSUMS}")
            finally:
                sums_file.unlink()
            for src, name in members:
                tar.add(src, arcname=f"{top}/{name}")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def unpack(archive: str | Path, dest: str | Path) -> Path:
    """Extract an artefact safely (no absolute paths, no ``..``, no links) into ``dest``.

    Returns:
        The artefact's top-level directory inside ``dest``.

    Raises:
        VerificationError: not a readable archive, or it holds unsafe or several top-level entries.
    """
    archive, dest = Path(archive), Path(dest)
    try:
        with tarfile.open(archive, "r:*") as tar:
            tops = {Path(m.name).parts[0] for m in tar.getmembers() if m.name}
            if len(tops) != 1:
                raise VerificationError(
                    f"{archive} should hold one top-level directory, found {sorted(tops)}"
                )
            # The "data" filter refuses absolute paths, ".." and links that escape dest.
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, OSError, EOFError) as err:
        raise VerificationError(f"{archive} is not a readable artefact: {err}") from None
    return dest / tops.pop()


def _engine_files(manifest) -> list:
    return [f for rec in manifest.engines.values() for f in rec.files] + list(manifest.support_files)


def verify(path: str | Path, machine=None) -> VerifyReport:
    """Check an artefact (``.tar.gz`` or unpacked directory) and report every problem.

    Args:
        path: the archive, its unpacked top-level directory, or an engines directory.
        machine: a ``MachineInfo`` to check against (default: detected when TensorRT engines are present).

    Returns:
        A report listing every problem (empty when the artefact verifies and fits this machine).
    """
    path = Path(path)
    if path.is_file():
        with tempfile.TemporaryDirectory(prefix="sd35trt-verify-") as tmp:
            try:
                top = unpack(path, tmp)
            except VerificationError as err:
                return VerifyReport(root=path, problems=[str(err)])
            report = verify(top, machine)
            report.root = path
            return report
    report = VerifyReport(root=path)
    # An engines directory (runs/<name>/engines) has no SHA256SUMS: its manifest records every file.
    engines_only = not (path / ENGINES / "manifest.json").is_file() and (path / "manifest.json").is_file()
    if (path / CHECKSUMS).is_file():
        _check_sums(path, report)
    elif not engines_only:
        report.problems.append(f"{path / CHECKSUMS} is missing (not an artefact made by `sd35trt package`)")
    _check_engines(engines_dir_of(path), machine, report, count_files=engines_only)
    return report


def _check_sums(root: Path, report: VerifyReport) -> None:
    listed: dict[str, str] = {}
    for n, line in enumerate((root / CHECKSUMS).read_text().splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            report.problems.append(f"{CHECKSUMS} line {n} is malformed: {line[:80]!r}")
            continue
        listed[name] = digest
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {CHECKSUMS}
    for name in sorted(set(listed) - present):
        report.problems.append(f"{name} is missing")
    for name in sorted(present - set(listed)):
        report.problems.append(f"{name} is an unexpected file (not in {CHECKSUMS})")
    for name in sorted(set(listed) & present):
        report.files_checked += 1
        if sha256_file(root / name) != listed[name]:
            report.problems.append(f"{name} sha256 does not match {CHECKSUMS} (modified or corrupted)")


def _check_engines(engines: Path, machine, report: VerifyReport, count_files: bool = False) -> None:
    from sd35trt.runtime.backends import backend_of
    from sd35trt.runtime.engines import MachineInfo, check_compatible, read_engine_manifest

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
    backend = backend_of(manifest.backend)
    report.problems.extend(backend.runtime_problems())
    if backend.needs_machine_check:
        try:
            check_compatible(manifest, machine or MachineInfo.detect())
        except VerificationError as err:
            report.problems.append(str(err))
