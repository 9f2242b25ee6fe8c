"""Benchmark: parity of every target, precision and quantization method on the embedded model.

Exports the embedded default to ONNX, OpenVINO and Core ML (fp32 and fp16), quantizes with every
method (calibrated ones on 64 prompts of the synthetic set at t=1000), and collects the numbers each
bundle's manifest recorded as it was written: tensor PSNR per component and end-to-end image PSNR
against PyTorch (exports) or against the source bundle (quantizations). Writes
bench/results/parity_tiny.json and prints a markdown table.

Usage: python bench/parity_tiny.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from instaflow_edge.atomic import atomic_file
from instaflow_edge.calibration.builder import build_calibration
from instaflow_edge.calibration.prompts import load_prompts
from instaflow_edge.export import get_exporter
from instaflow_edge.jsonio import dumps
from instaflow_edge.manifest import read_manifest
from instaflow_edge.pipeline import OneStepPipeline
from instaflow_edge.quiet import quiet_libraries

RESULTS = Path(__file__).resolve().parent / "results" / "parity_tiny.json"
CALIBRATION_PROMPTS = 64
# (target, export options, quantizations of the fp32 bundle, of the fp16 bundle)
PLAN = {
    "onnx": ({"fused": True}, ["int8-dynamic", "int8-dynamic-all", "int8-static"], []),
    "openvino": ({}, ["int8-weights", "int4-weights", "hybrid", "int8-full"], []),
    "coreml": (
        {"attention": "split-einsum"},
        [],
        ["palettize-8", "palettize-6", "palettize-4", "int8-linear", "mixed"],
    ),
}
COMPONENTS = ("text_encoder", "unet", "vae_decoder")
# 4-bit methods are measured, not gated: the quantized gates (image PSNR, UNet cosine) are off for
# them, so that a miss is a number in the table instead of a GateFailed; NaN/Inf still fail
MEASURED_ONLY = {"int4-weights", "palettize-4"}
NO_QUALITY_GATES = {"min_image_psnr_db": None, "min_unet_cosine": None}


def row(bundle: Path) -> dict:
    """The parity a bundle's manifest recorded, flattened to one table row."""
    manifest = read_manifest(bundle)
    parity = manifest.details["parity"]
    result = {
        "target": manifest.target,
        "bundle": manifest.quantization or manifest.precision,
        "against": parity["against"],
        "executed_on": parity["executed_on"],
        "image_psnr_db": parity["end_to_end"]["image_psnr_db"],
        "ssim": parity["end_to_end"]["ssim"],
    }
    components = parity["components"]
    for name in COMPONENTS:
        result[f"{name}_psnr_db"] = components[name]["psnr_db"]
    if "sizes" in manifest.details:  # a quantized bundle records its size before and after
        result["size_ratio"] = manifest.details["sizes"]["ratio"]
    if "generator" in components:
        result["fused_vs_three_graphs_db"] = components["generator"][
            "vs_three_graphs_image_psnr_db"
        ]
    if parity["gates"]["overridden"]:
        result["gates_off"] = parity["gates"]["overridden"]
    return result


def _db(value: float | str | None) -> str:
    """A PSNR cell; manifests write an infinite PSNR (identical outputs) as the string "inf"."""
    if value is None or value == "inf":
        return "identical"
    return value if isinstance(value, str) else f"{value:.1f}"


def table(rows: list[dict]) -> str:
    lines = [
        "| target | bundle | vs | TE | UNet | VAE | image PSNR | SSIM |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [r["target"], r["bundle"], r["against"]]
        cells += [_db(r[f"{name}_psnr_db"]) for name in COMPONENTS]
        cells += [_db(r["image_psnr_db"]), f"{r['ssim']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="keep the bundles here (default: temporary)")
    args = parser.parse_args()
    quiet_libraries()
    pipeline = OneStepPipeline.from_pretrained()
    with tempfile.TemporaryDirectory() as scratch:
        work = args.workdir or Path(scratch)
        prompts = load_prompts("synthetic", CALIBRATION_PROMPTS)
        calibration = build_calibration(pipeline, prompts, work / "calibration", overwrite=True)
        rows = []
        for target, (options, from_fp32, from_fp16) in PLAN.items():
            exporter = get_exporter(target)
            for precision, methods in (("fp32", from_fp32), ("fp16", from_fp16)):
                bundle = work / f"{target}-{precision}"
                exporter.export(pipeline, bundle, precision, options, overwrite=True)
                rows.append(row(bundle))
                for method in methods:
                    out = work / f"{target}-{precision}-{method}"
                    exporter.quantize(
                        bundle,
                        out,
                        method,
                        calibration if method in exporter.calibrated_methods else None,
                        overwrite=True,
                        gate_overrides=NO_QUALITY_GATES if method in MEASURED_ONLY else None,
                    )
                    rows.append(row(out))
                print(table(rows[-1 - len(methods) :]), flush=True)
    RESULTS.parent.mkdir(exist_ok=True)
    with atomic_file(RESULTS) as staging:
        staging.write_text(dumps({"model": pipeline.source, "rows": rows}))
    print(table(rows))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
