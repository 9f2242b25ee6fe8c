"""Hostile and mistaken inputs end with one line, a documented exit code and nothing changed.

The start of the bad-input suite (issue 14): each case runs the command in this process (fast),
asserts the exit code, exactly one error line naming the problem, no traceback, and that what was
on disk before is still there.
"""

from __future__ import annotations

import pytest

from instaflow_edge.cli import main
from instaflow_edge.errors import UserError


def run(capsys, *args: str) -> tuple[int, str]:
    """The CLI in this process: its exit status and stderr."""
    try:
        status = main(list(args))
    except SystemExit as exit_:  # argparse's own usage errors
        status = exit_.code
    return status, capsys.readouterr().err


def assert_one_line(status: int, err: str, code: int, *words: str) -> None:
    assert status == code, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    for word in words:
        assert word in errors[0], errors[0]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--seed", "1e23"], ["expected a whole number", "1e23"]),
        (["--seed", str(2**64)], ["a seed is from 0 to"]),
        (["--seed", "-1"], ["a seed is from 0 to"]),
        (["--runtime-option", "threads=2"], ["--runtime-option", "needs --bundle"]),
    ],
)
def test_generate_mistakes(capsys, tmp_path, args, words):
    status, err = run(
        capsys, "generate", "-p", "a red circle", "--out", str(tmp_path / "x.png"), *args
    )
    assert_one_line(status, err, 2, *words)
    assert list(tmp_path.iterdir()) == []


def test_a_mistyped_local_model_path_is_not_taken_for_a_hub_id(capsys, tmp_path):
    (tmp_path / "models").mkdir()
    model = tmp_path / "models" / "my-modle"
    status, err = run(capsys, "inspect", str(model))
    assert_one_line(status, err, 2, "my-modle", "not found", "not a hub id")


def test_bench_json_into_a_missing_folder_is_refused_before_the_run(capsys, onnx_bundle, tmp_path):
    out = tmp_path / "missing" / "bench.json"
    status, err = run(capsys, "bench", "--bundle", str(onnx_bundle), "--json", str(out))
    assert_one_line(status, err, 2, "does not exist")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--runtime-option", "threads"], ["expected KEY=VALUE"]),
        (["--runtime-option", "threads=many"], ["threads expects int", "many"]),
        (["--runtime-option", "graph_optimization=max"], ["unknown graph_optimization 'max'"]),
        (["--device", "tpu"], ["unknown device 'tpu'"]),
    ],
)
def test_runtime_option_mistakes(capsys, onnx_bundle, tmp_path, args, words):
    report = tmp_path / "report"
    status, err = run(
        capsys, "validate", "--bundle", str(onnx_bundle), "--report", str(report), *args
    )
    assert_one_line(status, err, 2, *words)
    assert not report.exists()


def test_export_onto_a_file_is_refused(capsys, tmp_path):
    target = tmp_path / "bundle"
    target.write_text("a file of mine")
    status, err = run(capsys, "export", "--out", str(target), "--overwrite")
    assert_one_line(status, err, 2, "not a folder this toolkit wrote")
    assert target.read_text() == "a file of mine"


def test_train_with_a_non_finite_learning_rate_is_refused(capsys, tmp_path):
    status, err = run(capsys, "train", "vae", "--out", str(tmp_path / "vae"), "--lr", "inf")
    assert_one_line(status, err, 2, "lr must be a positive number", "inf")
    assert list(tmp_path.iterdir()) == []


def test_python_api_mistakes_are_user_errors(onnx_bundle):
    import torch

    from instaflow_edge.pipeline import OneStepPipeline
    from instaflow_edge.runtimes import load_session

    session = load_session(onnx_bundle)
    assert session.tokenize("a red circle").shape == (1, 32)  # one prompt as a string
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            OneStepPipeline.from_pretrained(device="cuda")


def test_export_for_cuda_without_cuda_is_refused_before_any_work(capsys, tmp_path):
    from instaflow_edge.runtimes.onnxruntime import cuda_available

    if cuda_available():
        pytest.skip("CUDA runs here: the refusal is for machines without it")
    status, err = run(capsys, "export", "--device", "cuda", "--out", str(tmp_path / "b"))
    assert_one_line(status, err, 2, "--device cuda", "not available here", "--device cpu")
    assert list(tmp_path.iterdir()) == []
    assert "export onnx" not in err  # no graph was converted


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory):
    """A model directory whose UNet's last bias is NaN: every image it makes is NaN."""
    import torch

    from instaflow_edge.pipeline import OneStepPipeline

    pipeline = OneStepPipeline.from_pretrained()
    with torch.no_grad():
        pipeline.unet.conv_out.bias.fill_(float("nan"))
    return pipeline.save_pretrained(tmp_path_factory.mktemp("nan") / "model")


def test_generate_refuses_a_nan_image_instead_of_writing_a_black_one(capsys, nan_model, tmp_path):
    out = tmp_path / "x.png"
    status, err = run(
        capsys, "generate", "-p", "a red circle", "--model", str(nan_model), "-o", str(out)
    )
    assert_one_line(status, err, 2, "NaN or Inf", "nothing was written")
    assert not out.exists()


def test_export_refuses_a_model_that_outputs_nan_before_any_work(capsys, nan_model, tmp_path):
    out = tmp_path / "bundle"
    status, err = run(capsys, "export", "--model", str(nan_model), "--out", str(out))
    assert_one_line(status, err, 2, "unet.out_sample", "NaN or Inf")
    assert list(tmp_path.iterdir()) == []


def test_a_session_refuses_nan_noise(onnx_bundle):
    import numpy as np

    from instaflow_edge.errors import NonFiniteError
    from instaflow_edge.runtimes import load_session

    session = load_session(onnx_bundle)
    noise = np.full((1, *session.recipe.latent_shape), np.nan, dtype=np.float32)
    for fused in (True, False):
        with pytest.raises(NonFiniteError, match="the noise has NaN or Inf"):
            load_session(onnx_bundle, fused=fused).generate(session.tokenize("a cat"), noise)


def test_an_interrupt_after_the_bundle_is_complete_keeps_it_and_exits_0(
    capsys, tmp_path, monkeypatch
):
    from instaflow_edge import tables
    from instaflow_edge.manifest import verify_bundle

    def interrupted(bundle):  # Ctrl-C while the summary prints, after the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(tables, "parity_summary", interrupted)
    out = tmp_path / "bundle"
    status, err = run(capsys, "export", "--out", str(out))
    assert status == 0 and "interrupted after" in err and "it is kept" in err
    verify_bundle(out)


def test_a_full_disk_is_one_line_and_leaves_nothing(capsys, tmp_path, monkeypatch):
    import errno
    import os

    from instaflow_edge.export.onnx import OnnxExporter

    def disk_full(self, model, path, job):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(OnnxExporter, "save", disk_full)
    status, err = run(capsys, "export", "--out", str(tmp_path / "bundle"))
    assert_one_line(status, err, 2, "No space left on device", "nothing was written")
    assert list(tmp_path.iterdir()) == []
