"""Benchmark: export the sd15 preset to ONNX (external data), then one UNet call on ONNX Runtime CPU
against PyTorch fp32 in the same run; writes bench/results/onnx_sd15_cpu.json.

Each stage runs in its own child process so that its peak memory (ru_maxrss) is its own.
Usage: python bench/onnx_sd15.py [--runs N] [--keep DIR]   (about 8 GB RAM, several minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "onnx_sd15_cpu.json"
SEED = 0


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def unet_feeds(spec) -> dict:
    """The UNet's inputs at batch 1: seeded noise and text states, timestep 1000."""
    import numpy as np

    rng = np.random.default_rng(SEED)
    feeds = {}
    for tensor in spec.inputs:
        shape = [1 if isinstance(size, str) else size for size in tensor.shape]
        feeds[tensor.name] = (
            np.full(shape, 1000.0, dtype=np.float32)
            if tensor.name == "timestep"
            else rng.standard_normal(shape, dtype=np.float32)
        )
    return feeds


def median_seconds(call, runs: int) -> tuple[float, list[float]]:
    call()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], times


def stage_export(bundle: Path) -> dict:
    from instaflow_edge.export import get_exporter
    from instaflow_edge.pipeline import OneStepPipeline

    start = time.perf_counter()
    pipeline = OneStepPipeline.from_pretrained("sd15")
    loaded = time.perf_counter()
    get_exporter("onnx").export(pipeline, bundle, "fp32")
    done = time.perf_counter()
    manifest = json.loads((bundle / "manifest.json").read_text())
    return {
        "model_build_s": loaded - start,
        "export_and_parity_s": done - loaded,
        "peak_rss_gib": peak_rss_gib(),
        "parity_vs_pytorch": manifest["details"]["parity"],
        "files_mib": {
            str(p.relative_to(bundle)): p.stat().st_size / 2**20
            for p in sorted(bundle.rglob("*"))
            if p.is_file() and p.stat().st_size > 2**20
        },
    }


def stage_onnxruntime(bundle: Path, runs: int) -> dict:
    from instaflow_edge.runtimes.onnxruntime import OnnxRuntime

    start = time.perf_counter()
    session = OnnxRuntime().load(bundle, "cpu")
    loaded = time.perf_counter()
    call = session.prepare("unet", unet_feeds(session.specs["unet"]))
    median, times = median_seconds(call, runs)
    return {
        "executed_on": session.executed_on,
        "load_and_verify_s": loaded - start,
        "unet_median_s": median,
        "unet_runs_s": times,
        "peak_rss_gib": peak_rss_gib(),
    }


def stage_pytorch(runs: int) -> dict:
    import torch

    from instaflow_edge.components import component_specs
    from instaflow_edge.pipeline import OneStepPipeline

    pipeline = OneStepPipeline.from_pretrained("sd15")
    spec = component_specs(pipeline.shapes)["unet"]
    feeds = {k: torch.from_numpy(v) for k, v in unet_feeds(spec).items()}

    @torch.no_grad()
    def call():
        pipeline.unet(
            feeds["sample"], feeds["timestep"], encoder_hidden_states=feeds["encoder_hidden_states"]
        )

    median, times = median_seconds(call, runs)
    return {
        "torch_threads": torch.get_num_threads(),
        "unet_median_s": median,
        "unet_runs_s": times,
        "peak_rss_gib": peak_rss_gib(),
    }


def child(stage: str, *args: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--stage", stage, *args],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed UNet calls after a warm-up (3)")
    parser.add_argument("--keep", type=Path, help="keep the exported bundle here")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--bundle", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        result = {
            "export": lambda: stage_export(args.bundle),
            "onnxruntime": lambda: stage_onnxruntime(args.bundle, args.runs),
            "pytorch": lambda: stage_pytorch(args.runs),
        }[args.stage]()
        print(json.dumps(result))
        return
    work = Path(tempfile.mkdtemp(prefix="onnx-sd15-"))
    bundle = args.keep or work / "bundle"
    try:
        export = child("export", "--bundle", str(bundle))
        print(f"export: {json.dumps(export)}", flush=True)
        ort = child("onnxruntime", "--bundle", str(bundle), "--runs", str(args.runs))
        torch_ref = child("pytorch", "--runs", str(args.runs))
    finally:
        shutil.rmtree(work)
    import onnxruntime
    import torch

    result = {
        "benchmark": "sd15 preset (random weights): ONNX export, one UNet call 64x64 latents, batch 1",
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        "export": export,
        "onnxruntime_cpu": ort,
        "pytorch_fp32": torch_ref,
        "unet_latency_ratio_onnxruntime_over_pytorch": ort["unet_median_s"]
        / torch_ref["unet_median_s"],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
