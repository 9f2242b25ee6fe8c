"""`instaflow-edge export`: a model to a bundle for one target, checked against PyTorch right away."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export the text encoder, UNet and VAE decoder to a bundle for one target",
        description=(
            "Export a model to a self-describing bundle (manifest.json with sha256 per file). "
            "Every graph is checked against PyTorch on fixed inputs and the numbers are printed."
        ),
    )
    parser.add_argument(
        "--target", default="onnx", help="target runtime: onnx (default), openvino or coreml"
    )
    parser.add_argument(
        "--model",
        help="model: 'tiny' (embedded default), 'sd15' (random weights), a directory or a hub id",
    )
    parser.add_argument("--precision", default="fp32", help="fp32 (default) or fp16")
    parser.add_argument(
        "-o", "--out", type=Path, help="bundle directory (default: MODEL-TARGET-PRECISION)"
    )
    parser.add_argument(
        "--fused",
        action="store_true",
        help="also export the whole one-step recipe as one graph: token ids + noise -> uint8 image",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        help="optimise the graphs for this device (cpu: CPU-safe fusions; cuda: all fusions, "
        "runs on CUDA only); default: unoptimised, portable graphs",
    )
    parser.add_argument(
        "--dynamic-batch",
        action="store_true",
        help="openvino: a dynamic batch axis (default: static batch 1, the one-step case); "
        "onnx graphs always have a dynamic batch, coreml packages take batch 1",
    )
    parser.add_argument(
        "--compute-units",
        choices=("ALL", "CPU_AND_NE", "CPU_AND_GPU", "CPU_ONLY"),
        help="coreml: the compute units the packages ask for (default ALL)",
    )
    parser.add_argument(
        "--attention",
        choices=("original", "split-einsum"),
        help="coreml: attention layout; split-einsum suits the Neural Engine (default original)",
    )
    parser.add_argument(
        "--min-target", help="coreml: minimum deployment target, e.g. iOS16 (default), macOS14"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from instaflow_edge.errors import UserError
    from instaflow_edge.export import get_exporter
    from instaflow_edge.export.base import PRECISIONS

    exporter = get_exporter(args.target)  # mistakes fail before the model loads
    if args.precision not in PRECISIONS:
        raise UserError(
            f"unknown precision {args.precision!r}; choose one of {', '.join(PRECISIONS)}"
        )
    out = args.out or Path(f"{Path(args.model or 'tiny').name}-{args.target}-{args.precision}")
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} already exists: choose another --out or pass --overwrite")

    from instaflow_edge.pipeline import OneStepPipeline
    from instaflow_edge.quiet import quiet_libraries

    quiet_libraries()
    pipeline = OneStepPipeline.from_pretrained(args.model)
    options = {
        "fused": args.fused,
        "device": args.device,
        "overwrite": args.overwrite,
        "dynamic_batch": args.dynamic_batch,
        "compute_units": args.compute_units,
        "attention": args.attention,
        "min_target": args.min_target,
    }
    bundle = exporter.export(pipeline, out, args.precision, options)
    print(parity_summary(bundle))
    return 0


def parity_summary(bundle: Path) -> str:
    """Where the bundle is and the parity numbers its manifest recorded, as a few lines."""
    from instaflow_edge.manifest import read_manifest

    manifest = read_manifest(bundle)
    what = manifest.quantization or manifest.precision
    lines = [f"bundle: {bundle} ({manifest.target}, {what}, {len(manifest.components)} graphs)"]
    parity = manifest.details.get("parity", {})
    if "skipped" in parity:
        return "\n".join([*lines, f"parity not checked: {parity['skipped']}"])
    lines.append(f"parity vs {parity['against']} on {parity['executed_on']}:")
    for name, metrics in parity.items():
        if not isinstance(metrics, dict):
            continue
        if metrics.get("finite") is False:
            numbers = "NaN or Inf in the output"
        elif "psnr_db" in metrics:
            numbers = f"tensor PSNR {_db(metrics['psnr_db'])}, cosine {metrics['cosine']:.6f}"
        else:
            numbers = f"image PSNR {_db(metrics['image_psnr_db'])}, SSIM {metrics['ssim']:.4f}"
        if "vs_three_graphs_image_psnr_db" in metrics:
            numbers += f"; vs the three graphs {_db(metrics['vs_three_graphs_image_psnr_db'])}"
        lines.append(f"  {name:<13} max-abs {metrics['max_abs']:<10.3g} {numbers}")
    for name, nodes in manifest.details.get("fp32_nodes", {}).items():
        kept = "the whole graph" if nodes == ["*"] else f"{len(nodes)} ops"
        lines.append(f"  {name}: beyond fp16 range, {kept} kept in fp32")
    return "\n".join(lines)


def _db(value: float | None) -> str:
    return "inf dB (identical)" if value is None else f"{value:.1f} dB"
