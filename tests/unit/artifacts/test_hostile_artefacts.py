"""Artefacts crafted against the readers under them: ONNX external data pointing outside the
artefact (faults.md #40) and extended tar headers that make Python's tar reader quadratic
(faults.md #41). Real ONNX files, real ``.tar.gz`` archives, byte for byte."""

from __future__ import annotations

import gzip
import io
import tarfile
import time

import pytest
from record_fakes import onnx_model_bytes
from sd35trt.artifacts.package import unpack, verify
from test_package_safety import _artefact_dir, _tar, _write_manifest, _write_sums

from sd35trt.artifacts.engine_manifest import read_engine_manifest
from sd35trt.artifacts.files import sha256_file
from sd35trt.artifacts.tar_stream import MAX_EXTENDED_HEADER_BYTES, tar_stream
from sd35trt.backends.onnxruntime import OrtEngine
from sd35trt.components import Component
from sd35trt.errors import UnsafeArtifactError


@pytest.mark.parametrize("location", ["../../secret.bin", "/tmp/sd35trt-secret.bin"])
def test_external_data_outside_the_artefact_is_refused_by_verify_and_the_loader(tmp_path, location):
    """faults.md #40: an engines directory whose ONNX reads ``../secret.bin`` passed ``verify``
    ("OK") and only ONNX Runtime >= 1.32's own check stopped ``run``; the lock allows older ones."""
    root = _artefact_dir(tmp_path / "art")
    engines = root / "engines"
    secret = (engines / location) if not location.startswith("/") else tmp_path / "abs-secret.bin"
    secret.write_bytes(bytes(range(256)))
    if location.startswith("/"):
        location = str(secret)
    (engines / "transformer.onnx").write_bytes(onnx_model_bytes(64, external_location=location))
    _write_manifest(engines)  # the records match the crafted file: only its contents give it away
    _write_sums(root)
    for target in (root, engines, _tar(tmp_path / "a.tar.gz", root)):
        problems = verify(target).problems
        assert len(problems) == 1, problems
        assert f"tensor 'w' has external data location {location!r}" in problems[0]
    manifest = read_engine_manifest(engines)
    engine = OrtEngine(
        manifest.spec(Component.TRANSFORMER),
        engines / "transformer.onnx",
        sha256=sha256_file(engines / "transformer.onnx"),
    )
    with pytest.raises(
        UnsafeArtifactError, match=r"transformer\.onnx: tensor 'w' has external data location .* which leaves"
    ):
        engine.activate()
    assert not engine.active


def _block(name: str, kind: bytes, size: int) -> bytes:
    """One ustar header block (``tarfile`` writes any type byte, and the size we give it)."""
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, size
    return info.tobuf(tarfile.USTAR_FORMAT)


def _padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def _pax(records: dict[str, str]) -> bytes:
    out = b""
    for key, value in records.items():
        body = f" {key}={value}\n".encode()
        n = len(body) + 1
        while len(str(n)) + len(body) != n:
            n += 1
        out += str(n).encode() + body
    return out


def test_an_oversized_pax_header_is_refused_before_the_tar_reader_parses_it(tmp_path):
    """faults.md #41 (CVE-2024-6232, CPython < 3.11.10): a PAX header of digits makes tarfile's
    header parsing quadratic: 411 bytes of gzip cost 130 s. This one (1 MiB of digits, 1 KB of
    gzip) would cost far longer on this interpreter; it is refused from its 512-byte header."""
    payload = b"9" * (1 << 20)
    raw = _block("././@PaxHeader", tarfile.XHDTYPE, len(payload)) + _padded(payload) + bytes(1024)
    archive = tmp_path / "bomb.tar.gz"
    archive.write_bytes(gzip.compress(raw))
    assert archive.stat().st_size < 4096
    t0 = time.perf_counter()
    with pytest.raises(
        UnsafeArtifactError, match=rf"extended tar header of {len(payload)} bytes, more than the"
    ):
        unpack(archive, tmp_path / "out")
    assert time.perf_counter() - t0 < 5
    assert list((tmp_path / "out").iterdir()) == []
    problems = verify(archive).problems
    assert len(problems) == 1 and "'././@PaxHeader' is an extended tar header" in problems[0]


@pytest.mark.parametrize("kind", [tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XGLTYPE])
def test_oversized_gnu_and_global_headers_are_refused_too(tmp_path, kind):
    size = MAX_EXTENDED_HEADER_BYTES + 1
    raw = _block("././@LongLink", kind, size) + _padded(b"a" * size) + bytes(1024)
    with tar_stream(_write(tmp_path / "x.tar", raw)) as stream, pytest.raises(UnsafeArtifactError):
        stream.read()


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_the_guard_follows_pax_sizes_as_tarfile_does(tmp_path):
    """A member whose real size is in a PAX ``size`` record (its ustar field says 0, as for files
    over 8 GB) holds bytes that look like an oversized header: they are data, and pass; the
    oversized header after them is caught, and a normal archive with long PAX names reads whole."""
    decoy = _block("decoy", tarfile.XHDTYPE, 10**9)
    records = _pax({"size": str(len(decoy)), "path": "d/" + "n" * 150})
    member = _block("././@PaxHeader", tarfile.XHDTYPE, len(records)) + _padded(records)
    member += _block("member", tarfile.REGTYPE, 0) + decoy
    evil = _block("evil", tarfile.XHDTYPE, MAX_EXTENDED_HEADER_BYTES + 1)
    evil += _padded(b"1" * (MAX_EXTENDED_HEADER_BYTES + 1))
    with (
        tar_stream(_write(tmp_path / "t.tar", member + bytes(1024))) as s,
        tarfile.open(fileobj=s, mode="r|") as t,
    ):
        (only,) = list(t)  # the decoy in its data passed
    assert only.name == "d/" + "n" * 150 and only.size == len(decoy)
    # the stream is read ahead of the tar reader: the refusal comes before it reaches "evil"
    with (
        tar_stream(_write(tmp_path / "e.tar", member + evil + bytes(1024))) as s,
        pytest.raises(UnsafeArtifactError, match=r"member 'evil' is an extended tar header"),
        tarfile.open(fileobj=s, mode="r|") as t,
    ):
        list(t)

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for i in range(3):
            info = tarfile.TarInfo(f"top/{'long-' * 40}{i}")
            info.size = 700 * i
            tar.addfile(info, io.BytesIO(bytes(info.size)))
    with (
        tar_stream(_write(tmp_path / "ok.tar.gz", buf.getvalue())) as stream,
        tarfile.open(fileobj=stream, mode="r|") as tar,
    ):
        assert [(m.name.endswith(str(i)), m.size) for i, m in enumerate(tar)] == [
            (True, 0),
            (True, 700),
            (True, 1400),
        ]
