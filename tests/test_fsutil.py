"""Atomic folder writes: all or nothing."""

from __future__ import annotations

import pytest

from peftflow.fsutil import atomic_folder


def test_success_replaces_the_old_folder(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_folder(target) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging left behind


def test_failure_keeps_the_old_folder_and_removes_staging(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_folder(target) as staging:
        (staging / "half.txt").write_text("half")
        raise RuntimeError("disk full")
    assert (target / "old.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
