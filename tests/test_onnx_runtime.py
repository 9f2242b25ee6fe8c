"""The ONNX Runtime runtime: no torch on the edge, providers that really ran, generate --bundle."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from instaflow_edge.runtimes import load_session
from instaflow_edge.runtimes.onnxruntime import CPU, CUDA, OnnxRuntime, cuda_available
from tests.conftest import assert_one_line_error, run_cli

PROMPT = "a red circle above a blue square"
HAS_CUDA = cuda_available()
NEEDS_CUDA = pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and a GPU")

BLOCK_TORCH = """
import sys

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "diffusers", "transformers"):
            raise ImportError(f"{name} is blocked: edge runtimes must not import it")

sys.meta_path.insert(0, Blocker())
"""


def run_without_torch(code: str) -> subprocess.CompletedProcess:
    script = BLOCK_TORCH + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)


def test_fp32_images_are_within_one_level_of_pytorch(onnx_bundle, pipeline):
    session = load_session(onnx_bundle, "cpu")
    ids, noise = session.tokenize([PROMPT]), pipeline.make_noise([0]).numpy()
    fused = session.generate(ids, noise)
    three = load_session(onnx_bundle, "cpu", fused=False).generate(ids, noise)
    reference = pipeline(PROMPT, seed=0, output_type="np").astype(np.int16)
    np.testing.assert_array_equal(fused, three)
    # fp32 in another runtime: a pixel may round to the neighbouring 8-bit level, no further
    difference = np.abs(three.astype(np.int16) - reference)
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3


def test_blocker_really_blocks_torch():
    result = run_without_torch("import instaflow_edge.runtimes.torch_ref")
    assert result.returncode != 0 and "torch is blocked" in result.stderr


def test_cli_generate_with_a_bundle_runs_without_torch(onnx_bundle, tmp_path):
    out = tmp_path / "edge.png"
    result = run_without_torch(
        f"""
        from instaflow_edge.cli import main
        sys.exit(main(["generate", "--bundle", {str(onnx_bundle)!r}, "-p", {PROMPT!r}, "--out", {str(out)!r}]))
        """
    )
    assert result.returncode == 0, result.stderr
    assert "torch is not installed: noise from numpy" in result.stderr
    assert Image.open(out).size == (64, 64)


def test_cli_generate_with_a_bundle_matches_the_reference_png(onnx_bundle, tmp_path):
    from_bundle = run_cli(
        "generate", "--bundle", str(onnx_bundle), "-p", PROMPT, "--out", str(tmp_path / "b.png")
    )
    from_model = run_cli("generate", "-p", PROMPT, "--out", str(tmp_path / "m.png"))
    assert from_bundle.returncode == 0, from_bundle.stderr
    assert from_model.returncode == 0, from_model.stderr
    assert f"ran {onnx_bundle} on {CPU}" in from_bundle.stderr
    bundle_pixels, model_pixels = (
        np.asarray(Image.open(tmp_path / name), dtype=np.int16) for name in ("b.png", "m.png")
    )
    assert (
        np.abs(bundle_pixels - model_pixels).max() <= 1
    )  # fp32: a neighbouring 8-bit level at most


def test_cli_generate_bundle_and_model_are_exclusive(onnx_bundle, tmp_path):
    result = run_cli("generate", "--bundle", str(onnx_bundle), "--model", "tiny", "-p", PROMPT)
    assert_one_line_error(result, "not allowed with argument")


def test_the_memory_arena_is_a_runtime_option_the_export_check_turns_off(onnx_bundle):
    from instaflow_edge.export.base import load_for_check

    def arenas(session) -> set[bool]:
        return {s.get_session_options().enable_cpu_mem_arena for s in session.loaded.values()}

    assert arenas(OnnxRuntime().load(onnx_bundle)) == {True}  # ONNX Runtime's default
    assert arenas(OnnxRuntime().load(onnx_bundle, memory_arena=False)) == {False}
    assert arenas(load_for_check("onnxruntime", onnx_bundle, "cpu")) == {False}


def test_executed_on_is_the_provider_that_ran(onnx_bundle):
    session = load_session(onnx_bundle, "cpu")
    assert session.executed_on == CPU
    assert {s.get_providers()[0] for s in session.loaded.values()} == {CPU}
    assert json.loads((onnx_bundle / "manifest.json").read_text())["target"] == "onnx"


@pytest.mark.skipif(HAS_CUDA, reason="checks the fallback on a machine where CUDA cannot run")
def test_cuda_request_without_cuda_falls_back_to_cpu_and_says_so(onnx_bundle, caplog):
    session = OnnxRuntime().load(onnx_bundle, "cuda")
    assert session.executed_on == CPU
    # a CPU build has no CUDA provider; a GPU build without a GPU has one that fails to load
    assert "CUDA" in caplog.text and "running on" in caplog.text


@NEEDS_CUDA
def test_cuda_session_runs_on_cuda_with_parity(onnx_bundle, pipeline):
    session = OnnxRuntime().load(onnx_bundle, "cuda")
    assert session.executed_on == CUDA
    ids, noise = pipeline.tokenize([PROMPT]).numpy(), pipeline.make_noise([0]).numpy()
    reference = pipeline(PROMPT, seed=0, output_type="np")
    assert np.abs(session.generate(ids, noise).astype(int) - reference).max() <= 1


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)])
def test_cuda_graph_refills_one_set_of_buffers_per_graph(onnx_bundle, pipeline, device, caplog):
    """A captured CUDA graph replays on the buffers it was captured with: each call must refill
    them (a stale one would give the first call's image again); on the CPU they are kept too,
    nothing is captured, and the log says so."""
    from instaflow_edge.errors import UserError

    plain = OnnxRuntime().load(onnx_bundle, device)
    graphed = OnnxRuntime().load(onnx_bundle, device, cuda_graph=True)
    assert ("nothing is captured" in caplog.text) == (device == "cpu")
    images, given = [], []
    for prompt, seed in ((PROMPT, 0), ("two small green triangles", 7)):
        ids, noise = pipeline.tokenize([prompt]).numpy(), pipeline.make_noise([seed]).numpy()
        given.append((ids, noise, noise.copy()))
        images.append(graphed.generate(ids, noise))
        assert np.abs(images[-1].astype(int) - plain.generate(ids, noise)).max() <= 1
        feeds = plain.component_io(ids, noise)["unet"]
        feeds = {t.name: feeds[t.name] for t in graphed.specs["unet"].inputs}
        assert graphed.prepare("unet", feeds)() is graphed.prepare("unet", feeds)()  # one binding
    assert not np.array_equal(*images)
    assert np.array_equal(given[0][1], given[0][2])  # the buffers are not the caller's arrays
    with pytest.raises(
        UserError, match=r"with cuda_graph, \w+ runs the input shapes of its first call"
    ):
        graphed.generate(pipeline.tokenize(["a", "b"]).numpy(), pipeline.make_noise([0, 1]).numpy())


def test_unknown_component_and_missing_input_are_user_errors(onnx_bundle):
    from instaflow_edge.errors import UserError

    session = load_session(onnx_bundle, "cpu")
    with pytest.raises(UserError, match="no component 'safety_checker'"):
        session.run("safety_checker", {})
    with pytest.raises(UserError, match="needs input\\(s\\) timestep"):
        session.run("unet", {"sample": np.zeros((1, 4, 16, 16), np.float32)})


def test_bundle_tokenizer_truncates_long_prompts_with_a_warning(onnx_bundle, caplog):
    import logging

    from instaflow_edge.runtimes import load_session

    session = load_session(onnx_bundle, "cpu")
    with caplog.at_level(logging.WARNING, logger="instaflow_edge"):
        ids = session.tokenize([" ".join(["red circle"] * 30), "a red circle"])
    assert ids.shape == (2, 32)
    assert caplog.text.count("truncated") == 1
