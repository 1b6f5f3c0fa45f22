"""Artefacts and engines directories from elsewhere, on fabricated files: containment, archive
bombs, unsafe members, and ``verify`` of an engines directory.

faults.md cases 20 (a path that leaves its root: symlink, ``..``, absolute member) and 21 (an
archive that expands beyond its declared contents, or nests deeply). Every archive here is a real
``.tar.gz`` written with ``tarfile``; every symlink a real symlink.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from record_fakes import ENGINE_DIMS

from sd35trt.artifacts.engine_manifest import ENGINE_MANIFEST_NAME, EngineManifest, EngineRecord
from sd35trt.artifacts.files import file_record, sha256_file
from sd35trt.artifacts.manifest import FileRecord
from sd35trt.backends.load import verify_engines
from sd35trt.components import Component, ShapeRange
from sd35trt.config import Backend, Precision
from sd35trt.errors import UnsafeArtifactError, VerificationError
from sd35trt.stages.package import CHECKSUMS, MAX_DEPTH, unpack, verify

DIMS = ENGINE_DIMS
TOP = "sd35trt-fab"


def _write_manifest(engines: Path, paths: dict[Component, str] | None = None) -> None:
    """(Re)write ``engines/manifest.json`` recording the engine files (``paths`` overrides names)."""
    records = {}
    for component in (Component.TRANSFORMER, Component.VAE_DECODER):
        rel = (paths or {}).get(component, f"{component.value}.onnx")
        target = engines / rel
        rec = FileRecord(rel, target.stat().st_size, sha256_file(target))
        records[component] = EngineRecord(
            backend=Backend.ONNXRUNTIME,
            file=rec,
            precision=Precision.FP32,
            fp8=False,
            profile={"latent": ShapeRange((1, 4, 4, 4), (1, 4, 8, 8), (2, 4, 16, 16))},
            source_onnx=FileRecord(f"onnx/{component.value}.onnx", 10, "0" * 64),
            build_seconds=0.5,
        )
    manifest = EngineManifest(
        directory=engines,
        backend=Backend.ONNXRUNTIME,
        engines=records,
        dims=DIMS,
        runtime_defaults={"steps": 8},
        build_settings={"backend": "onnxruntime"},
        support_files=(file_record(engines, engines / "tokenizer" / "vocab.json"),),
    )
    (engines / ENGINE_MANIFEST_NAME).write_text(json.dumps(manifest.to_json()))


def _write_sums(root: Path) -> None:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    lines = [f"{sha256_file(p)}  {p.relative_to(root).as_posix()}" for p in files]
    (root / CHECKSUMS).write_text("\n".join(lines) + "\n")


def _artefact_dir(parent: Path) -> Path:
    """An unpacked artefact as ``sd35trt package`` lays it out (ONNX Runtime engines, stand-in bytes)."""
    root = parent / TOP
    engines = root / "engines"
    (engines / "tokenizer").mkdir(parents=True)
    (engines / "tokenizer" / "vocab.json").write_text('{"a": 0}')
    for i, component in enumerate((Component.TRANSFORMER, Component.VAE_DECODER)):
        (engines / f"{component.value}.onnx").write_bytes(bytes(range(256)) * (4 + i))
    _write_manifest(engines)
    _write_sums(root)
    return root


def _tar(path: Path, root: Path, extra=()) -> Path:
    """Pack ``root`` in ``package``'s order (SHA256SUMS, the engine manifest, the rest), then ``extra``
    members: ``(TarInfo, bytes or a file object)``."""
    first = [root / CHECKSUMS, root / "engines" / ENGINE_MANIFEST_NAME]
    rest = sorted(p for p in root.rglob("*") if p.is_file() and p not in first)
    with tarfile.open(path, "w:gz") as tar:
        for p in first + rest:
            tar.add(p, arcname=f"{root.name}/{p.relative_to(root).as_posix()}")
        for info, data in extra:
            tar.addfile(info, io.BytesIO(data) if isinstance(data, bytes) else data)
    return path


class _Zeros(io.RawIOBase):
    """``n`` zero bytes, read without holding them in memory (the payload of a bomb)."""

    def __init__(self, n: int) -> None:
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        k = min(len(buf), self.left)
        buf[:k] = bytes(k)
        self.left -= k
        return k


def _member(name: str, size: int = 0, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname = size, kind, link
    return info


def _left_in(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*"))


def test_fabricated_artefact_verifies_as_archive_directory_and_engines_dir(tmp_path):
    root = _artefact_dir(tmp_path / "src")
    archive = _tar(tmp_path / "a.tar.gz", root)
    assert verify(archive).ok, verify(archive).problems
    unpacked = unpack(archive, tmp_path / "out")
    assert _left_in(tmp_path / "out") == _left_in(tmp_path / "src")  # nothing more, nothing less
    assert verify(unpacked).ok
    engines = verify(unpacked / "engines")  # no SHA256SUMS: checked against the engine manifest
    assert engines.ok and engines.files_checked == 3, engines.problems


def test_engine_symlinked_to_an_outside_file_is_refused(tmp_path):
    """faults.md 20: the engine is a symlink to a file outside the artefact with the same bytes, so
    every checksum still matches; verify and the runtime's check refuse it before reading it."""
    root = _artefact_dir(tmp_path)
    engine = root / "engines" / "transformer.onnx"
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(engine.read_bytes())
    engine.unlink()
    engine.symlink_to(outside)
    problems = " ".join(verify(root).problems)
    assert "engines/transformer.onnx is a symlink" in problems
    assert "transformer.onnx is a symlink" in " ".join(verify(root / "engines").problems)
    with pytest.raises(UnsafeArtifactError, match=r"transformer\.onnx is a symlink \(to .*outside\.onnx\)"):
        verify_engines(root / "engines")


