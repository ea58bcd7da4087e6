"""Whole-or-nothing writes, and the one check that an --output folder may be written."""

from __future__ import annotations

from pathlib import Path

import pytest

from shortgpt_serve.errors import CheckpointError
from shortgpt_serve.fsutil import atomic_dir, atomic_write_text, check_output_free


def test_existing_output_needs_overwrite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    check_output_free(tmp_path / "absent", overwrite=False)
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"^output folder out already exists; pass --overwrite or choose"):
        check_output_free("out", overwrite=False)
    check_output_free(tmp_path / "out", overwrite=True)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(CheckpointError, match=r"output folder ~/out already exists"):  # named as the user gave it
        check_output_free("~/out", overwrite=False)


def test_atomic_dir_replaces_only_when_complete(tmp_path: Path) -> None:
    target = tmp_path / "entry"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    assert (target / "a").read_text() == "1"
    with pytest.raises(FileExistsError), atomic_dir(target) as tmp:
        (tmp / "a").write_text("2")
    with pytest.raises(RuntimeError), atomic_dir(target, overwrite=True) as tmp:
        (tmp / "a").write_text("3")
        raise RuntimeError("interrupted")
    assert (target / "a").read_text() == "1"
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "b").write_text("4")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]  # no temp folder left


def test_atomic_write_text(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "f.json"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two" and sorted(p.name for p in path.parent.iterdir()) == ["f.json"]
