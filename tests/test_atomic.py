"""soteria.io.atomic: a reader sees the old state or the complete new one, never a half-written one."""

from __future__ import annotations

import pytest

import soteria.io.atomic as atomic
from soteria.io.atomic import atomic_directory, atomic_file, atomic_write_text


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_directory_appears_complete_or_not_at_all(tmp_path):
    out = tmp_path / "out"
    with atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("a")
        assert not out.exists() and tmp.name.startswith(".out.tmp-")
    assert _names(tmp_path) == ["out"] and (out / "a.txt").read_text() == "a"

    with pytest.raises(RuntimeError, match="boom"), atomic_directory(out, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("b")
        raise RuntimeError("boom")
    assert _names(tmp_path) == ["out"] and _names(out) == ["a.txt"]  # the old one, untouched; no leftovers

    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "c.txt").write_text("c")
    assert _names(tmp_path) == ["out"] and _names(out) == ["c.txt"]


def test_directory_refusals(tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="overwrite=True"), atomic_directory(tmp_path / "taken"):
        pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"), atomic_directory(tmp_path / "file", overwrite=True):
        pass
    assert _names(tmp_path) == ["file", "taken"] and (tmp_path / "file").read_text() == "x"


def test_file_is_replaced_whole_and_the_rename_is_synced(tmp_path, monkeypatch):
    synced = []
    real = atomic._fsync_dir
    monkeypatch.setattr(atomic, "_fsync_dir", lambda path: (synced.append(path), real(path)))
    path = tmp_path / "sub" / "f.json"
    atomic_write_text(path, "old")
    assert path.read_text() == "old" and synced == [path.parent]

    with pytest.raises(KeyboardInterrupt), atomic_file(path) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert path.read_text() == "old" and _names(path.parent) == ["f.json"]
