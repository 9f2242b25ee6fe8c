"""Benchmark: one training step of the sd15 preset's UNet (860 M parameters) on this machine.

Each setting runs in its own process (peak memory is per process): the UNet with seeded random
weights, a rectified-flow loss on one 64x64-latent sample and a 77-token text state, through
`train.loop.fit` (AdamW, fp32 master weights) for 2 steps; the second step's time and the
process's peak RSS are reported. Settings: fp32, bf16 autocast, and each with gradient
checkpointing. Writes bench/results/train_sd15_cpu.json and prints a table.

Usage: python bench/train_sd15_memory.py
"""

from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "train_sd15_cpu.json"
SETTINGS = {
    "fp32": {"mixed_precision": "no", "gradient_checkpointing": False},
    "fp32 + checkpointing": {"mixed_precision": "no", "gradient_checkpointing": True},
    "bf16": {"mixed_precision": "bf16", "gradient_checkpointing": False},
    "bf16 + checkpointing": {"mixed_precision": "bf16", "gradient_checkpointing": True},
}


def one(name: str) -> dict:
    """Run one setting in this process; its step time and peak memory."""
    import torch

    from instaflow_edge.flow import rectified_flow_loss
    from instaflow_edge.presets import build_modules
    from instaflow_edge.train.config import TrainConfig
    from instaflow_edge.train.distributed import World
    from instaflow_edge.train.loop import fit

    unet = build_modules("sd15")["unet"].train()
    config = TrainConfig(steps=2, checkpoint_every=1000, batch_size=1, warmup=1, **SETTINGS[name])
    starts = []

    def loss_fn(batch) -> torch.Tensor:
        generator = batch.generator
        starts.append(time.perf_counter())
        data = torch.randn(1, 4, 64, 64, generator=generator)
        noise = torch.randn(1, 4, 64, 64, generator=generator)
        states = torch.randn(1, 77, 768, generator=generator)
        t = torch.rand(1, generator=generator)
        latents = t[:, None, None, None] * data + (1 - t[:, None, None, None]) * noise
        velocity = unet(latents, (1 - t) * 1000, encoder_hidden_states=states).sample
        return rectified_flow_loss(velocity, noise, data)

    with tempfile.TemporaryDirectory() as scratch:
        fit({"unet": unet}, loss_fn, config, Path(scratch), World(), name)
    ended = time.perf_counter()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"setting": name, "step_s": round(ended - starts[1], 2), "peak_gib": peak_kib / 2**20}


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(json.dumps(one(sys.argv[2])))
        return 0
    rows = []
    for name in SETTINGS:
        done = subprocess.run(
            [sys.executable, __file__, "--one", name], capture_output=True, text=True
        )
        if done.returncode != 0:
            rows.append({"setting": name, "error": done.stderr.strip().splitlines()[-1]})
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], file=sys.stderr)
    import torch

    result = {
        "model": "sd15 preset UNet (860 M parameters), random weights",
        "sample": "batch 1, 64x64 latents, 77x768 text states, AdamW, 2 steps (the 2nd timed)",
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "rows": rows,
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print("| setting | step time | peak memory |\n|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['setting']} | failed: {row['error']} | |")
        else:
            print(f"| {row['setting']} | {row['step_s']:.1f} s | {row['peak_gib']:.1f} GiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