def test_symlinked_directory_inside_the_artefact_is_refused(tmp_path):
    """faults.md 20, neighbour: a directory on the way is the symlink."""
    root = _artefact_dir(tmp_path)
    tok = root / "engines" / "tokenizer"
    real = tmp_path / "elsewhere"
    tok.rename(real)
    tok.symlink_to(real, target_is_directory=True)
    with pytest.raises(UnsafeArtifactError, match=r"engines/tokenizer is a symlink"):
        verify_engines(root / "engines")
    assert any("tokenizer is a symlink" in p for p in verify(root).problems)


@pytest.mark.parametrize("escape", ["../../outside/transformer.onnx", "/abs/transformer.onnx"])
def test_manifest_path_leaving_the_artefact_is_refused(tmp_path, escape):
    """faults.md 20: the engine manifest names a file outside the artefact (its size and sha256
    match that file); verify, and verify_engines (used by run and serve), refuse before reading."""
    root = _artefact_dir(tmp_path / "art")
    engines = root / "engines"
    target = (engines / escape) if not escape.startswith("/") else Path(escape)
    if not escape.startswith("/"):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((engines / "transformer.onnx").read_bytes())
        _write_manifest(engines, {Component.TRANSFORMER: escape})
    else:
        data = json.loads((engines / ENGINE_MANIFEST_NAME).read_text())
        data["engines"]["transformer"]["file"]["path"] = escape
        (engines / ENGINE_MANIFEST_NAME).write_text(json.dumps(data))
    _write_sums(root)
    with pytest.raises(UnsafeArtifactError, match=r"path '.*transformer\.onnx' recorded in .* leaves it"):
        verify_engines(engines)
    assert any("leaves it" in p for p in verify(root).problems)
    assert any("leaves it" in p for p in verify(engines).problems)


