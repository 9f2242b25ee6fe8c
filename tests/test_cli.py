"""The command line as a user meets it: help, generate, inspect, and one clear line for every mistake."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from instaflow_edge.cli import build_parser
from instaflow_edge.models import EMBEDDED_MODEL_DIR
from tests.conftest import assert_one_line_error, run_cli

SUBCOMMANDS = [
    "generate",
    "inspect",
    "export",
    "quantize",
    "calibrate",
    "validate",
    "bench",
    "train",
]


def test_top_level_help_lists_every_subcommand():
    result = run_cli("--help")
    assert result.returncode == 0
    for name in SUBCOMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_explains_itself(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([name, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: instaflow-edge {name}" in text and len(text.splitlines()) > 3


def test_runtime_option_help_names_every_option_of_every_bundle_runtime(capsys):
    from instaflow_edge.export import get_exporter, target_names
    from instaflow_edge.runtimes import get_runtime

    with pytest.raises(SystemExit):
        build_parser().parse_args(["validate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for target in target_names():
        runtime = get_runtime(get_exporter(target).runtime)
        for key in runtime.options.keys():
            assert key in text, f"--runtime-option's help leaves out {runtime.name} {key}"


@pytest.mark.slow
def test_generate_writes_the_same_png_for_the_same_seed(tmp_path):
    args = ["generate", "--prompt", "a red circle above a blue square", "--seed", "0"]
    first = run_cli(*args, "--out", str(tmp_path / "a.png"))
    second = run_cli(*args, "--out", str(tmp_path / "b.png"))
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    image = Image.open(tmp_path / "a.png")
    assert image.format == "PNG" and image.size == (64, 64)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    different = run_cli(*args[:-1], "1", "--out", str(tmp_path / "c.png"))
    assert different.returncode == 0
    assert (tmp_path / "c.png").read_bytes() != (tmp_path / "a.png").read_bytes()


@pytest.mark.slow
def test_generate_many_prompts_numbers_the_files(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\ntwo blue squares\na green triangle\n")
    result = run_cli(  # --quiet: no progress bar (two batches), no info line
        "-q",
        "generate",
        "--prompts",
        str(prompts),
        "--batch-size",
        "2",
        "--out",
        str(tmp_path / "x.png"),
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert sorted(p.name for p in tmp_path.glob("x-*.png")) == [
        "x-000.png",
        "x-001.png",
        "x-002.png",
    ]
    alone = run_cli(
        "generate", "-p", "two blue squares", "--seed", "1", "--out", str(tmp_path / "one.png")
    )
    assert alone.returncode == 0
    # the same prompt and seed alone or in a batch: batched kernels may move a pixel by one level
    single = np.asarray(Image.open(tmp_path / "one.png"), dtype=np.int16)
    batched = np.asarray(Image.open(tmp_path / "x-001.png"), dtype=np.int16)
    assert np.abs(single - batched).max() <= 1


def test_generate_on_missing_cuda_falls_back_and_says_so(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the fallback path does not run")
    result = run_cli(
        "generate", "-p", "a red circle", "--device", "cuda", "--out", str(tmp_path / "g.png")
    )
    assert result.returncode == 0, result.stderr
    assert "CUDA was asked for but is not available" in result.stderr


def test_unknown_model_path_is_one_clear_line(tmp_path):
    result = run_cli("generate", "-p", "a red circle", "--model", str(tmp_path / "nope"))
    assert_one_line_error(result, "not found")


def test_empty_prompt_is_one_clear_line(tmp_path):
    result = run_cli("generate", "--prompt", "  ", "--out", str(tmp_path / "x.png"))
    assert_one_line_error(result, "empty prompt")


def test_generate_never_replaces_an_existing_png_unasked(tmp_path):
    (tmp_path / "x.png").write_bytes(b"a picture of mine")
    result = run_cli("generate", "-p", "a red circle", "--out", str(tmp_path / "x.png"))
    assert_one_line_error(result, "x.png already exists", "--overwrite")
    assert (tmp_path / "x.png").read_bytes() == b"a picture of mine"


def test_missing_output_folder_is_one_clear_line(tmp_path):
    result = run_cli("generate", "-p", "a red circle", "--out", str(tmp_path / "no" / "x.png"))
    assert_one_line_error(result, "output folder", "does not exist")
    assert not (tmp_path / "no").exists()


def test_corrupt_safetensors_is_one_clear_line(tmp_path):
    model_dir = shutil.copytree(EMBEDDED_MODEL_DIR, tmp_path / "model")
    (model_dir / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x01" * 64)
    result = run_cli(
        "generate",
        "-p",
        "a red circle",
        "--model",
        str(model_dir),
        "--out",
        str(tmp_path / "x.png"),
    )
    assert_one_line_error(result, "corrupt safetensors", "unet")
    assert not (tmp_path / "x.png").exists()


def test_inspect_model_shows_components_parameters_and_shapes():
    result = run_cli("inspect")
    assert result.returncode == 0, result.stderr
    assert "embedded:tiny" in result.stdout
    for text in ("text_encoder", "unet", "vae_decoder", "1,489,028", "timestep[batch]:float32"):
        assert text in result.stdout


def test_inspect_bundle_verifies_and_shows_it(tmp_path):
    from tests.test_manifest import bundle as make_bundle

    bundle = make_bundle.__wrapped__(tmp_path)
    result = run_cli("inspect", str(bundle))
    assert result.returncode == 0, result.stderr
    assert (
        "target onnx (runtime onnxruntime), precision fp32" in result.stdout
        and "unet/model.onnx" in result.stdout
    )
    (bundle / "unet" / "model.onnx").write_bytes(b"changed")
    assert_one_line_error(run_cli("inspect", str(bundle)), "unet/model.onnx", "does not match")


def test_subpackages_import_as_one_namespace():
    code = (
        "from instaflow_edge.export import *; from instaflow_edge.runtimes import *; "
        "from instaflow_edge.calibration import *"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
