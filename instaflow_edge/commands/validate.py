"""`instaflow-edge validate`: a bundle's parity and latency against PyTorch, gates, and reports."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from instaflow_edge.commands.common import (
    add_gate_arguments,
    add_session_arguments,
    check_runs,
    gate_overrides,
    reference_device,
    runtime_options,
    seed_value,
)

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
    parser.add_argument(
        "--seed", type=seed_value, default=0, help="noise seed of the first prompt (0)"
    )
    parser.add_argument(
        "--report", type=Path, help="report folder (default: BUNDLE-report beside the bundle)"
    )
    add_gate_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from instaflow_edge.atomic import check_writable
    from instaflow_edge.calibration.prompts import load_prompts
    from instaflow_edge.manifest import read_manifest

    check_runs(args)
    manifest = read_manifest(args.bundle)
    reference = args.reference or manifest.source_model.get("id")
    default_set = "synthetic" if reference in ("tiny", "embedded:tiny") else "general"
    prompts = load_prompts(args.prompts or default_set, args.limit)
    report_dir = args.report or args.bundle.with_name(f"{args.bundle.name}-report")
    check_writable(report_dir, "--report")  # before the comparison, not after it
    options = runtime_options(args.bundle, args.runtime_option)

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
            reference_device=reference_device(args.device),
            runtime_options=options,
            runs=args.runs,
            warmup=args.warmup,
            gate_overrides=gate_overrides(args),
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
    from instaflow_edge.tables import latency_table, parity_table

    print(parity_table(report))
    print()
    print(latency_table(report["latency"]))
    print()
    print(report["summary"])
    print(f"report: {html_path} (and {json_path.name})")
    return 0 if validation.passed else EXIT_GATE_FAILED
