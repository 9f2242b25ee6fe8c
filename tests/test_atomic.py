"""Atomic writes: a failed write leaves neither a partial result nor its staging files; a killed
export leaves nothing that looks finished; two writers of one folder cannot both succeed."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from instaflow_edge.atomic import atomic_directory, atomic_file
from instaflow_edge.errors import UserError
from instaflow_edge.manifest import verify_bundle
from tests.conftest import assert_one_line_error, run_cli


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
    with pytest.raises(UserError, match="already exists"), atomic_directory(tmp_path / "bundle"):
        pass
    with atomic_directory(tmp_path / "bundle", overwrite=True) as staging:
        (staging / "new").write_text("x")
    assert [p.name for p in (tmp_path / "bundle").iterdir()] == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no lock, staging or old copy


def test_overwrite_replaces_only_a_folder_of_ours(tmp_path):
    precious = tmp_path / "photos"
    precious.mkdir()
    (precious / "holiday.jpg").write_bytes(b"irreplaceable")
    with pytest.raises(UserError, match="has no manifest.json"):
        with atomic_directory(precious, overwrite=True, marker="manifest.json"):
            pass
    assert (precious / "holiday.jpg").read_bytes() == b"irreplaceable"
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a folder this toolkit wrote"):
        with atomic_directory(tmp_path / "file", overwrite=True):
            pass
    assert (tmp_path / "file").read_text() == "x"


def test_a_folder_that_appears_meanwhile_is_not_replaced(tmp_path):
    with pytest.raises(UserError, match="appeared while this ran"):
        with atomic_directory(tmp_path / "bundle") as staging:
            (staging / "ours").write_text("x")
            (tmp_path / "bundle").mkdir()
            (tmp_path / "bundle" / "theirs").write_text("y")
    assert [p.name for p in (tmp_path / "bundle").iterdir()] == ["theirs"]


def test_a_second_writer_of_the_same_folder_is_refused(tmp_path):
    with atomic_directory(tmp_path / "bundle") as staging:
        (staging / "first").write_text("x")
        with pytest.raises(UserError, match="another run is writing"):
            with atomic_directory(tmp_path / "bundle"):
                pass
    assert [p.name for p in (tmp_path / "bundle").iterdir()] == ["first"]


def test_the_next_run_removes_what_an_interrupted_one_left(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("instaflow_edge"), "propagate", True)  # after a CLI run
    stale = tmp_path / ".bundle.partial-abc123"
    stale.mkdir()
    (stale / "manifest.json").write_text("{}")  # complete-looking, never renamed into place
    caplog.set_level(logging.INFO, logger="instaflow_edge.atomic")
    with atomic_directory(tmp_path / "bundle") as staging:
        (staging / "new").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    assert "removed 1 unfinished folder" in caplog.text


def test_failed_file_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(target) as staging:
        staging.write_text("new but interrupted")
        raise RuntimeError
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def _export(out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "instaflow_edge", "export", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


@pytest.mark.slow
def test_a_sigkilled_export_leaves_no_bundle_and_the_next_run_cleans_up(tmp_path):
    out = tmp_path / "bundle"
    export = _export(out)
    deadline = time.monotonic() + 120
    staged: list[Path] = []
    while not staged and export.poll() is None and time.monotonic() < deadline:
        staged = list(tmp_path.glob(".bundle.partial-*/manifest.json"))  # its parity check runs
        time.sleep(0.02)
    export.kill()
    export.communicate()
    assert staged, "the export ended before its staging folder held a manifest"
    assert not out.exists()
    inspected = run_cli("inspect", str(staged[0].parent))  # complete-looking, yet refused
    assert_one_line_error(inspected, "staging folder of an unfinished")
    rerun = run_cli("export", "--out", str(out))
    assert rerun.returncode == 0, rerun.stderr
    assert "removed 1 unfinished folder" in rerun.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    verify_bundle(out)


@pytest.mark.slow
def test_two_exports_to_one_folder_cannot_both_succeed(tmp_path):
    out = tmp_path / "bundle"
    first, second = _export(out), _export(out)
    results = [(p.wait(), p.communicate()[1]) for p in (first, second)]
    assert sorted(status for status, _ in results) == [0, 2], results
    refusal = next(err for status, err in results if status == 2)
    assert "another run is writing" in refusal or "already exists" in refusal, refusal
    assert "Traceback" not in refusal
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    verify_bundle(out)
