"""Held-out evaluation: prompt accuracy from the checker, Fréchet Shape Distance and straightness."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from instaflow_edge.atomic import atomic_file
from instaflow_edge.flow import euler_times, straightness
from instaflow_edge.pipeline import OneStepPipeline
from instaflow_edge.synthetic.captions import parse_caption
from instaflow_edge.synthetic.checker import prompt_accuracy
from instaflow_edge.synthetic.features import features, frechet_distance, load_feature_net
from instaflow_edge.synthetic.render import render
from instaflow_edge.train.data import encode_images, render_batch
from instaflow_edge.train.distributed import World

EVAL_NOISE_SEED = 10_000_000  # noise seeds of the eval images: far from any training seed


@dataclass(frozen=True)
class Entry:
    """One row of the table: a model sampled with `steps` Euler steps and guidance."""

    name: str
    model: str
    steps: int = 1
    guidance: float = 0.0
    straightness: bool = False  # also measure straightness along the same Euler path


def held_out_prompts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed + 2)
    return render_batch(rng, count, held_out=True)[0]


@torch.no_grad()
def sample_with_trajectory(
    pipe: OneStepPipeline,
    noise: torch.Tensor,
    text: torch.Tensor,
    steps: int,
    guidance: float,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """pipe.sample_latents, also returning the states Z_0 .. Z_N it passed through."""
    states: list[torch.Tensor] = []
    velocity = pipe.velocity

    def recording(latents, timestep, text_states):
        if not states or states[-1] is not latents:  # guidance calls twice per state
            states.append(latents)
        return velocity(latents, timestep, text_states)

    pipe.velocity = recording
    try:
        final = pipe.sample_latents(noise, text, steps, guidance)
    finally:
        del pipe.velocity
    return final, [*states, final]


def generate(
    pipe: OneStepPipeline, prompts: list[str], entry: Entry, batch_size: int = 128
) -> tuple[np.ndarray, float | None]:
    """Images (NHWC uint8) for the prompts, and the mean straightness if the entry asks for it."""
    images, scores = [], []
    for start in tqdm(range(0, len(prompts), batch_size), desc=entry.name, unit="batch"):
        batch = prompts[start : start + batch_size]
        ids = pipe.tokenize(batch)
        noise = pipe.make_noise(
            range(EVAL_NOISE_SEED + start, EVAL_NOISE_SEED + start + len(batch))
        )
        text = pipe.encode_prompt(ids)
        if entry.straightness:
            latents, path = sample_with_trajectory(pipe, noise, text, entry.steps, entry.guidance)
            scores.append(straightness(path, euler_times(entry.steps)))
        else:
            latents = pipe.sample_latents(noise, text, entry.steps, entry.guidance)
        images.append(pipe.decode_to_uint8(latents))
    mean_straightness = float(torch.cat(scores).mean()) if scores else None
    return np.concatenate(images), mean_straightness


def evaluate(
    entries: list[Entry],
    feature_net_path: Path,
    prompts: list[str],
    seed: int,
    out_dir: Path,
    world: World,
) -> list[dict]:
    """Score every entry on prompts of the synthetic language (`held_out_prompts` unless the
    user gives others); rank 0 writes results.json and table.md."""
    count = len(prompts)
    net = load_feature_net(feature_net_path)
    rng = random.Random(seed + 3)
    reference = np.stack([render(parse_caption(p), rng) for p in prompts])
    reference_features = features(net, reference)
    second = np.stack([render(parse_caption(p), rng) for p in prompts])
    rows = [
        _row("rendered images (second layout sample)", "", second, prompts, net, reference_features)
    ]
    pipes: dict[str, OneStepPipeline] = {}
    for entry in entries:
        if entry.model not in pipes:
            pipes[entry.model] = OneStepPipeline.from_pretrained(entry.model)
        pipe = pipes[entry.model]
        if len(rows) == 1:  # the VAE's own ceiling: rendered images through encode + decode
            roundtrip = pipe.decode_to_uint8(encode_images(pipe, second))
            rows.append(
                _row(
                    "VAE round trip of rendered images",
                    "",
                    roundtrip,
                    prompts,
                    net,
                    reference_features,
                )
            )
        images, straight = generate(pipe, prompts, entry)
        sampling = f"{entry.steps} step{'s' * (entry.steps > 1)}"
        if entry.guidance > 1:
            sampling += f", guidance {entry.guidance:g}"
        row = _row(entry.name, sampling, images, prompts, net, reference_features)
        row["straightness"] = straight
        rows.append(row)
    if world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_file(out_dir / "results.json") as staging:
            staging.write_text(json.dumps({"prompts": count, "rows": rows}, indent=2) + "\n")
        with atomic_file(out_dir / "table.md") as staging:
            staging.write_text(markdown_table(rows, count))
    world.barrier()
    return rows


def _row(name, sampling, images, prompts, net, reference_features) -> dict:
    scores = prompt_accuracy(images, prompts)
    fsd = frechet_distance(features(net, images), reference_features)
    return {"model": name, "sampling": sampling, **scores, "fsd": fsd}


def markdown_table(rows: list[dict], count: int) -> str:
    lines = [
        f"Held-out prompts: {count}. Accuracy: share of images passing every check of the "
        "deterministic checker. FSD: Fréchet Shape Distance (lower is better). "
        "Straightness: E_t ||(Z1 - Z0) - v(Z_t, t)||^2 on the 25-step Euler path (lower is straighter).",
        "",
        "| model | sampling | prompt accuracy | colour | shape | count | position | FSD | straightness |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        straight = row.get("straightness")
        cells = [
            row["model"],
            row["sampling"] or "-",
            f"{row['accuracy']:.3f}",
            *(
                f"{row.get(key, float('nan')):.3f}"
                for key in ("colour", "shape", "count", "position")
            ),
            f"{row['fsd']:.2f}",
            "-" if straight is None else f"{straight:.4f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
