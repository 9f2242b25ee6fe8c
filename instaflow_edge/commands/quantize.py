"""`instaflow-edge quantize`: a bundle to a new, quantized bundle for the same target."""

from __future__ import annotations

import argparse
from pathlib import Path

from instaflow_edge.commands.common import add_gate_arguments, gate_overrides, option_classes


def register(subparsers: argparse._SubParsersAction) -> None:
    from instaflow_edge.export import get_exporter

    methods = []
    for target in option_classes("quantize"):
        exporter = get_exporter(target)
        methods.append(f"{target}: {', '.join(exporter.methods)}")
    parser = subparsers.add_parser(
        "quantize",
        help="quantize a bundle (fp16, int8, palettization) into a new bundle",
        description=(
            "Quantize an exported bundle into a new bundle for its target (read from its "
            "manifest), then check it against the source bundle on fixed inputs through the "
            "runtime; a bundle that misses its gates is not written (quantized: image PSNR >= "
            "25 dB and UNet cosine >= 0.95; fp16: tensor PSNR >= 35 dB). Methods: "
            + "; ".join(methods)
            + "."
        ),
    )
    parser.add_argument("--bundle", type=Path, required=True, help="the bundle to quantize")
    parser.add_argument("--method", required=True, help="quantization method (see above)")
    parser.add_argument(
        "--calibration", type=Path, help="calibration set (from calibrate), for calibrated methods"
    )
    parser.add_argument(
        "-o", "--out", type=Path, help="new bundle directory (default: BUNDLE-METHOD)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    add_gate_arguments(parser)
    from instaflow_edge.options import add_option_flags

    add_option_flags(parser, option_classes("quantize"), "method options")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from instaflow_edge.export import get_exporter
    from instaflow_edge.manifest import read_manifest
    from instaflow_edge.options import options_from_args
    from instaflow_edge.tables import parity_summary

    target = read_manifest(args.bundle).target
    exporter = get_exporter(target)
    keys = {key for cls in option_classes("quantize").values() for key in cls.keys()}
    options = options_from_args(exporter.quantize_options, args, f"target {target}", keys)
    out = args.out = args.out or args.bundle.with_name(f"{args.bundle.name}-{args.method}")
    from instaflow_edge.quiet import quiet_libraries

    quiet_libraries()
    bundle = exporter.quantize(
        args.bundle,
        out,
        args.method,
        args.calibration,
        options,
        overwrite=args.overwrite,
        gate_overrides=gate_overrides(args),
    )
    print(parity_summary(bundle))
    return 0