@pytest.mark.parametrize("name", ["../outside.txt", "/etc/hostname", "engines/../../x"])
def test_checksum_line_naming_a_path_outside_is_refused(tmp_path, name):
    """faults.md 20: SHA256SUMS names a path that leaves the artefact; it is never opened."""
    root = _artefact_dir(tmp_path / "art")
    (tmp_path / "outside.txt").write_text("secret")
    with open(root / CHECKSUMS, "a") as f:
        f.write(f"{'0' * 64}  {name}\n")
    problems = verify(root).problems
    assert len(problems) == 1 and f"{CHECKSUMS} line 5: path {name!r}" in problems[0], problems


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (_member("/etc/evil", 4), r"member '/etc/evil' is absolute or leaves the archive"),
        (_member(f"{TOP}/../evil", 4), r"is absolute or leaves the archive \('\.\.'\)"),
        (_member(f"{TOP}/engines/x", kind=tarfile.SYMTYPE, link="/etc/passwd"), r"is a link"),
        (_member(f"{TOP}/engines/y", kind=tarfile.LNKTYPE, link=f"{TOP}/SHA256SUMS"), r"is a link"),
        (_member(f"{TOP}/engines/dev", kind=tarfile.CHRTYPE), r"is a device or fifo"),
        (_member(f"{TOP}/engines/notes.txt", 5), r"is not declared by engines/manifest\.json"),
        (_member("other-top/engines/a", 4), r"one top-level directory, found 'sd35trt-fab' and 'other-top'"),
        (_member(f"{TOP}/engines/tokenizer/vocab.json", 8), r"twice"),
    ],
)
def test_unsafe_or_undeclared_member_is_refused_and_nothing_is_left(tmp_path, member, message):
    """faults.md 20 and 21: one line naming the member; the destination holds nothing after."""
    root = _artefact_dir(tmp_path / "src")
    archive = _tar(tmp_path / "a.tar.gz", root, extra=[(member, b"x" * member.size)])
    with pytest.raises(VerificationError, match=message):
        unpack(archive, tmp_path / "out")
    assert _left_in(tmp_path / "out") == []
    assert (tmp_path / "escape").exists() is False and not (tmp_path / "evil").exists()
    report = verify(archive)
    assert len(report.problems) == 1 and "\n" not in report.problems[0]


def test_archive_whose_members_are_all_absolute_is_refused(tmp_path):
    """faults.md 20: verify must not inspect the host's / through absolute members."""
    archive = tmp_path / "abs.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("/SHA256SUMS", "/engines/manifest.json", "/etc/hostname"):
            tar.addfile(_member(name, 2), io.BytesIO(b"{}"))
    problems = verify(archive).problems
    assert len(problems) == 1 and "member '/SHA256SUMS' is absolute" in problems[0]


def test_tarball_nested_1200_levels_is_refused_without_recursion(tmp_path):
    """faults.md 21: 1,200 nested directories gave a RecursionError traceback; now one line."""
    root = _artefact_dir(tmp_path / "src")
    deep = f"{TOP}/engines/" + "d/" * 1200 + "f"
    archive = _tar(tmp_path / "deep.tar.gz", root, extra=[(_member(deep, 1), b"x")])
    with pytest.raises(
        UnsafeArtifactError, match=rf"nested 1203 levels deep; an artefact has at most {MAX_DEPTH}"
    ):
        unpack(archive, tmp_path / "out")
    assert _left_in(tmp_path / "out") == []


def test_directory_nested_deeper_than_an_artefact_is_reported(tmp_path):
    """faults.md 21, on an unpacked directory: reported, not walked without bound."""
    root = _artefact_dir(tmp_path)
    deep = root / "engines"
    for _ in range(MAX_DEPTH + 4):
        deep = deep / "d"
        deep.mkdir()
    problems = verify(root).problems
    assert any(f"nested deeper than {MAX_DEPTH} levels" in p for p in problems), problems


def test_undeclared_zero_bomb_is_refused_before_it_is_decompressed(tmp_path):
    """faults.md 21: a valid artefact plus a 64 MiB zero file (64 KiB compressed): refused at
    its header, since the engine manifest declares no such file; nothing is written."""
    root = _artefact_dir(tmp_path / "src")
    n = 64 << 20
    bomb = (_member(f"{TOP}/engines/zeros.bin", n), _Zeros(n))
    archive = _tar(tmp_path / "bomb.tar.gz", root, extra=[bomb])
    assert archive.stat().st_size < n // 500
    with pytest.raises(UnsafeArtifactError, match=r"zeros\.bin' is not declared"):
        unpack(archive, tmp_path / "out")
    assert _left_in(tmp_path / "out") == []


def test_declared_bomb_is_refused_by_the_expansion_bound(tmp_path):
    """faults.md 21, neighbour: the bomb is declared in the engine manifest (and SHA256SUMS) with
    its true size; the declared total, far beyond the archive's size, is refused up front."""
    root = _artefact_dir(tmp_path / "src")
    n = 64 << 20
    engines = root / "engines"
    data = json.loads((engines / ENGINE_MANIFEST_NAME).read_text())
    data["support_files"].append({"path": "zeros.bin", "size": n, "sha256": "0" * 64})
    (engines / ENGINE_MANIFEST_NAME).write_text(json.dumps(data))
    _write_sums(root)
    archive = _tar(
        tmp_path / "bomb.tar.gz", root, extra=[(_member(f"{TOP}/engines/zeros.bin", n), _Zeros(n))]
    )
    with pytest.raises(UnsafeArtifactError, match=r"declares \d+ bytes for an archive of \d+ bytes .* bomb"):
        unpack(archive, tmp_path / "out")
    assert _left_in(tmp_path / "out") == []


