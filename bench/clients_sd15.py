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

from clients.matrix import PROMPT, Row, check, client_version  # noqa: E402
from instaflow_edge.commands.generate import seeded_noise  # noqa: E402
from instaflow_edge.diffusers_format import SCHEDULER_CONFIG  # noqa: E402
from instaflow_edge.manifest import read_manifest  # noqa: E402
from instaflow_edge.metrics import image_psnr  # noqa: E402
from instaflow_edge.recipe import decoder_input, to_uint8  # noqa: E402
from instaflow_edge.runtimes import load_session  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "clients_sd15.json"


def client_sigma() -> float:
    """The sigma a client's one step starts from, by diffusers' scheduler from our config."""
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler.from_config(SCHEDULER_CONFIG)
    scheduler.set_timesteps(1)
    return float(scheduler.sigmas[0])


def our_images(folder: Path, noise: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Our runtime's image of the prompt (what `clients.matrix.our_image` makes: the one-step
    recipe from three graphs), and the same UNet output stepped from `sigma` instead of 1."""
    session = load_session(folder, fused=False)
    io = session.component_io(session.tokenize([PROMPT]), noise)
    latents = decoder_input(
        noise, sigma * io["unet"]["out_sample"], session.recipe.vae_scaling_factor
    )
    shifted = session.run("vae_decoder", {"latent_sample": latents})["sample"]
    return to_uint8(io["vae_decoder"]["sample"]), to_uint8(shifted)


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
            ours, ours_shifted = our_images(Path(folder), noise, sigma)
            report = check(row, Path(folder), noise, ours, Path(scratch))
            shifted = image_psnr(ours, ours_shifted)
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
