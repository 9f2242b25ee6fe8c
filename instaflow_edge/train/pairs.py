"""Reflow pairs: a teacher's ODE solved from noise per prompt, written as resumable sharded safetensors."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import torch
from diffusers import DPMSolverMultistepScheduler
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from instaflow_edge.atomic import atomic_file
from instaflow_edge.errors import UserError
from instaflow_edge.pipeline import OneStepPipeline
from instaflow_edge.synthetic.captions import sample_split
from instaflow_edge.train.config import TrainConfig
from instaflow_edge.train.data import empty_prompt_ids
from instaflow_edge.train.distributed import World
from instaflow_edge.train.loop import autocast

logger = logging.getLogger(__name__)

MANIFEST = "pairs.json"


def synthetic_prompts(count: int, seed: int) -> list[str]:
    """Training-split captions for pair generation (never the held-out ones)."""
    rng = random.Random(seed + 1)  # not the stream the flow's training images came from
    return [sample_split(rng, held_out=False)[0] for _ in range(count)]


def shard_name(index: int) -> str:
    return f"pairs-{index:05d}.safetensors"


@torch.no_grad()
def _probability_flow(
    pipe: OneStepPipeline,
    scheduler: DPMSolverMultistepScheduler,
    noise: torch.Tensor,
    text: torch.Tensor,
    uncond: torch.Tensor | None,
    config: TrainConfig,
) -> torch.Tensor:
    """A diffusion model's probability-flow ODE from noise, solved by DPM-Solver."""
    scheduler.set_timesteps(config.sample_steps)
    latents = noise.to(pipe.device) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        output = pipe.velocity(model_input, t, text)
        if uncond is not None:
            output_uncond = pipe.velocity(model_input, t, uncond)
            output = output_uncond + config.guidance * (output - output_uncond)
        # fp32 output: the scheduler casts its state to the output's dtype (bf16 under autocast)
        latents = scheduler.step(output.float(), t, latents).prev_sample
    return latents


def generate_pairs(
    pipe: OneStepPipeline,
    kind: str,
    prompts: list[str],
    out_dir: Path,
    config: TrainConfig,
    world: World,
    teacher_name: str,
    batch_size: int = 256,
) -> None:
    """Write pairs for prompts[i] with noise seed config.seed + i into shards of config.shard_size.

    Shard k holds pairs k*S .. (k+1)*S - 1 and is made by rank k mod world size; a shard file
    exists only when complete, so a rerun skips finished shards and loses or repeats no pair.
    """
    manifest = {
        "teacher": teacher_name,
        "mixed_precision": config.mixed_precision,
        "teacher_kind": kind,
        "num_pairs": len(prompts),
        "shard_size": config.shard_size,
        "sample_steps": config.sample_steps,
        "guidance": config.guidance,
        "seed": config.seed,
    }
    if world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        existing = out_dir / MANIFEST
        if existing.is_file() and json.loads(existing.read_text()) != manifest:
            raise UserError(f"{out_dir} holds pairs made with other settings: use another --out")
        with atomic_file(existing) as staging:
            staging.write_text(json.dumps(manifest, indent=2) + "\n")
    world.barrier()
    scheduler = None
    if kind != "flow":
        scheduler = DPMSolverMultistepScheduler.from_pretrained(
            Path(teacher_name) / "scheduler", prediction_type=kind
        )
    use_guidance = config.guidance > 1.0
    uncond_ids = empty_prompt_ids(pipe)
    shards = range(world.rank, -(-len(prompts) // config.shard_size), world.size)
    todo = [k for k in shards if not (out_dir / shard_name(k)).is_file()]
    if len(todo) < len(shards):
        logger.info("pairs: %d of this process's shards are done already", len(shards) - len(todo))
    for shard in tqdm(todo, desc=f"pairs (rank {world.rank})", unit="shard", disable=not todo):
        first = shard * config.shard_size
        indices = list(range(first, min(first + config.shard_size, len(prompts))))
        z0s, z1s, ids = [], [], []
        for start in range(0, len(indices), batch_size):
            batch = indices[start : start + batch_size]
            input_ids = pipe.tokenize([prompts[i] for i in batch])
            noise = pipe.make_noise([config.seed + i for i in batch])
            with autocast(config):  # the teacher in bf16/fp16; the pairs are stored in fp32
                text = pipe.encode_prompt(input_ids)
                uncond_ids_batch = uncond_ids.expand(len(batch), -1)
                uncond = pipe.encode_prompt(uncond_ids_batch) if use_guidance else None
                if scheduler is None:
                    z1 = pipe.sample_latents(
                        noise, text, config.sample_steps, config.guidance, uncond
                    )
                else:
                    z1 = _probability_flow(pipe, scheduler, noise, text, uncond, config)
            z0s.append(noise)
            z1s.append(z1.float().cpu())
            ids.append(input_ids)
        tensors = {
            "z0": torch.cat(z0s),
            "z1": torch.cat(z1s),
            "input_ids": torch.cat(ids),
            "index": torch.tensor(indices, dtype=torch.int64),
        }
        with atomic_file(out_dir / shard_name(shard)) as staging:
            save_file(tensors, str(staging), metadata={"teacher": teacher_name})
    world.barrier()


def load_pairs(pairs_dir: Path) -> dict[str, torch.Tensor]:
    """All pairs of a finished pair directory, in index order; refuses missing or repeated pairs."""
    manifest_path = pairs_dir / MANIFEST
    if not manifest_path.is_file():
        raise UserError(f"{pairs_dir} is not a pair directory (no {MANIFEST})")
    manifest = json.loads(manifest_path.read_text())
    files = sorted(pairs_dir.glob("pairs-*.safetensors"))
    parts = [load_file(str(file)) for file in files]
    if not parts:
        raise UserError(f"{pairs_dir} has no pair shards yet: run the pairs stage")
    pairs = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
    index = pairs["index"]
    if len(index) != manifest["num_pairs"] or len(set(index.tolist())) != len(index):
        raise UserError(
            f"{pairs_dir} has {len(index)} pairs ({len(set(index.tolist()))} distinct) of "
            f"{manifest['num_pairs']}: finish it with `train pairs --resume`"
        )
    order = torch.argsort(index)
    return {key: value[order] for key, value in pairs.items()}


def shard_indices(pairs_dir: Path) -> list[int]:
    """The pair indices in every shard file, concatenated (to check for losses and repeats)."""
    found = []
    for file in sorted(pairs_dir.glob("pairs-*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            found += handle.get_tensor("index").tolist()
    return found
