"""Training data: the recipe's initial model, captioned images (synthetic, rendered from
captions, or image files named by a --prompts file) and their latents."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import CLIPTokenizer

from instaflow_edge.atomic import atomic_file
from instaflow_edge.calibration.prompts import IMAGE_COLUMNS, Captions, load_captions
from instaflow_edge.diffusers_format import flip_prediction, speaks_flow_prediction
from instaflow_edge.errors import UserError
from instaflow_edge.models import EMBEDDED_MODEL_DIR, LoadedModel
from instaflow_edge.pipeline import OneStepPipeline
from instaflow_edge.presets import build_modules
from instaflow_edge.synthetic.captions import is_drawable, parse_caption, sample_split
from instaflow_edge.synthetic.render import render
from instaflow_edge.train.distributed import World

logger = logging.getLogger(__name__)

INITIAL = "initial"  # --init value: the tiny preset's seeded random weights


def initial_pipeline(seed: int) -> OneStepPipeline:
    """The tiny architecture with seeded random weights and the shipped tokenizer: the recipe's start."""
    tokenizer = CLIPTokenizer.from_pretrained(EMBEDDED_MODEL_DIR / "tokenizer")
    modules = build_modules("tiny", seed=seed)
    return OneStepPipeline(LoadedModel(tokenizer=tokenizer, source="initial:tiny", **modules))


def teacher_kind(model: str | Path) -> str:
    """ "flow" for a rectified-flow model (ours, saved with a flow-prediction scheduler, or one
    without a scheduler); else its diffusers scheduler's prediction type (e.g. "epsilon")."""
    config = Path(model) / "scheduler" / "scheduler_config.json"
    if not config.is_file() or speaks_flow_prediction(Path(model)):
        return "flow"
    return json.loads(config.read_text()).get("prediction_type", "epsilon")


def load_pipeline(model: str | Path, seed: int, device: str) -> OneStepPipeline:
    """A stage's starting model: INITIAL, or anything OneStepPipeline.from_pretrained loads."""
    if str(model) == INITIAL:
        return initial_pipeline(seed).to(device)
    return OneStepPipeline.from_pretrained(model, device=device)


def to_flow(pipe: OneStepPipeline, model: str | Path) -> OneStepPipeline:
    """A training stage's start: an epsilon-prediction model (SD-1.5 style; its scheduler says
    so) becomes a flow model as InstaFlow starts from Stable Diffusion. Its UNet's output is
    negated: at the noise end (t = 1000, where a one-step model works) x is the noise, so
    epsilon ~ noise and the velocity data - noise ~ -epsilon. Training with the flow objective
    does the rest, and the saved model speaks flow prediction. Flow models pass unchanged."""
    kind = teacher_kind(model) if str(model) != INITIAL else "flow"
    if kind == "epsilon":
        flip_prediction(pipe.unet)
        logger.info("%s predicts epsilon: its UNet output is negated to start a flow model", model)
    elif kind != "flow":
        logger.info(
            "%s predicts %s: trained as a flow model from its weights as they are", model, kind
        )
    return pipe


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


def training_captions(path: Path, column: str | None = None) -> Captions:
    """A training stage's --prompts: captions with image files, or captions of the synthetic
    language (each rendered, with a fresh layout, whenever it is drawn)."""
    captions = load_captions(path, column=column)
    if captions.images is None:
        check_synthetic(
            path,
            captions.captions,
            f"and the file names no images (a {' or '.join(IMAGE_COLUMNS)} column of a .jsonl "
            "or .csv file): training needs an image per caption",
        )
    return captions


def check_synthetic(path: Path, captions: list[str], why: str) -> None:
    """Every caption is of the synthetic language and draws every shape it names."""
    for number, caption in enumerate(captions, start=1):
        try:
            scene = parse_caption(caption)
        except ValueError:
            raise UserError(
                f"{path}: caption {number} ({caption!r}) is not of the synthetic language {why}"
            ) from None
        if not is_drawable(scene):
            raise UserError(
                f"{path}: caption {number} ({caption!r}) hides a shape in its background"
            )


def load_image(path: Path, size: int) -> np.ndarray:
    """An image file as size x size RGB uint8 (HWC): centre-cropped to a square, then resized."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as error:
        raise UserError(f"image {path} cannot be read: {error}") from None
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    return np.asarray(square.resize((size, size), Image.Resampling.BICUBIC))


def source_images(source: Captions, rng: random.Random, size: int) -> np.ndarray:
    """Every record's image once, in order (NHWC uint8): its file, or its caption rendered."""
    if source.images is not None:
        return np.stack([load_image(file, size) for file in source.images])
    return np.stack([render(parse_caption(caption), rng) for caption in source.captions])


def captioned_batch(
    source: Captions | None, rng: random.Random, count: int, size: int
) -> tuple[list[str], np.ndarray]:
    """`count` training captions and NHWC uint8 images: synthetic ones without a source, else
    records of the source drawn with replacement (its image files, or its captions rendered)."""
    if source is None:
        return render_batch(rng, count)
    picks = [rng.randrange(len(source.captions)) for _ in range(count)]
    captions = [source.captions[i] for i in picks]
    if source.images is None:
        return captions, np.stack([render(parse_caption(c), rng) for c in captions])
    return captions, np.stack([load_image(source.images[i], size) for i in picks])


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


def training_latents(
    pipe: OneStepPipeline,
    path: Path,
    count: int,
    seed: int,
    world: World,
    source: Captions | None = None,
) -> dict:
    """Latents and token ids of the training images; rank 0 builds the cache file once.

    Without a source: `count` training-split synthetic images. With one: each of its image
    files once, or `count` renderings of its captions."""
    if world.is_main and not path.is_file():
        rng = random.Random(seed)
        latents, ids = [], []
        files = source is not None and source.images is not None
        total = len(source.captions) if files else count
        for start in tqdm(range(0, total, 1024), desc="encode data", unit="chunk"):
            size = min(1024, total - start)
            if files:
                chunk = source[start : start + size]
                captions, images = chunk.captions, source_images(chunk, rng, pipe.image_size)
            else:
                captions, images = captioned_batch(source, rng, size, pipe.image_size)
            latents.append(encode_images(pipe, images))
            ids.append(pipe.tokenize(captions))
        with atomic_file(path) as staging:
            save_file({"latents": torch.cat(latents), "input_ids": torch.cat(ids)}, str(staging))
    world.barrier()
    return load_file(str(path))
