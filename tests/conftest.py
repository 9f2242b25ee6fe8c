"""Shared fixtures: the embedded pipeline (loaded once) and a runner for the CLI as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """A command run in-process with --threads sets torch's global thread count: restore it."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def pipeline():
    from instaflow_edge.pipeline import OneStepPipeline

    return OneStepPipeline.from_pretrained()


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """Run `instaflow-edge ARGS` in a fresh process, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "instaflow_edge", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    """A user's mistake: non-zero exit, no traceback, one error line that names the problem."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    for word in words:
        assert word in errors[0], errors[0]


def component_psnr(session, io) -> dict[str, float]:
    """Tensor PSNR of each recipe component of a session fed PyTorch's inputs for it (`io`:
    `OneStepPipeline.component_io`), one place for every test."""
    from instaflow_edge.components import RECIPE
    from instaflow_edge.metrics import tensor_metrics

    psnr = {}
    for name in RECIPE:
        spec = session.specs[name]
        output = spec.outputs[0].name
        got = session.run(name, {t.name: io[name][t.name] for t in spec.inputs})[output]
        psnr[name] = tensor_metrics(io[name][output], got)["psnr_db"]
    return psnr


@pytest.fixture(scope="session")
def bundles(pipeline, tmp_path_factory):
    """The embedded default exported once per target (fp32, with the fused generator), on demand:
    `bundles("coreml")`. Tests that change a bundle copy it first."""
    from instaflow_edge.export import get_exporter

    made = {}

    def bundle(target: str):
        if target not in made:
            out = tmp_path_factory.mktemp(target) / f"tiny-{target}-fp32"
            made[target] = get_exporter(target).export(pipeline, out, "fp32", {"fused": True})
        return made[target]

    return bundle


@pytest.fixture(scope="session")
def calibration(pipeline, tmp_path_factory):
    """A calibration set of 8 synthetic prompts, recorded once."""
    from instaflow_edge.calibration.builder import build_calibration
    from instaflow_edge.calibration.prompts import load_prompts

    out = tmp_path_factory.mktemp("calibration") / "set"
    return build_calibration(pipeline, load_prompts("synthetic", limit=8), out)


@pytest.fixture(scope="session")
def quantized(bundles, calibration, tmp_path_factory):
    """quantized(target, method): `bundles(target)` quantized by `method` at its defaults (from
    `calibration` where the method is calibrated), made once for the tests that read it."""
    from instaflow_edge.export import get_exporter

    made = {}

    def bundle(target: str, method: str):
        if (target, method) not in made:
            exporter = get_exporter(target)
            given = calibration if method in exporter.calibrated_methods else None
            out = tmp_path_factory.mktemp("quantized") / f"{target}-{method}"
            made[target, method] = exporter.quantize(bundles(target), out, method, given)
        return made[target, method]

    return bundle


@pytest.fixture(scope="session")
def onnx_bundle(bundles):
    return bundles("onnx")
