"""Benchmark: InstaFlow's stages on the sd15 preset (UNet 860 M, 64x64 latents) on this machine.

Runs, each as its own `instaflow-edge` process (peak memory is per process), in a scratch folder:
1. `train flow --init sd15 --mixed-precision bf16 --gradient-checkpointing --steps 2
   --batch-size 1` on four 512x512 captioned images named by a metadata.jsonl (so its latents
   are 64x64), the issue's acceptance command;
2. `train pairs` from that model's ODE for the captions (2 Euler steps);
3. `train reflow` and 4. `train distill` on the pairs (2 steps each, bf16, checkpointing);
5. `export --target onnx` of the distilled model.
Each step's wall time, the process's peak RSS and, for training stages, the time of the second
optimizer step (from loss.csv's samples/s) go to bench/results/train_sd15_smoke.json.

Usage: python bench/train_sd15_smoke.py        (about 15 minutes and 21 GB here)
"""

from __future__ import annotations

import csv
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

RESULTS = Path(__file__).resolve().parent / "results" / "train_sd15_smoke.json"
CAPTIONS = [
    "a red circle above a blue square",
    "two small green triangles on a white background",
    "a yellow square left of a red circle",
    "three large blue circles",
]
TRAINING = ["--mixed-precision", "bf16", "--gradient-checkpointing", "--steps", "2"]
TRAINING += ["--batch-size", "1", "--threads", str(os.cpu_count())]


def write_images(folder: Path) -> Path:
    """The captions drawn by the synthetic renderer, upscaled to 512x512, and metadata.jsonl."""
    from instaflow_edge.synthetic.captions import parse_caption
    from instaflow_edge.synthetic.render import render

    folder.mkdir()
    rng = random.Random(0)
    rows = []
    for index, caption in enumerate(CAPTIONS):
        pixels = render(parse_caption(caption), rng)
        name = f"image-{index}.png"
        Image.fromarray(np.asarray(pixels)).resize((512, 512), Image.Resampling.NEAREST).save(
            folder / name
        )
        rows.append(json.dumps({"file_name": name, "caption": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder / "metadata.jsonl"


# runs instaflow-edge in this process, then reports the process's own peak RSS
MEASURED = """import resource, runpy, sys
sys.argv = ["instaflow-edge", *sys.argv[1:]]
try:
    runpy.run_module("instaflow_edge", run_name="__main__")
finally:
    print("PEAK_RSS_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def run(name: str, args: list[str], cwd: Path) -> dict:
    """One instaflow-edge process: its wall time and its peak RSS."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", MEASURED, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    peak = int(done.stderr.rsplit("PEAK_RSS_KIB", 1)[1].split()[0]) / 2**20
    row = {"step": name, "command": "instaflow-edge " + " ".join(args), "wall_s": round(seconds, 1)}
    row["peak_rss_gib"] = round(peak, 2)
    losses = cwd / args[-1] / "loss.csv" if args[0] == "train" else None
    if losses is not None and losses.is_file():
        with losses.open() as handle:
            rows = list(csv.DictReader(handle))
        row["second_step_s"] = round(1.0 / float(rows[-1]["samples_per_s"]), 1)
        row["losses"] = [float(r["loss"]) for r in rows]
    print(json.dumps(row), file=sys.stderr)
    return row


def main() -> int:
    import torch

    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as scratch:
        work = Path(scratch)
        metadata = write_images(work / "images")
        steps = [
            ("flow", ["train", "flow", "--init", "sd15", "--prompts", str(metadata), *TRAINING]),
            ("pairs", ["train", "pairs", "--init", "flow/model", "--prompts", str(metadata),
                       "--sample-steps", "2", "--guidance", "1", "--shard-size", "2"]),
            ("reflow", ["train", "reflow", "--init", "flow/model", "--pairs", "pairs", *TRAINING]),
            ("distill", ["train", "distill", "--init", "reflow/model", "--pairs", "pairs",
                         *TRAINING]),
            ("export", ["export", "--model", "distill/model", "--target", "onnx", "--precision",
                        "fp32"]),
        ]  # fmt: skip
        rows = []
        for name, args in steps:
            rows.append(run(name, [*args, "--out", name], work))
        bundle = work / "export"
        files = {p.name: p.stat().st_size for p in bundle.rglob("*") if p.is_file()}
    result = {
        "model": "sd15 preset (UNet 860 M, text encoder 123 M, VAE 84 M), random weights",
        "data": "4 captioned 512x512 images (64x64 latents), metadata.jsonl",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "rows": rows,
        "bundle_bytes": sum(files.values()),
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print("| step | wall | 2nd step | peak RSS |\n|---|---|---|---|")
    for row in rows:
        second = f"{row['second_step_s']} s" if "second_step_s" in row else "-"
        print(f"| {row['step']} | {row['wall_s']} s | {second} | {row['peak_rss_gib']} GiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
