"""NNCF settings for the sd15 UNet's int8-full (and the hybrid method), each quantized from one
fp32 IR and timed (bf16 where the CPU has it) beside PyTorch fp32, interleaved round by round in
one process.

What issue 16 asks of the UNet is >= 4x PyTorch fp32 at >= 35 dB; int8-full (W8A8, NNCF's
transformer preset) executed in bf16 was at 4.02x and 34.3 dB on an AVX-512 CPU. Each variant
below changes one setting of the exporter's call. Every variant is quantized in its own child
process (NNCF on this UNet peaks near 11 GiB) into `--work`, where a rerun finds it; PSNR is
measured on `--inputs` prompts of the synthetic set (the bench's own first prompt among them)
with fresh noise, against the PyTorch fp32 UNet.

  python bench/unet_int8_levers.py --bundle OPENVINO_FP32_SD15 --calibration SET --work DIR \
      [--variants first-layer-fix,overflow-fix,...] [--inputs 4] [--runs 3]
Writes bench/results/unet_int8_levers_sd15.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "results" / "unet_int8_levers_sd15"
MODEL_FILE = "openvino_model.xml"


def variants() -> dict[str, dict[str, Any]]:
    """What each variant passes to `nncf_quantize` for int8-full, by name. (Two more were tried
    and dropped: NNCF's MIXED preset is already what its transformer model type uses, and the
    converted UNet has no attention MatMuls to leave out: its attention is one
    ScaledDotProductAttention op.)"""
    from nncf.quantization.advanced_parameters import AdvancedSmoothQuantParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    return {
        # NNCF's default overflow fix: 7-bit weights in the first layer only
        "first-layer-fix": {"seven_bit_weights": False},
        # 7-bit weights everywhere (the exporter's default), so that CPUs without VNNI (AVX2's
        # u8 x s8 multiply-add saturates 16-bit sums) compute what was calibrated
        "overflow-fix": {},
        # on top of it: activation ranges from quantiles instead of min/max (outliers clipped)
        "quantile-ranges": {
            "advanced": {
                "activations_range_estimator_params": RangeEstimatorParametersSet.MEAN_QUANTILE
            }
        },
        # on top of it: SmoothQuant on the convolutions too (NNCF leaves them out by default)
        "smooth-convolutions": {
            "advanced": {
                "smooth_quant_alphas": AdvancedSmoothQuantParameters(convolution=0.5, matmul=0.95)
            }
        },
        # not int8-full but the `hybrid` method (optimum-intel's): int8 activations in the
        # convolutions only, the MatMuls' weights int8 and their activations as executed
        "hybrid": {"method": "hybrid"},
    }


def quantize_one(bundle: Path, calibration: Path, variant: str, out: Path) -> None:
    """One variant of the UNet's quantization (int8-full unless it names its method), saved at
    `out` (run in a child process)."""
    import openvino as ov

    from instaflow_edge.calibration import load_calibration
    from instaflow_edge.export.openvino import nncf_quantize
    from instaflow_edge.manifest import read_manifest
    from instaflow_edge.memory import status_mib

    spec = read_manifest(bundle).components["unet"].spec
    model = ov.Core().read_model(bundle / "unet" / MODEL_FILE)
    settings = dict(variants()[variant])
    method = settings.pop("method", "int8-full")
    start = time.perf_counter()
    quantized = nncf_quantize(model, spec, method, load_calibration(calibration), **settings)
    seconds = time.perf_counter() - start
    ov.save_model(quantized, out, compress_to_fp16=False)
    peak = status_mib("VmHWM")
    (out.parent / "quantized.json").write_text(
        json.dumps({"quantize_s": round(seconds, 1), "peak_rss_mib": peak})
    )


def unet_inputs(count: int) -> tuple[Any, list[dict[str, np.ndarray]], list[np.ndarray]]:
    """The PyTorch fp32 reference, and the UNet's inputs and outputs on the first `count`
    synthetic prompts with noise seeds 0..count-1 (the bench's first prompt and seed among them)."""
    from instaflow_edge.calibration.prompts import load_prompts
    from instaflow_edge.runtimes.torch_ref import load_reference

    reference = load_reference("sd15", "cpu")
    feeds, outputs = [], []
    for seed, prompt in enumerate(load_prompts("synthetic", count)):
        ids = reference.pipeline.tokenize([prompt])
        noise = reference.pipeline.make_noise([seed])
        io = reference.pipeline.component_io(ids, noise)["unet"]
        outputs.append(io.pop("out_sample"))
        feeds.append(io)
    return reference, feeds, outputs


def measure(work: Path, names: list[str], count: int, runs: int) -> dict[str, Any]:
    """PSNR on `count` inputs and latency (bf16) of each variant, interleaved with PyTorch."""
    import openvino as ov

    from instaflow_edge.latency import interleaved, machine, summarize
    from instaflow_edge.metrics import tensor_metrics

    reference, feeds, outputs = unet_inputs(count)
    core = ov.Core()
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "bf16"}
    compiled = {v: core.compile_model(str(work / v / MODEL_FILE), "CPU", config) for v in names}
    requests = {v: model.create_infer_request() for v, model in compiled.items()}
    # bf16 where the CPU has it; OpenVINO runs f32 where it does not, and says so
    executed = compiled[names[0]].get_property("INFERENCE_PRECISION_HINT").get_type_name()
    rows: dict[str, Any] = {}
    for variant, request in requests.items():
        psnr = []
        for feed, expected in zip(feeds, outputs, strict=True):
            request.infer(feed)
            psnr.append(tensor_metrics(expected, request.get_output_tensor(0).data)["psnr_db"])
        made = json.loads((work / variant / "quantized.json").read_text())
        rows[variant] = {
            "psnr_db": [round(p, 2) for p in psnr],
            "psnr_mean_db": round(float(np.mean(psnr)), 2),
            "psnr_min_db": round(float(np.min(psnr)), 2),
            **made,
        }
    load_before = os.getloadavg()[0]
    calls = {"pytorch-fp32": lambda: reference.run("unet", feeds[0])}
    calls.update({v: (lambda r=r: r.infer(feeds[0])) for v, r in requests.items()})
    times = interleaved(calls, runs, warmup=1, desc="UNet")
    torch_p50 = summarize(times["pytorch-fp32"])["p50_ms"]
    for variant in names:
        p50 = summarize(times[variant])["p50_ms"]
        rows[variant].update({"p50_ms": round(p50, 1), "speedup": round(torch_p50 / p50, 3)})
    return {
        "machine": machine(),
        "cpu_capabilities": core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"),
        "executed_precision": executed,
        "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        "runs": runs,
        "inputs": count,
        "pytorch_fp32_p50_ms": round(torch_p50, 1),
        "variants": rows,
    }


