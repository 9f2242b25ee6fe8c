"""`instaflow-edge export`: a model to a bundle for one target, checked against PyTorch right away."""

from __future__ import annotations

import argparse
from pathlib import Path

from instaflow_edge.commands.common import add_gate_arguments, gate_overrides, option_classes
from instaflow_edge.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    from instaflow_edge.export import get_exporter, target_names
    from instaflow_edge.export.base import PRECISIONS

    parser = subparsers.add_parser(
        "export",
        help="export the text encoder, UNet and VAE decoder to a bundle for one target",
        description=(
            "Export a model to a self-describing bundle (manifest.json with sha256 per file). "
            "The bundle is run by its target's runtime on fixed inputs and checked against "
            "PyTorch; the numbers are printed, and a bundle that misses its parity gates is not "
            "written (fp32: tensor PSNR >= 60 dB per component; fp16: >= 35 dB)."
        ),
    )
    parser.add_argument(
        "--target", default="onnx", help=f"target: {', '.join(target_names())} (default onnx)"
    )
    parser.add_argument(
        "--model",
        help="model: 'tiny' (embedded default), 'sd15' (random weights), a directory or a hub id",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="fp32 or fp16; default: the target ecosystem's own (coreml: fp16, as Apple's "
        "converter; onnx, openvino: fp32)",
    )
    parser.add_argument(
        "-o", "--out", type=Path, help="bundle directory (default: MODEL-TARGET-PRECISION)"
    )
    presets = [
        f"{target}: {name}, {preset.why}"
        for target in option_classes("export")
        for name, preset in get_exporter(target).presets.items()
    ]
    parser.add_argument(
        "--preset",
        metavar="NAME",
        help="a named recipe of the target: its precision, options, quantization and runtime "
        "settings (recorded in the manifest, applied at every load); "
        + ("; ".join(presets) or "none"),
    )
    parser.add_argument(
        "--calibration",
        type=Path,
        help="with a calibrated --preset: the calibration set its quantization reads (default: "
        "the preset records its own from the model's prompt set)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    add_gate_arguments(parser)
    from instaflow_edge.options import add_option_flags

    add_option_flags(parser, option_classes("export"), "target options")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from instaflow_edge.export import get_exporter
    from instaflow_edge.export.base import check_out
    from instaflow_edge.options import options_from_args
    from instaflow_edge.tables import parity_summary

    exporter = get_exporter(args.target)  # mistakes fail before the model loads
    preset = exporter.preset(args.preset) if args.preset else None
    if preset and args.precision:
        raise UserError(f"--preset {args.preset} sets the precision: leave out --precision")
    if args.calibration is not None:
        if not preset or preset.method not in exporter.calibrated_methods:
            calibrated = [n for n, p in exporter.presets.items() if p.calibration_prompts]
            raise UserError(
                "--calibration goes with a calibrated --preset (of "
                f"{args.target}: {', '.join(calibrated) or 'none'})"
            )
        from instaflow_edge.calibration import load_calibration

        load_calibration(args.calibration)  # a missing or broken set fails before the model loads
    keys = {key for cls in option_classes("export").values() for key in cls.keys()}
    options = options_from_args(
        exporter.export_options,
        args,
        f"target {args.target}",
        keys,
        preset.export_options if preset else None,
    )
    args.precision = args.precision or exporter.default_precision
    out = args.out = args.out or Path(
        f"{Path(args.model or 'tiny').name}-{args.target}-{args.preset or args.precision}"
    )
    check_out(out, args.overwrite)  # before the model loads

    from instaflow_edge.pipeline import OneStepPipeline
    from instaflow_edge.quiet import quiet_libraries

    quiet_libraries()
    pipeline = OneStepPipeline.from_pretrained(args.model)
    settings = {
        "overwrite": args.overwrite,
        "gate_overrides": gate_overrides(args),
        "release_model": True,  # the command is done with the model once its graphs are made
    }
    if preset:
        bundle = exporter.export_preset(
            pipeline, out, args.preset, options, calibration=args.calibration, **settings
        )
    else:
        bundle = exporter.export(pipeline, out, args.precision, options, **settings)
    print(parity_summary(bundle))
    return 0
