"""The clients on full-size bundles: `clients/check.py` (the client's own `from_pretrained`, one
step from our noise, then its pipeline's defaults) on bundles of the sd15 preset that the bench or
`export`/`quantize` made, against our own runtime's image of the same prompt and noise.

    python bench/clients_sd15.py optimum-onnx:DIR optimum-intel:DIR ...

The rows of `clients/matrix.py` run on the embedded default in CI; this runs the same check where
the graphs are full size (ONNX external data files, 512x512 images). Beside each client's PSNR it
records our own runtime's image at the client's first sigma (our scheduler config's one step,
1 - 1/2001) against ours at sigma 1: what the client's image may differ by without computing
anything differently. Writes bench/results/clients_sd15.json and prints a line per bundle.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from clients.matrix import PROMPT, Row, check, client_version, our_image  # noqa: E402
from instaflow_edge.commands.generate import seeded_noise  # noqa: E402
from instaflow_edge.diffusers_format import SCHEDULER_CONFIG  # noqa: E402
from instaflow_edge.manifest import read_manifest  # noqa: E402
from instaflow_edge.metrics import image_psnr  # noqa: E402
from instaflow_edge.recipe import ONE_STEP_TIMESTEP, to_uint8  # noqa: E402
from instaflow_edge.runtimes import load_session  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "clients_sd15.json"


def client_sigma() -> float:
    """The sigma a client's one step starts from, by diffusers' scheduler from our config."""
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler.from_config(SCHEDULER_CONFIG)
    scheduler.set_timesteps(1)
    return float(scheduler.sigmas[0])


def ours_at_sigma(folder: Path, noise: np.ndarray, sigma: float) -> float:
    """PSNR of our runtime's image stepped from `sigma` instead of 1 against its own image."""
    manifest = read_manifest(folder)
    session = load_session(folder, fused=False)
    ids = session.tokenize([PROMPT])
    states = session.run("text_encoder", {"input_ids": ids})["last_hidden_state"]
    timestep = np.full((1,), ONE_STEP_TIMESTEP, np.float32)
    feeds = {"sample": noise, "timestep": timestep, "encoder_hidden_states": states}
    out = session.run("unet", feeds)["out_sample"]
    scale = manifest.sampling.vae_scaling_factor
    images = [
        to_uint8(session.run("vae_decoder", {"latent_sample": (noise - s * out) / scale})["sample"])
        for s in (1.0, sigma)
    ]
    return image_psnr(images[0], images[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pairs", nargs="+", metavar="CLIENT:BUNDLE")
    args = parser.parse_args()
    results = []
    sigma = client_sigma()
    with tempfile.TemporaryDirectory() as scratch:
        for pair in args.pairs:
            client, _, folder = pair.partition(":")
            manifest = read_manifest(Path(folder))
            row = Row(client, manifest.target, manifest.quantization)
            noise = seeded_noise(range(1), tuple(manifest.sampling.latent_shape))
            ours = our_image(row, Path(folder), None, noise)
            report = check(row, Path(folder), noise, ours, Path(scratch))
            shifted = ours_at_sigma(Path(folder), noise, sigma)
            results.append(
                {
                    "row": row.name,
                    "bundle": Path(folder).name,
                    "model": manifest.source_model.get("id"),
                    "version": client_version(client),
                    **report,
                    "client_sigma": sigma,
                    "ours_at_client_sigma_psnr_db": shifted,
                }
            )
            print(
                f"{row.name} ({Path(folder).name}): {report['psnr_db']:.2f} dB; our runtime "
                f"at the client's sigma {sigma:.6f}: {shifted:.2f} dB"
            )
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
