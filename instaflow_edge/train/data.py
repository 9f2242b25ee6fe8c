"""Training data: the recipe's initial model, and synthetic captioned images and their latents."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import CLIPTokenizer

from instaflow_edge.atomic import atomic_file
from instaflow_edge.models import EMBEDDED_MODEL_DIR, LoadedModel
from instaflow_edge.pipeline import OneStepPipeline
from instaflow_edge.presets import build_modules
from instaflow_edge.synthetic.captions import sample_split
from instaflow_edge.synthetic.render import render
from instaflow_edge.train.distributed import World

INITIAL = "initial"  # --init value: the tiny preset's seeded random weights


def initial_pipeline(seed: int) -> OneStepPipeline:
    """The tiny architecture with seeded random weights and the shipped tokenizer: the recipe's start."""
    tokenizer = CLIPTokenizer.from_pretrained(EMBEDDED_MODEL_DIR / "tokenizer")
    modules = build_modules("tiny", seed=seed)
    return OneStepPipeline(LoadedModel(tokenizer=tokenizer, source="initial:tiny", **modules))


def load_pipeline(model: str | Path, seed: int, device: str) -> OneStepPipeline:
    """A stage's starting model: INITIAL, or anything OneStepPipeline.from_pretrained loads."""
    if str(model) == INITIAL:
        return initial_pipeline(seed).to(device)
    return OneStepPipeline.from_pretrained(model, device=device)


def empty_prompt_ids(pipe: OneStepPipeline) -> torch.Tensor:
    """Token ids (1, L) of the empty prompt: the unconditional input of classifier-free guidance."""
    ids = pipe.tokenizer([""], padding="max_length", max_length=pipe.max_length).input_ids
    return torch.tensor(ids)


def render_batch(
    rng: random.Random, count: int, held_out: bool = False
) -> tuple[list[str], np.ndarray]:
    """`count` captions of one split and their rendered NHWC uint8 images."""
    captions, images = [], []
    for _ in range(count):
        caption, scene = sample_split(rng, held_out)
        captions.append(caption)
        images.append(render(scene, rng))
    return captions, np.stack(images)


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """NHWC uint8 to NCHW float in [-1, 1], the VAE's input range."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


@torch.no_grad()
def encode_images(pipe: OneStepPipeline, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """Scaled latents (the mean of the VAE posterior times the scaling factor) of NHWC images."""
    chunks = []
    for start in range(0, len(images), batch_size):
        pixels = images_to_tensor(images[start : start + batch_size]).to(pipe.device)
        chunks.append(pipe.vae.encode(pixels).latent_dist.mode().cpu())
    return (torch.cat(chunks) * pipe.scaling_factor).contiguous()


def synthetic_latents(
    pipe: OneStepPipeline, path: Path, count: int, seed: int, world: World
) -> dict:
    """Latents and token ids of `count` training-split images; rank 0 builds the cache file once."""
    if world.is_main and not path.is_file():
        rng = random.Random(seed)
        latents, ids = [], []
        for start in tqdm(range(0, count, 1024), desc="encode data", unit="chunk"):
            captions, images = render_batch(rng, min(1024, count - start))
            latents.append(encode_images(pipe, images))
            ids.append(pipe.tokenize(captions))
        with atomic_file(path) as staging:
            save_file({"latents": torch.cat(latents), "input_ids": torch.cat(ids)}, str(staging))
    world.barrier()
    return load_file(str(path))
