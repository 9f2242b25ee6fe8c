"""Our bundles and model folders run in the ecosystem's own clients, loaded as their users load them.

optimum-onnx's `ORTDiffusionPipeline` and optimum-intel's `OVDiffusionPipeline` take our ONNX and
OpenVINO bundles (fp32, fp16 and quantized, the `fastest-cpu-int8` presets' int8 activations
among them), and stock diffusers takes a model folder that
`save_pretrained` wrote; each, fed our noise as `latents=` with one step and no guidance, makes
the image our own runtime makes (rows: `clients/matrix.py`); at the pipeline's defaults (50 steps
with guidance, a user's first call) each runs too. The two optimum clients pin
libraries that fit neither our venv nor each other, so each runs in its own venv
(`clients/build_venvs.sh`, which `.ci/run` calls); without those venvs these tests skip, except in
CI, where they fail.
"""

from __future__ import annotations

import os

import pytest

from clients.matrix import PROMPT, ROWS, check, client_python, folder_for, our_image
from instaflow_edge.export import get_exporter
from instaflow_edge.metrics import image_psnr

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.name)
def test_a_client_makes_our_image(row, bundles, calibration, pipeline, tmp_path):
    if client_python(row.client) is None:
        message = f"no {row.client} venv: build it with clients/build_venvs.sh (make clients)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    noise = pipeline.make_noise([0]).numpy()
    folder = folder_for(row, pipeline, bundles, tmp_path, calibration)
    ours = our_image(row, folder, pipeline, noise)
    report = check(row, folder, noise, ours, tmp_path)
    assert report["pipeline"].endswith("StableDiffusionPipeline"), report
    assert report["timesteps"] == [1000.0], report  # the one operating point, exactly
    defaults = report["defaults"]  # a user's first call: the pipeline's 50 steps with guidance
    assert defaults == {**defaults, "steps": 50, "first_timestep": 1000.0, "finite": True}, report
    assert defaults["shape"] == report["shape"], report
    if row.method is None:  # fp32: ours is PyTorch's (one step at sigma 1 - 1/2001, not 1)
        assert report["psnr_db"] == "inf" or float(report["psnr_db"]) >= 60, report
        reference = pipeline(PROMPT, noise=pipeline.make_noise([0]), output_type="np")
        assert image_psnr(reference, ours) >= 40
    else:  # the same graphs as our runtime: equal up to the client's float order and sigma
        # calibrated int8 activations turn the client's sigma 1 - 1/2001 (its decoder input
        # moves by 1/2001 of the UNet's output) into rounding flips: our own runtime from that
        # sigma differs from ours by as much (45 dB ONNX int8-static, 44 dB OpenVINO hybrid-vae)
        floor = 40 if row.method in get_exporter(row.target).calibrated_methods else 45
        assert report["psnr_db"] == "inf" or float(report["psnr_db"]) >= floor, report
