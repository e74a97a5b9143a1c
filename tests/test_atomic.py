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

    with pytest.raises(RuntimeError, match="boom"), atomic_directory(out, overwrite=True, ours="a.txt") as tmp:
        (tmp / "b.txt").write_text("b")
        raise RuntimeError("boom")
    assert _names(tmp_path) == ["out"] and _names(out) == ["a.txt"]  # the old one, untouched; no leftovers

    with atomic_directory(out, overwrite=True, ours="a.txt") as tmp:
        (tmp / "c.txt").write_text("c")
    assert _names(tmp_path) == ["out"] and _names(out) == ["c.txt"]


def test_overwrite_never_replaces_a_folder_of_other_files(tmp_path):
    """Only an empty folder, or one holding the caller's marker file, is replaced."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for ours in (None, "soteria_config.json"):
        with (
            pytest.raises(FileExistsError, match="holds files this did not write"),
            atomic_directory(out, overwrite=True, ours=ours),
        ):
            pass
    assert _names(out) == ["notes.txt"] and _names(tmp_path) == ["out"]
    (out / "notes.txt").unlink()
    with atomic_directory(out, overwrite=True) as tmp:  # an empty folder may go
        (tmp / "x").write_text("x")
    assert _names(out) == ["x"]


def test_leftovers_of_killed_runs_are_reported_not_deleted(tmp_path):
    stale = tmp_path / ".out.tmp-deadbeef"
    stale.mkdir()
    with pytest.warns(UserWarning, match="interrupted runs"), atomic_directory(tmp_path / "out") as tmp:
        (tmp / "a").write_text("a")
    assert stale.is_dir() and (tmp_path / "out" / "a").is_file()


def test_directory_refusals(tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="already exists"), atomic_directory(tmp_path / "taken"):
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
