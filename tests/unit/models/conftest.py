"""Fixtures of the model tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty offline Hugging Face cache (``HF_HUB_CACHE``), downloads not allowed."""
    root = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("SD35TRT_ALLOW_DOWNLOAD", raising=False)
    return root
