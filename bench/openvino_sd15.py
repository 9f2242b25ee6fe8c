"""Benchmark the sd15 preset on OpenVINO (CPU): fp32 and int8-weights export, and UNet latency vs PyTorch.

Each phase runs in its own process so that its peak memory (ru_maxrss) is its own:
  export    the fp32 IR bundle (convert + save + the per-component parity check)
  quantize  int8-weights (NNCF INT8_ASYM) from the fp32 bundle
  latency   one UNet call at 64x64 latents, batch 1: PyTorch fp32, OpenVINO fp32 and int8
            (inference precision f32), interleaved round by round in one process
Usage: python bench/openvino_sd15.py [--runs 3] [--workdir DIR]; JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "openvino_sd15.json"
PROMPT = "a photo of an astronaut riding a horse on the moon"


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _size_mib(folder: Path) -> dict[str, float]:
    sizes = {
        part.name: sum(f.stat().st_size for f in part.rglob("*") if f.is_file()) / 2**20
        for part in sorted(folder.iterdir())
        if part.is_dir()
    }
    return {name: round(size, 1) for name, size in sizes.items()}


def phase_export(workdir: Path) -> dict:
    from instaflow_edge.export import get_exporter
    from instaflow_edge.pipeline import OneStepPipeline

    pipeline = OneStepPipeline.from_pretrained("sd15")
    start = time.perf_counter()
    get_exporter("openvino").export(pipeline, workdir / "fp32", "fp32")
    seconds = time.perf_counter() - start
    return {"export_s": round(seconds, 1), "sizes_mib": _size_mib(workdir / "fp32")}


def phase_quantize(workdir: Path) -> dict:
    from instaflow_edge.export import get_exporter

    start = time.perf_counter()
    get_exporter("openvino").quantize(workdir / "fp32", workdir / "int8", "int8-weights")
    seconds = time.perf_counter() - start
    return {"quantize_s": round(seconds, 1), "sizes_mib": _size_mib(workdir / "int8")}


def phase_latency(workdir: Path, runs: int) -> dict:
    from instaflow_edge.metrics import tensor_metrics
    from instaflow_edge.pipeline import OneStepPipeline
    from instaflow_edge.recipe import ONE_STEP_TIMESTEP
    from instaflow_edge.runtimes import load_session
    from instaflow_edge.runtimes.torch_ref import TorchSession

    pipeline = OneStepPipeline.from_pretrained("sd15")
    states = pipeline.encode_prompt(pipeline.tokenize([PROMPT])).numpy()
    noise = pipeline.make_noise([0]).numpy()
    timestep = np.full((1,), ONE_STEP_TIMESTEP, dtype=np.float32)
    feeds = {"sample": noise, "timestep": timestep, "encoder_hidden_states": states}
    sessions = {"torch_fp32": TorchSession(pipeline)}
    for name in ("fp32", "int8"):
        sessions[f"openvino_{name}"] = load_session(workdir / name, "cpu")
    timings: dict[str, list[float]] = {name: [] for name in sessions}
    outputs = {}
    for round_index in range(runs + 1):  # round 0 warms up
        for name, session in sessions.items():
            start = time.perf_counter()
            outputs[name] = session.run("unet", feeds)["out_sample"]
            if round_index:
                timings[name].append(time.perf_counter() - start)
    torch_p50 = statistics.median(timings["torch_fp32"])
    result = {}
    for name, times in timings.items():
        metrics = tensor_metrics(outputs["torch_fp32"], outputs[name])
        result[name] = {
            "p50_s": round(statistics.median(times), 3),
            "runs_s": [round(t, 3) for t in times],
            "speedup_vs_torch_fp32": round(torch_p50 / statistics.median(times), 3),
            "psnr_db": round(metrics["psnr_db"], 1) if name != "torch_fp32" else None,
        }
        if name != "torch_fp32":
            result[name]["executed_on"] = sessions[name].executed_on
            result[name]["inference_precision"] = sessions[name].inference_precision
    return result


def _run_phase(phase: str, workdir: Path, runs: int) -> dict:
    command = [sys.executable, __file__, "--phase", phase, "--workdir", str(workdir)]
    done = subprocess.run([*command, "--runs", str(runs)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"phase {phase} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed UNet calls per runtime (3)")
    parser.add_argument("--workdir", type=Path, help="where the bundles go (a temporary folder)")
    parser.add_argument(
        "--phase", choices=("export", "quantize", "latency"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.phase:
        phases = {
            "export": lambda: phase_export(args.workdir),
            "quantize": lambda: phase_quantize(args.workdir),
            "latency": lambda: phase_latency(args.workdir, args.runs),
        }
        result = phases[args.phase]()
        print(json.dumps({**result, "peak_rss_mib": round(_peak_mib())}))
        return
    import openvino
    import torch

    with tempfile.TemporaryDirectory(dir=args.workdir) as scratch:
        workdir = Path(scratch)
        results = {phase: _run_phase(phase, workdir, args.runs) for phase in ("export", "quantize")}
        results["latency"] = _run_phase("latency", workdir, args.runs)
    latency = results["latency"]
    results["machine"] = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "openvino": openvino.__version__,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    int8 = latency["openvino_int8"]
    print(
        f"UNet 64x64 batch 1: PyTorch fp32 {latency['torch_fp32']['p50_s']} s, "
        f"OpenVINO fp32 {latency['openvino_fp32']['p50_s']} s, int8-weights {int8['p50_s']} s "
        f"({int8['speedup_vs_torch_fp32']}x PyTorch fp32, {int8['psnr_db']} dB)"
    )


if __name__ == "__main__":
    main()
