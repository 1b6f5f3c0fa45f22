"""Each engine byte is hashed once per load, before it is deserialized (issue 13, point 6).

``hashlib.sha256`` is replaced by a counting wrapper for the whole process, so every byte any
module hashes is counted, whatever function does it.
"""

from __future__ import annotations

import hashlib

import pytest

from sd35trt.artifacts.engine_manifest import read_engine_manifest
from sd35trt.runtime.pipeline import GenerationRequest, Sd35Runtime


class _Counting:
    """Stands in for ``hashlib.sha256``: counts the bytes fed to every hash object."""

    total = 0

    def __init__(self, data=b"", **kwargs) -> None:
        self._h = _REAL_SHA256(**kwargs)
        self.update(data)

    def update(self, data) -> None:
        _Counting.total += memoryview(data).nbytes
        self._h.update(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()

    def digest(self) -> bytes:
        return self._h.digest()


_REAL_SHA256 = hashlib.sha256


@pytest.fixture
def counted(monkeypatch):
    _Counting.total = 0
    monkeypatch.setattr(hashlib, "sha256", _Counting)
    return _Counting


def test_load_and_one_generate_hash_each_engine_byte_about_once(built_run, counted):
    engines_dir = built_run / "engines"
    manifest = read_engine_manifest(engines_dir)
    engine_bytes = sum(f.size for rec in manifest.engines.values() for f in rec.files)
    support_bytes = sum(f.size for f in manifest.support_files)
    counted.total = 0
    with Sd35Runtime.load(engines_dir, intra_op_threads=1) as runtime:
        runtime.generate(GenerationRequest("a cat", seed=1))
    ratio = counted.total / engine_bytes
    print(
        f"\nhashed {counted.total} bytes for {engine_bytes} engine bytes (+{support_bytes} support): "
        f"{ratio:.3f}x"
    )
    assert counted.total >= engine_bytes  # every engine byte was checked before it was loaded
    assert ratio <= 1.05
