"""Atomic writes: a failed write leaves neither a partial result nor its staging files."""

from __future__ import annotations

import pytest

from instaflow_edge.atomic import atomic_directory, atomic_file


def test_failed_directory_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "bundle") as staging:
        (staging / "model.onnx").write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_directory_appears_complete_with_ordinary_permissions(tmp_path):
    with atomic_directory(tmp_path / "bundle") as staging:
        (staging / "model.onnx").write_bytes(b"whole")
        assert not (tmp_path / "bundle").exists()
    assert (tmp_path / "bundle" / "model.onnx").read_bytes() == b"whole"
    assert (tmp_path / "bundle").stat().st_mode & 0o055 == 0o055  # group/others may read


def test_existing_directory_is_kept_unless_overwrite(tmp_path):
    (tmp_path / "bundle").mkdir()
    with pytest.raises(FileExistsError), atomic_directory(tmp_path / "bundle"):
        pass
    with atomic_directory(tmp_path / "bundle", overwrite=True) as staging:
        (staging / "new").write_text("x")
    assert [p.name for p in (tmp_path / "bundle").iterdir()] == ["new"]


def test_failed_file_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(target) as staging:
        staging.write_text("new but interrupted")
        raise RuntimeError
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
