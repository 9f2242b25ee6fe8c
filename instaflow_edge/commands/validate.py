"""`instaflow-edge validate`: a bundle's parity and latency against PyTorch, gates, and reports."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from instaflow_edge.errors import UserError

logger = logging.getLogger(__name__)

EXIT_GATE_FAILED = 1
EXIT_SKIPPED = 3


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "validate",
        help="check a bundle's parity and latency against PyTorch and write a report",
        description=(
            "Compare a bundle with the PyTorch reference on the same token ids and noise: every "
            "component fed the reference's inputs for it (tensor PSNR, cosine, max-abs), images "
            "end to end (8-bit PSNR, SSIM), and latency of both in this process (p50/p90, ratio). "
            "Default gates (DESIGN.md section 5): fp32 bundles tensor PSNR >= 60 dB on every "
            "component, fp16 >= 35 dB, quantized image PSNR >= 25 dB and UNet cosine >= 0.95; "
            "NaN or Inf fails. Writes report.json and a self-contained report.html."
        ),
        epilog=(
            "exit status: 0 passed, 1 a gate failed, 2 a usage error or a refused bundle, "
            "3 skipped (the bundle's runtime or the device is not available here)"
        ),
    )
    add_session_arguments(parser)
    parser.add_argument(
        "--prompts",
        help="a prompt set ('synthetic', 'general') or a file; default: 'synthetic' for the "
        "embedded model, 'general' otherwise",
    )
    parser.add_argument("--limit", type=int, default=4, help="number of prompts to compare (4)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed of the first prompt (0)")
    parser.add_argument(
        "--report", type=Path, help="report folder (default: BUNDLE-report beside the bundle)"
    )
    gates = parser.add_argument_group("gate overrides (a number, or 'off'; recorded in the report)")
    gates.add_argument(
        "--min-tensor-psnr", type=_gate_value, default=argparse.SUPPRESS, metavar="DB|off"
    )
    gates.add_argument(
        "--min-image-psnr", type=_gate_value, default=argparse.SUPPRESS, metavar="DB|off"
    )
    gates.add_argument(
        "--min-unet-cosine", type=_gate_value, default=argparse.SUPPRESS, metavar="C|off"
    )
    parser.set_defaults(run=run)


def add_session_arguments(parser: argparse.ArgumentParser) -> None:
    """The options validate and bench share: bundle, reference, device, timed runs."""
    parser.add_argument("--bundle", type=Path, required=True, help="the bundle directory")
    parser.add_argument(
        "--reference",
        help="the PyTorch reference model (default: the model the bundle was exported from)",
    )
    parser.add_argument(
        "--device", default="cpu", choices=("cpu", "cuda"), help="where both sides run (cpu)"
    )
    parser.add_argument("--runs", type=int, default=10, help="timed runs per measurement (10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up runs first (2)")


def check_runs(args: argparse.Namespace) -> None:
    if args.runs < 1 or args.warmup < 0:
        raise UserError("--runs must be at least 1 and --warmup at least 0")


def _gate_value(text: str) -> float | None:
    if text.lower() == "off":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'off', not {text!r}") from None


def run(args: argparse.Namespace) -> int:
    from instaflow_edge.calibration.prompts import load_prompts
    from instaflow_edge.manifest import read_manifest

    check_runs(args)
    manifest = read_manifest(args.bundle)
    reference = args.reference or manifest.source_model.get("id")
    default_set = "synthetic" if reference in ("tiny", "embedded:tiny") else "general"
    prompts = load_prompts(args.prompts or default_set, args.limit)
    report_dir = args.report or args.bundle.with_name(f"{args.bundle.name}-report")
    overrides = {
        gate: getattr(args, flag)
        for flag, gate in (
            ("min_tensor_psnr", "min_tensor_psnr_db"),
            ("min_image_psnr", "min_image_psnr_db"),
            ("min_unet_cosine", "min_unet_cosine"),
        )
        if hasattr(args, flag)
    }

    from instaflow_edge.quiet import quiet_libraries
    from instaflow_edge.report import write_reports
    from instaflow_edge.runtimes import RuntimeUnavailable
    from instaflow_edge.validate import skipped_report, validate_bundle

    quiet_libraries()
    try:
        validation = validate_bundle(
            args.bundle,
            prompts,
            reference_model=args.reference,
            seed=args.seed,
            device=args.device,
            runs=args.runs,
            warmup=args.warmup,
            gate_overrides=overrides,
        )
    except RuntimeUnavailable as error:
        report = skipped_report(args.bundle, args.device, str(error))
        _, html_path = write_reports(report_dir, report)
        print(f"{report['summary']}\nreport: {html_path} (and report.json)")
        return EXIT_SKIPPED
    report = validation.report
    json_path, html_path = write_reports(
        report_dir, report, validation.reference_images, validation.bundle_images
    )
    print(parity_table(report))
    print()
    from instaflow_edge.commands.bench import latency_table

    print(latency_table(report["latency"]))
    print()
    print(report["summary"])
    print(f"report: {html_path} (and {json_path.name})")
    return 0 if validation.passed else EXIT_GATE_FAILED


def parity_table(report: dict) -> str:
    """Per component and end to end: the numbers the gates read, and the verdict."""
    from instaflow_edge.commands.inspect import format_table

    rows = [["component", "output", "max-abs", "cosine", "tensor PSNR", "gates"]]
    for name, result in report["components"].items():
        if not result["compared"]:
            rows.append([name, "-", "-", "-", "-", result["reason"]])
            continue
        verdict = "passed" if all(c["passed"] for c in result["checks"]) else "FAILED"
        for output, m in result["outputs"].items():
            rows.append(
                [
                    name,
                    output,
                    f"{m['max_abs']:.3g}",
                    f"{m['cosine']:.6f}",
                    f"{m['psnr_db']:.2f} dB",
                    verdict,
                ]
            )
    end = report["end_to_end"]
    verdict = "passed" if all(c["passed"] for c in end["checks"]) else "FAILED"
    rows.append(
        [
            "end_to_end",
            "image",
            f"SSIM {end['ssim']:.4f}",
            "",
            f"{end['image_psnr_db']:.2f} dB",
            verdict,
        ]
    )
    return format_table(rows)
