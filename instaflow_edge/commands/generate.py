"""`instaflow-edge generate`: prompts to PNG files with the PyTorch reference or an exported bundle."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from instaflow_edge.atomic import check_writable
from instaflow_edge.commands.common import (
    add_runtime_arguments,
    prompt_text,
    runtime_options,
    seed_value,
)
from instaflow_edge.errors import UserError

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate images from prompts (one UNet call each) and save PNG files",
        description=(
            "Generate images with the PyTorch reference: latents = noise + v(noise, t=1000, text), "
            "then the VAE decodes. Image i of a run uses seed SEED+i, so the same seed gives the "
            "same image whatever the batch size."
        ),
    )
    parser.add_argument(
        "-p",
        "--prompt",
        action="append",
        default=[],
        type=prompt_text,
        help="a prompt (repeat for several images)",
    )
    parser.add_argument("--prompts", type=Path, help="a text file with one prompt per line")
    parser.add_argument(
        "--seed", type=seed_value, default=0, help="noise seed of the first image (0)"
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--model",
        help="model: 'tiny' (embedded default), 'sd15' (random weights), a directory or a hub id",
    )
    source.add_argument(
        "--bundle",
        type=Path,
        help="run an exported bundle with its runtime instead (one step; no torch needed)",
    )
    add_runtime_arguments(parser)
    parser.add_argument(
        "-o",
        "--out",
        type=Path,
        default=Path("instaflow.png"),
        help="output PNG (several images: NAME-000.png, NAME-001.png, ...) (instaflow.png)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing PNG files")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (8)")
    parser.add_argument(
        "--steps", type=int, default=1, help="Euler steps (1: the one-step model; more: a teacher)"
    )
    parser.add_argument(
        "--guidance", type=float, default=0.0, help="classifier-free guidance scale (off if <= 1)"
    )
    parser.set_defaults(run=run)


def read_prompts(prompts: list[str], prompts_file: Path | None) -> list[str]:
    from instaflow_edge.calibration.prompts import load_prompts

    prompts = list(prompts)
    if prompts_file is not None:
        if not prompts_file.is_file():
            why = "is a folder" if prompts_file.is_dir() else "does not exist"
            raise UserError(f"prompts file {prompts_file} {why}")
        prompts += load_prompts(prompts_file)
    if not prompts:
        raise UserError("no prompt given: use --prompt TEXT or --prompts FILE")
    for prompt in prompts:
        if not prompt.strip():
            raise UserError("empty prompt: describe the image to generate")
    return prompts


def output_paths(out: Path, count: int, overwrite: bool = False) -> list[Path]:
    """The PNG files a run writes; existing ones are refused unless `overwrite`."""
    if out.suffix.lower() != ".png":
        raise UserError(f"output {out} must be a .png file name")
    if not out.parent.is_dir():
        raise UserError(f"output folder {out.parent} does not exist")
    check_writable(out.parent)
    paths = (
        [out] if count == 1 else [out.with_name(f"{out.stem}-{i:03d}.png") for i in range(count)]
    )
    for path in paths:
        if path.is_dir() or (path.exists() and not overwrite):
            raise UserError(f"{path} already exists: choose another --out or pass --overwrite")
    return paths


def resolve_device(requested: str) -> str:
    import torch

    if requested.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("CUDA was asked for but is not available here: running on cpu")
        return "cpu"
    if not requested.startswith(("cpu", "cuda")):
        raise UserError(f"unknown device {requested!r}: use cpu or cuda")
    return requested


def run(args: argparse.Namespace) -> int:
    prompts = read_prompts(args.prompt, args.prompts)
    paths = output_paths(args.out, len(prompts), args.overwrite)
    if args.batch_size < 1 or args.steps < 1:
        raise UserError("--batch-size and --steps must be at least 1")

    if args.bundle is not None:
        return run_bundle(args, prompts, paths)
    if args.runtime_option:
        raise UserError("--runtime-option sets a bundle's runtime: it needs --bundle")

    from tqdm import tqdm

    from instaflow_edge.atomic import atomic_file
    from instaflow_edge.pipeline import OneStepPipeline
    from instaflow_edge.quiet import quiet_libraries

    quiet_libraries()
    pipeline = OneStepPipeline.from_pretrained(args.model, device=resolve_device(args.device))
    input_ids = pipeline.tokenize(prompts)
    noise = pipeline.make_noise(range(args.seed, args.seed + len(prompts)))
    starts = range(0, len(prompts), args.batch_size)
    for start in tqdm(starts, desc="generate", unit="batch", disable=len(starts) == 1):
        batch = slice(start, start + args.batch_size)
        images = pipeline(
            input_ids=input_ids[batch],
            noise=noise[batch],
            num_steps=args.steps,
            guidance_scale=args.guidance,
        )
        for image, path in zip(images, paths[batch], strict=True):
            with atomic_file(path) as staging:
                image.save(staging, format="PNG")
    log_written(paths)
    return 0


def run_bundle(args: argparse.Namespace, prompts: list[str], paths: list[Path]) -> int:
    """The one-step recipe on a bundle's runtime (ONNX Runtime, ...), from numpy in and out."""
    if args.steps != 1 or args.guidance > 1.0:
        raise UserError("a bundle runs the one-step recipe: --steps and --guidance need --model")
    from PIL import Image
    from tqdm import tqdm

    from instaflow_edge.atomic import atomic_file
    from instaflow_edge.runtimes import load_session

    options = runtime_options(args.bundle, args.runtime_option)
    session = load_session(args.bundle, args.device, options)
    input_ids = session.tokenize(prompts)
    seeds = range(args.seed, args.seed + len(prompts))
    noise = seeded_noise(seeds, tuple(session.recipe.latent_shape))
    starts = range(0, len(prompts), args.batch_size)
    for start in tqdm(starts, desc="generate", unit="batch", disable=len(starts) == 1):
        batch = slice(start, start + args.batch_size)
        images = session.generate(input_ids[batch], noise[batch])
        for image, path in zip(images, paths[batch], strict=True):
            with atomic_file(path) as staging:
                Image.fromarray(image).save(staging, format="PNG")
    logger.info("ran %s on %s", args.bundle, session.executed_on)
    log_written(paths)
    return 0


def seeded_noise(seeds: range, latent_shape: tuple[int, ...]):
    """The reference's noise (torch's CPU generator) when torch is installed, so a bundle and
    --model give the same image for a seed; without torch, numpy's (other images, same use)."""
    import numpy as np

    try:
        import torch
    except ImportError:
        logger.info("torch is not installed: noise from numpy (images differ from --model's)")
        return np.stack(
            [
                np.random.default_rng(seed).standard_normal(latent_shape, dtype=np.float32)
                for seed in seeds
            ]
        )
    return np.stack(
        [
            torch.randn(latent_shape, generator=torch.Generator("cpu").manual_seed(seed)).numpy()
            for seed in seeds
        ]
    )


def log_written(paths: list[Path]) -> None:
    where = paths[0] if len(paths) == 1 else f"{len(paths)} images, {paths[0]} to {paths[-1].name}"
    logger.info("wrote %s", where)
