"""Run a bundle (or a model folder) with an ecosystem client as its users do, and compare the image.

    python check.py CLIENT DIR --prompt TEXT --noise NOISE.npy --reference IMAGE.npy

CLIENT is optimum-onnx (`ORTDiffusionPipeline`), optimum-intel (`OVDiffusionPipeline`, f32
inference precision) or diffusers (`DiffusionPipeline`, for model folders). The client loads DIR
with its own `from_pretrained`, tokenizes the prompt with DIR's tokenizer, and generates one step
from our noise (`latents=`, `num_inference_steps=1`, `guidance_scale=0`), then once more as a
user's first call does, at the pipeline's defaults (50 steps with guidance). Prints one JSON line:
the pipeline and scheduler classes, the timestep the UNet was fed, the PSNR of the uint8 image
against REFERENCE (our uint8 NHWC image), and the defaults' step count, image shape and whether
it is finite. Runs in a client's venv: numpy and the client only.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np


def load(client: str, folder: str):
    if client == "optimum-onnx":
        from optimum.onnxruntime import ORTDiffusionPipeline

        return ORTDiffusionPipeline.from_pretrained(folder)
    if client == "optimum-intel":
        from optimum.intel import OVDiffusionPipeline

        # this CPU's default is bf16; f32 is what parity means (optimum-intel's users may pick either)
        return OVDiffusionPipeline.from_pretrained(
            folder, ov_config={"INFERENCE_PRECISION_HINT": "f32"}
        )
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(folder)


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("client", choices=["optimum-onnx", "optimum-intel", "diffusers"])
    parser.add_argument("folder")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--noise", type=Path, required=True)
    parser.add_argument("--reference", type=Path, required=True)
    args = parser.parse_args()

    import torch

    pipe = load(args.client, args.folder)
    pipe.scheduler.set_timesteps(1)
    timesteps = [float(t) for t in pipe.scheduler.timesteps]
    image = pipe(
        args.prompt,
        latents=torch.from_numpy(np.load(args.noise).astype(np.float32)),
        num_inference_steps=1,
        guidance_scale=0.0,
        output_type="np",
    ).images
    pixels = (np.clip(np.asarray(image), 0, 1) * 255).round().astype(np.uint8)
    reference = np.load(args.reference)
    default = pipe(args.prompt, output_type="np").images
    default_steps = [float(t) for t in pipe.scheduler.timesteps]
    result = {
        "client": args.client,
        "pipeline": type(pipe).__name__,
        "scheduler": type(pipe.scheduler).__name__,
        "timesteps": timesteps,
        "shape": list(pixels.shape),
        "psnr_db": psnr_db(pixels, reference) if pixels.shape == reference.shape else None,
        "defaults": {
            "steps": len(default_steps),
            "first_timestep": default_steps[0],
            "shape": list(np.asarray(default).shape),
            "finite": bool(np.isfinite(default).all()),
        },
    }
    print(json.dumps({k: ("inf" if v == math.inf else v) for k, v in result.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