def markdown(result: dict[str, Any], command: str) -> str:
    cpu = result["machine"]["cpu"]
    lines = [
        f"`{command}`",
        "",
        f"UNet at 64x64 latents, batch 1, bf16 asked for, executed in "
        f"{result['executed_precision']} (OpenVINO's CPU capabilities here: "
        f"{', '.join(result['cpu_capabilities'])}; {cpu['model']}, flags "
        f"{', '.join(cpu['flags'])}); "
        f"PyTorch fp32 p50 {result['pytorch_fp32_p50_ms']} ms in the same {result['runs']} "
        f"rounds; tensor PSNR against PyTorch fp32 on {result['inputs']} synthetic prompts with "
        f"fresh noise. Load average {result['load_average'][0]} before the rounds, "
        f"{result['load_average'][1]} after (2 cores).",
        "",
        "| variant | speed vs PyTorch fp32 | p50 ms | PSNR mean dB | PSNR min dB | quantize s "
        "| quantize peak MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in result["variants"].items():
        lines.append(
            f"| {name} | {row['speedup']:.2f}x | {row['p50_ms']} | {row['psnr_mean_db']} | "
            f"{row['psnr_min_db']} | {row['quantize_s']:.0f} | {row['peak_rss_mib']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True, help="an fp32 OpenVINO sd15 bundle")
    parser.add_argument("--calibration", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True, help="where the variants are kept")
    parser.add_argument("--variants", default="first-layer-fix,overflow-fix")
    parser.add_argument("--inputs", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quantize-one", help=argparse.SUPPRESS)  # the child's job
    args = parser.parse_args()
    if args.quantize_one:
        out = args.work / args.quantize_one / MODEL_FILE
        quantize_one(args.bundle, args.calibration, args.quantize_one, out)
        return
    asked = args.variants.split(",")
    unknown = [name for name in asked if name not in variants()]
    if unknown:
        raise SystemExit(f"unknown variant {unknown[0]!r}; known: {', '.join(variants())}")
    for variant in asked:
        if not (args.work / variant / "quantized.json").is_file():
            (args.work / variant).mkdir(parents=True, exist_ok=True)
            print(f"quantizing {variant}", flush=True)
            subprocess.run([sys.executable, *sys.argv, "--quantize-one", variant], check=True)
    result = measure(args.work, asked, args.inputs, args.runs)
    command = (
        "python bench/unet_int8_levers.py --bundle BUNDLE --calibration SET --work DIR "
        f"--variants {args.variants} --inputs {args.inputs} --runs {args.runs}"
    )
    RESULTS.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    RESULTS.with_suffix(".md").write_text(markdown(result, command))
    print(markdown(result, command))


if __name__ == "__main__":
    main()
