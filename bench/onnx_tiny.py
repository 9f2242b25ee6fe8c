"""Benchmark: does ONNX Runtime's graph optimiser help on CPU for the embedded model? UNet and
end-to-end latency of plain, CPU-optimised and fused ONNX bundles against PyTorch fp32, all
measured in this run; writes bench/results/onnx_tiny_cpu.json.

Usage: python bench/onnx_tiny.py [--runs N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np

from instaflow_edge.latency import time_calls

RESULTS = Path(__file__).resolve().parent / "results" / "onnx_tiny_cpu.json"
PROMPT = "a red circle above a blue square"


def percentiles(call, runs: int, warmup: int = 5) -> dict[str, float]:
    times = time_calls(call, runs, warmup)
    return {"p50_ms": float(np.percentile(times, 50)), "p90_ms": float(np.percentile(times, 90))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50, help="timed calls per measurement (50)")
    args = parser.parse_args()

    import onnxruntime
    import torch

    from instaflow_edge.export import get_exporter
    from instaflow_edge.pipeline import OneStepPipeline
    from instaflow_edge.runtimes.onnxruntime import OnnxRuntime
    from instaflow_edge.runtimes.torch_ref import TorchSession

    pipeline = OneStepPipeline.from_pretrained()
    ids, noise = pipeline.tokenize([PROMPT]), pipeline.make_noise([0])
    io = pipeline.component_io(ids, noise)
    unet_feeds = {k: v for k, v in io["unet"].items() if k != "out_sample"}
    reference = TorchSession(pipeline)
    results = {
        "pytorch_fp32": {
            "unet": percentiles(lambda: reference.run("unet", unet_feeds), args.runs),
            "end_to_end": percentiles(
                lambda: reference.generate(ids.numpy(), noise.numpy()), args.runs
            ),
        }
    }
    exporter = get_exporter("onnx")
    with tempfile.TemporaryDirectory() as work:
        variants = {
            "onnx_fp32": {"fused": True},
            "onnx_fp32_cpu_optimised": {"device": "cpu"},
        }
        for name, options in variants.items():
            bundle = exporter.export(pipeline, Path(work) / name, "fp32", options)
            session = OnnxRuntime().load(bundle, "cpu", fused=False)
            unet = session.prepare("unet", unet_feeds)
            results[name] = {
                "executed_on": session.executed_on,
                "unet": percentiles(unet, args.runs),
                "end_to_end": percentiles(
                    lambda s=session: s.generate(ids.numpy(), noise.numpy()), args.runs
                ),
            }
            if options.get("fused"):  # the same bundle, generating through its one graph
                fused = OnnxRuntime().load(bundle, "cpu", fused=True)
                results[name]["end_to_end_fused_generator"] = percentiles(
                    lambda s=fused: s.generate(ids.numpy(), noise.numpy()), args.runs
                )
    torch_ms = results["pytorch_fp32"]
    for measured in results.values():
        measured["ratio_vs_pytorch_p50"] = {
            key: value["p50_ms"] / torch_ms[key.replace("_fused_generator", "")]["p50_ms"]
            for key, value in measured.items()
            if isinstance(value, dict) and "p50_ms" in value
        }
    output = {
        "benchmark": "embedded tiny model, batch 1, CPU: UNet call and end-to-end one-step generation",
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average_1min": os.getloadavg()[0],
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "onnxruntime": onnxruntime.__version__,
        },
        "runs": args.runs,
        "results": results,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(output, indent=2) + "\n")
    print(json.dumps(output, indent=2))


if __name__ == "__main__":
    main()
