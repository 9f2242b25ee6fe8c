"""`instaflow-edge quantize`: a bundle to a new, quantized bundle for the same target."""

from __future__ import annotations

import argparse
from pathlib import Path

from instaflow_edge.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quantize",
        help="quantize a bundle (fp16, int8, palettization) into a new bundle",
        description=(
            "Quantize an exported fp32 bundle into a new bundle for its target (read from its "
            "manifest), then check it against the fp32 bundle on fixed inputs. ONNX methods: "
            "fp16 (I/O kept fp32; ops that overflow fp16 kept fp32), int8-dynamic (MatMul only), "
            "int8-dynamic-all (every op), int8-static (QDQ, per-channel, needs --calibration). "
            "OpenVINO: int8-weights, int4-weights, hybrid and int8-full (the last two need "
            "--calibration). Core ML: palettize-8, palettize-6, palettize-4, int8-linear, mixed "
            "(per-layer bits holding --target-psnr on the one-step latents)."
        ),
    )
    parser.add_argument("--bundle", type=Path, required=True, help="the fp32 bundle to quantize")
    parser.add_argument("--method", required=True, help="quantization method (see above)")
    parser.add_argument(
        "--calibration", type=Path, help="calibration set (from calibrate), for static methods"
    )
    parser.add_argument(
        "--calibration-method",
        default="minmax",
        help="how int8-static sets activation ranges: minmax (default) or percentile",
    )
    parser.add_argument(
        "--target-psnr",
        type=float,
        help="coreml mixed: the one-step latents' PSNR to hold, in dB (default 40)",
    )
    parser.add_argument(
        "-o", "--out", type=Path, help="new bundle directory (default: BUNDLE-METHOD)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from instaflow_edge.commands.export import parity_summary
    from instaflow_edge.export import get_exporter
    from instaflow_edge.manifest import read_manifest

    exporter = get_exporter(read_manifest(args.bundle).target)
    if args.method not in exporter.quantization_methods:
        raise UserError(
            f"unknown method {args.method!r} for target {exporter.target}; choose one of "
            f"{', '.join(exporter.quantization_methods)}"
        )
    out = args.out or args.bundle.with_name(f"{args.bundle.name}-{args.method}")
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} already exists: choose another --out or pass --overwrite")
    options = {
        "calibration_method": args.calibration_method,
        "overwrite": args.overwrite,
        "target_psnr": args.target_psnr,
    }
    bundle = exporter.quantize(args.bundle, out, args.method, args.calibration, options)
    print(parity_summary(bundle))
    return 0