def test_member_larger_than_declared_is_refused(tmp_path):
    """faults.md 21: a member whose header size differs from the manifest's record is not extracted."""
    root = _artefact_dir(tmp_path / "src")
    engine = root / "engines" / "vae_decoder.onnx"
    engine.write_bytes(engine.read_bytes() + bytes(4096))  # the manifest still records 1280 bytes
    archive = _tar(tmp_path / "big.tar.gz", root)
    with pytest.raises(
        UnsafeArtifactError, match=r"vae_decoder\.onnx' is 5376 bytes, engines/manifest\.json declares 1280"
    ):
        unpack(archive, tmp_path / "out")


def test_archive_not_in_package_order_is_refused_with_the_fix(tmp_path):
    """An archive whose index files do not come first (older ``package``, or ``tar`` by hand)."""
    root = _artefact_dir(tmp_path / "src")
    archive = tmp_path / "old.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for p in sorted(root.rglob("*"), reverse=True):
            if p.is_file():
                tar.add(p, arcname=f"{TOP}/{p.relative_to(root).as_posix()}")
    with pytest.raises(
        VerificationError, match=r"member 1 is .*expected sd35trt-fab/SHA256SUMS .* re-package"
    ):
        unpack(archive, tmp_path / "out")


def test_unpack_refuses_to_merge_into_an_existing_directory(tmp_path):
    root = _artefact_dir(tmp_path / "src")
    archive = _tar(tmp_path / "a.tar.gz", root)
    (tmp_path / "out" / TOP).mkdir(parents=True)
    (tmp_path / "out" / TOP / "keep.txt").write_text("mine")
    with pytest.raises(VerificationError, match=r"exists already"):
        unpack(archive, tmp_path / "out")
    assert _left_in(tmp_path / "out") == [TOP, f"{TOP}/keep.txt"]


def test_engines_directory_strays_and_damage_are_listed(tmp_path):
    """``sd35trt verify ENGINES_DIR``: no SHA256SUMS there, so the engine manifest's records are
    the reference; stray files and modified engines are named."""
    engines = _artefact_dir(tmp_path) / "engines"
    (engines / "notes.txt").write_text("stray")
    with open(engines / "transformer.onnx", "r+b") as f:
        f.write(b"\xff")
    problems = " ".join(verify(engines).problems)
    assert "notes.txt is an unexpected file (not recorded in" in problems
    assert "transformer.onnx sha256" in problems
    assert "SHA256SUMS" not in problems


def test_cli_verify_prints_one_line_per_problem_without_traceback(tmp_path):
    """faults.md 20/21 at the CLI: problems listed, one error line, exit 1, no traceback."""
    root = _artefact_dir(tmp_path / "src")
    archive = _tar(tmp_path / "a.tar.gz", root, extra=[(_member(f"{TOP}/../evil", 4), b"evil")])
    env = {k: v for k, v in os.environ.items() if k != "SD35TRT_DEBUG"}
    done = subprocess.run(
        [sys.executable, "-m", "sd35trt.cli", "verify", str(archive)], capture_output=True, text=True, env=env
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "1 problem(s) found" in lines[-1]
    assert "absolute or leaves the archive" in lines[0]
    ok = subprocess.run(
        [sys.executable, "-m", "sd35trt.cli", "verify", str(root / "engines")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert ok.returncode == 0, ok.stderr
    assert "OK (3 files checked" in ok.stdout


def test_verify_of_a_folder_without_a_manifest_is_one_problem_not_a_walk(tmp_path):
    """faults.md #51: ``verify /tmp`` listed every symlink below it (869 lines)."""
    from sd35trt.stages.package import verify

    (tmp_path / "deep" / "er").mkdir(parents=True)
    for i in range(5):
        (tmp_path / "deep" / f"link{i}").symlink_to("/etc")
    report = verify(tmp_path)
    assert len(report.problems) == 1 and "manifest.json does not exist" in report.problems[0]
