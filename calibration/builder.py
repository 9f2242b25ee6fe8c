"""Build a calibration set: run the PyTorch reference once per prompt at t=1000 and record it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from instaflow_edge.atomic import atomic_directory, check_replaceable
from instaflow_edge.calibration.dataset import INDEX_NAME, write_calibration
from instaflow_edge.errors import UserError
from instaflow_edge.pipeline import OneStepPipeline


def build_calibration(
    pipeline: OneStepPipeline,
    prompts: list[str],
    out: Path,
    seed: int = 0,
    shard_size: int = 64,
    batch_size: int = 8,
    overwrite: bool = False,
) -> Path:
    """Record every component's exact inputs and outputs for each prompt (noise seed seed+i).

    The set appears at `out` only when complete (written in a staging directory, then renamed).
    """
    from safetensors.numpy import save_file

    if not prompts:
        raise UserError("no prompts to calibrate with")
    check_replaceable(Path(out), overwrite, INDEX_NAME)
    seeds = list(range(seed, seed + len(prompts)))
    shards = []
    with atomic_directory(Path(out), overwrite, INDEX_NAME) as staging:
        progress = tqdm(total=len(prompts), desc="calibrate", unit="prompt")
        for start in range(0, len(prompts), shard_size):
            end = min(start + shard_size, len(prompts))
            recorded: dict[str, list[np.ndarray]] = {}
            for batch_start in range(start, end, batch_size):
                batch = slice(batch_start, min(batch_start + batch_size, end))
                io = pipeline.component_io(
                    pipeline.tokenize(prompts[batch]), pipeline.make_noise(seeds[batch])
                )
                for component, tensors in io.items():
                    for name, value in tensors.items():
                        recorded.setdefault(f"{component}/{name}", []).append(value)
                progress.update(batch.stop - batch.start)
            name = f"shard-{len(shards):05d}.safetensors"
            # safetensors' numpy writer stores an array's memory as it lies: PyTorch's CPU
            # convolutions return a batch channels-last, which it would write transposed
            tensors = {k: np.ascontiguousarray(np.concatenate(v)) for k, v in recorded.items()}
            save_file(tensors, staging / name)
            shards.append(name)
        progress.close()
        write_calibration(staging, pipeline.source, prompts, seeds, shards)
    return Path(out)
