"""The training stages: VAE for the synthetic data, 1-RF, 2-RF (reflow) and one-step distillation."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from instaflow_edge.calibration.prompts import Captions
from instaflow_edge.errors import UserError
from instaflow_edge.flow import (
    distillation_loss,
    interpolate,
    rectified_flow_loss,
    unet_timestep,
)
from instaflow_edge.pipeline import OneStepPipeline
from instaflow_edge.recipe import ONE_STEP_TIMESTEP
from instaflow_edge.train.config import TrainConfig
from instaflow_edge.train.data import (
    captioned_batch,
    empty_prompt_ids,
    encode_images,
    images_to_tensor,
    render_batch,
    source_images,
    training_latents,
)
from instaflow_edge.train.distributed import World
from instaflow_edge.train.loop import CHECKPOINT, Share, fit
from instaflow_edge.train.pairs import load_pairs

logger = logging.getLogger(__name__)

# Each stage reads a model (a diffusers directory, or the initial weights), trains, logs OUT/loss.csv
# and its loss on a fixed held-out batch before and after (OUT/held_out_loss.json), and writes
# OUT/model with OneStepPipeline.save_pretrained; OUT/checkpoint makes it resumable.
MODEL = "model"
PROBE_SIZE = 32  # samples in a stage's fixed held-out batch (at most a quarter of the pairs)
PROBE_SEED = 9_000_000  # seeds the held-out batches: far from any training stream


def start_stage(out_dir: Path, resume: bool, world: World) -> bool:
    """True if the stage must run; False if OUT/model is there and --resume says keep it."""
    if (out_dir / MODEL).is_dir():
        if resume:
            logger.info("%s is done already: kept", out_dir / MODEL)
            return False
        raise UserError(f"{out_dir / MODEL} exists: choose another --out, or --resume to keep it")
    if (out_dir / CHECKPOINT).is_dir() and not resume:
        raise UserError(f"{out_dir} holds an interrupted run: add --resume, or use another --out")
    if world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    world.barrier()
    return True


def finish_stage(pipe: OneStepPipeline, out_dir: Path, config: TrainConfig, world: World) -> Path:
    if world.is_main:
        (out_dir / "config.json").write_text(config.to_json())
        pipe.save_pretrained(out_dir / MODEL)
    world.barrier()
    return out_dir / MODEL


def _sample(generator: torch.Generator, count: int, batch: int) -> torch.Tensor:
    return torch.randint(count, (batch,), generator=generator)


def _probe_generator() -> torch.Generator:
    return torch.Generator().manual_seed(PROBE_SEED)


def _hold_out(
    config: TrainConfig, source: Captions | None, size: int
) -> tuple[Captions | None, tuple[list[str], np.ndarray] | None]:
    """The training source, and a fixed batch of captions and images it never sees: the synthetic
    held-out split without a source; else the source's last records (PROBE_SIZE, at most a
    quarter), held back from training; none for a source of under 4 records."""
    rng = random.Random(config.seed + PROBE_SEED)
    if source is None:
        return None, render_batch(rng, PROBE_SIZE, held_out=True)
    held = min(PROBE_SIZE, len(source) // 4)
    if held == 0:
        return source, None
    held_out = source[len(source) - held :]
    return source[: len(source) - held], (held_out.captions, source_images(held_out, rng, size))


def train_vae(
    pipe: OneStepPipeline,
    out_dir: Path,
    config: TrainConfig,
    world: World,
    source: Captions | None = None,
) -> Path:
    """Autoencoder (MSE + a small KL) on synthetic images, or on the source's (image files, or
    its captions rendered), then scaling factor = 1 / latent std."""
    vae = pipe.vae
    source, held_out_batch = _hold_out(config, source, pipe.image_size)

    if held_out_batch is not None:
        held_out = images_to_tensor(held_out_batch[1]).to(pipe.device)

    def probe() -> torch.Tensor:
        posterior = vae.encode(held_out).latent_dist
        reconstruction = vae.decode(posterior.mode()).sample
        return F.mse_loss(reconstruction, held_out) + config.kl_weight * posterior.kl().mean()

    def loss_fn(batch: Share) -> torch.Tensor:
        rng = random.Random(int(torch.randint(2**31, (1,), generator=batch.generator)))
        images = captioned_batch(source, rng, batch.size, pipe.image_size)[1][batch.part]
        pixels = images_to_tensor(images).to(pipe.device)
        posterior = vae.encode(pixels).latent_dist
        shape = (batch.size, *posterior.mean.shape[1:])
        noise = torch.randn(shape, generator=batch.generator)[batch.part].to(pipe.device)
        reconstruction = vae.decode(posterior.mean + posterior.std * noise).sample
        return F.mse_loss(reconstruction, pixels) + config.kl_weight * posterior.kl().mean()

    probe_fn = probe if held_out_batch is not None else None
    fit({"vae": vae}, loss_fn, config, out_dir, world, desc="vae", probe=probe_fn)
    vae.register_to_config(scaling_factor=1.0)
    _, images = captioned_batch(source, random.Random(config.seed + 7), 256, pipe.image_size)
    std = float(encode_images(pipe, images).std())
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    logger.info("vae: latent std %.4f, scaling factor %.5f", std, pipe.scaling_factor)
    return finish_stage(pipe, out_dir, config, world)


def train_flow(
    pipe: OneStepPipeline,
    out_dir: Path,
    config: TrainConfig,
    world: World,
    source: Captions | None = None,
) -> Path:
    """1-RF: rectified flow from noise to the latents of the training images (synthetic, or the
    source's), text-conditioned."""
    source, held_out_batch = _hold_out(config, source, pipe.image_size)
    # no more synthetic images than the steps can draw (a short run need not encode 20000)
    count = min(config.num_images, config.steps * config.batch_size * world.size)
    data = training_latents(pipe, out_dir / "data.safetensors", count, config.seed, world, source)
    latents, input_ids, empty = data["latents"], data["input_ids"], empty_prompt_ids(pipe)
    trainable = {"unet": pipe.unet}
    if config.train_text_encoder:
        trainable["text_encoder"] = pipe.text_encoder

    if held_out_batch is not None:  # latents once: the VAE does not change in this stage
        held_out = encode_images(pipe, held_out_batch[1]), pipe.tokenize(held_out_batch[0])
        held_out_noise = torch.randn(held_out[0].shape, generator=_probe_generator())

    def probe() -> torch.Tensor:
        t = torch.rand(len(held_out_noise), generator=_probe_generator())
        return _flow_loss(pipe, held_out_noise, *held_out, t, False)

    def loss_fn(batch: Share) -> torch.Tensor:
        index = _sample(batch.generator, len(latents), batch.size)
        drop = torch.rand(batch.size, generator=batch.generator) < config.caption_dropout
        ids = torch.where(drop[:, None], empty, input_ids[index])
        noise = torch.randn((batch.size, *latents.shape[1:]), generator=batch.generator)
        t = torch.rand(batch.size, generator=batch.generator)
        mine = batch.part
        return _flow_loss(
            pipe, noise[mine], latents[index][mine], ids[mine], t[mine], config.train_text_encoder
        )

    probe_fn = probe if held_out_batch is not None else None
    fit(trainable, loss_fn, config, out_dir, world, desc="flow", probe=probe_fn)
    return finish_stage(pipe, out_dir, config, world)


def _flow_loss(pipe, noise, data, ids, t, grad_text: bool) -> torch.Tensor:
    """The rectified-flow loss between noise and data at times t in [0, 1]."""
    device = pipe.device
    noisy = interpolate(noise, data, t).to(device)
    with torch.set_grad_enabled(grad_text):
        states = pipe.text_encoder(ids.to(device))[0]
    v = pipe.unet(noisy, unet_timestep(t).to(device), encoder_hidden_states=states).sample
    return rectified_flow_loss(v, noise.to(device), data.to(device))


def _split_pairs(pairs_dir: Path) -> tuple[dict, dict]:
    """The pairs to train on, and the last ones (PROBE_SIZE, at most a quarter) held out."""
    pairs = load_pairs(pairs_dir)
    count = len(pairs["z0"])
    held = min(PROBE_SIZE, count // 4)
    return (
        {key: value[: count - held] for key, value in pairs.items()},
        {key: value[count - held :] for key, value in pairs.items()},
    )


def train_reflow(
    pipe: OneStepPipeline, pairs_dir: Path, out_dir: Path, config: TrainConfig, world: World
) -> Path:
    """2-RF: the same objective on the teacher's (Z0, Z1) pairs, from the teacher's weights."""
    pairs, held_out = _split_pairs(pairs_dir)

    def loss(batch: dict, t: torch.Tensor) -> torch.Tensor:
        return _flow_loss(pipe, batch["z0"], batch["z1"], batch["input_ids"], t, False)

    def loss_fn(batch: Share) -> torch.Tensor:
        index = _sample(batch.generator, len(pairs["z0"]), batch.size)
        t = torch.rand(batch.size, generator=batch.generator)
        mine = index[batch.part]
        return loss({key: value[mine] for key, value in pairs.items()}, t[batch.part])

    def probe() -> torch.Tensor:
        return loss(held_out, torch.rand(len(held_out["z0"]), generator=_probe_generator()))

    fit({"unet": pipe.unet}, loss_fn, config, out_dir, world, desc="reflow", probe=probe)
    return finish_stage(pipe, out_dir, config, world)


def train_distill(
    pipe: OneStepPipeline, pairs_dir: Path, out_dir: Path, config: TrainConfig, world: World
) -> Path:
    """One-step student from the teacher's weights: Z0 + s(Z0, 1000 | text) ~ Z1, in latents, with
    config.distill_loss (L2, or pseudo-Huber).

    A perceptual (LPIPS) term would need backbone weights that cannot be downloaded here: not used.
    """
    pairs, held_out = _split_pairs(pairs_dir)
    device = pipe.device

    def loss(batch: dict) -> torch.Tensor:
        z0, z1 = batch["z0"].to(device), batch["z1"].to(device)
        with torch.no_grad():
            states = pipe.text_encoder(batch["input_ids"].to(device))[0]
        timestep = torch.full((len(z0),), ONE_STEP_TIMESTEP, device=device)
        v = pipe.unet(z0, timestep, encoder_hidden_states=states).sample
        return distillation_loss(z0 + v, z1, config.distill_loss)

    def loss_fn(batch: Share) -> torch.Tensor:
        mine = _sample(batch.generator, len(pairs["z0"]), batch.size)[batch.part]
        return loss({key: value[mine] for key, value in pairs.items()})

    def probe() -> torch.Tensor:
        return loss(held_out)

    fit({"unet": pipe.unet}, loss_fn, config, out_dir, world, desc="distill", probe=probe)
    return finish_stage(pipe, out_dir, config, world)
