"""Our bundles and model folders run in the ecosystem's own clients, loaded as their users load them.

optimum-onnx's `ORTDiffusionPipeline` and optimum-intel's `OVDiffusionPipeline` take our ONNX and
OpenVINO bundles (fp32, fp16 and quantized), and stock diffusers takes a model folder that
`save_pretrained` wrote; each, fed our noise as `latents=` with one step and no guidance, makes
the image our own runtime makes. The two optimum clients pin libraries that fit neither our venv
nor each other, so each runs `clients/check.py` in its own venv (`clients/build_venvs.sh`, which
`.ci/run` calls); on a machine without those venvs these tests skip, except in CI, where they fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from instaflow_edge.metrics import image_psnr
from instaflow_edge.runtimes import load_session

ROOT = Path(__file__).resolve().parent.parent
CLIENT_VENVS = Path(os.environ.get("INSTAFLOW_CLIENT_VENVS", ROOT / ".client-venvs"))
PROMPT = "a red circle above a blue square"
pytestmark = pytest.mark.slow


def client_python(client: str) -> Path:
    python = CLIENT_VENVS / client / "bin" / "python"
    if not python.is_file():
        message = f"no {client} venv in {CLIENT_VENVS}: build it with clients/build_venvs.sh"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return python


def run_client(client: str, folder: Path, noise: np.ndarray, reference: np.ndarray, tmp_path):
    """The client's image of `folder` from our noise, as clients/check.py reports it."""
    np.save(tmp_path / "noise.npy", noise)
    np.save(tmp_path / "reference.npy", reference)
    python = client_python(client) if client != "diffusers" else Path(sys.executable)
    result = subprocess.run(
        [str(python), str(ROOT / "clients" / "check.py"), client, str(folder), "--prompt", PROMPT,
         "--noise", str(tmp_path / "noise.npy"), "--reference", str(tmp_path / "reference.npy")],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def psnr(report: dict) -> float:
    return float(report["psnr_db"])


@pytest.fixture(scope="module")
def noise(pipeline):
    return pipeline.make_noise([0]).numpy()


@pytest.fixture(scope="module")
def quantized(bundles, tmp_path_factory):
    from instaflow_edge.export import get_exporter

    def make(target: str, method: str) -> Path:
        out = tmp_path_factory.mktemp("quantized") / f"{target}-{method}"
        return get_exporter(target).quantize(bundles(target), out, method)

    return make


def our_image(bundle: Path, noise: np.ndarray) -> np.ndarray:
    session = load_session(bundle, fused=False)
    return session.generate(session.tokenize([PROMPT]), noise)


@pytest.mark.parametrize(
    ("client", "target", "method"),
    [
        ("optimum-onnx", "onnx", None),
        ("optimum-onnx", "onnx", "fp16"),
        ("optimum-onnx", "onnx", "int8-dynamic"),
        ("optimum-intel", "openvino", None),
        ("optimum-intel", "openvino", "int8-weights"),
    ],
)
def test_optimum_clients_make_our_image_from_our_bundles(
    client, target, method, bundles, quantized, pipeline, noise, tmp_path
):
    bundle = bundles(target) if method is None else quantized(target, method)
    ours = our_image(bundle, noise)
    report = run_client(client, bundle, noise, ours, tmp_path)
    assert report["pipeline"].endswith("StableDiffusionPipeline"), report
    assert report["timesteps"] == [1000.0], report  # the one operating point, exactly
    assert psnr(report) >= 45, report  # the same graphs: equal up to the client's float order
    if method is None:
        reference = pipeline(PROMPT, noise=pipeline.make_noise([0]), output_type="np")
        assert image_psnr(reference, ours) >= 40


def test_stock_diffusers_makes_our_image_from_a_saved_model(pipeline, noise, tmp_path):
    folder = pipeline.save_pretrained(tmp_path / "model")
    reference = pipeline(PROMPT, noise=pipeline.make_noise([0]), output_type="np")
    report = run_client("diffusers", folder, noise, reference, tmp_path)
    assert report["pipeline"] == "StableDiffusionPipeline" and report["timesteps"] == [1000.0]
    assert report["psnr_db"] == "inf", report  # bit-identical
