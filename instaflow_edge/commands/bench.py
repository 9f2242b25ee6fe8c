"""`instaflow-edge bench`: a bundle's latency per component and end to end, as ratios to PyTorch."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from instaflow_edge.commands.common import (
    add_session_arguments,
    check_runs,
    prompt_text,
    reference_device,
    runtime_options,
)
from instaflow_edge.errors import UserError

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure latency of a bundle against PyTorch in the same run",
        description=(
            "Time every component and the whole one-step generation (batch 1) for the bundle and "
            "for the PyTorch reference, in this process on the same device: warm-up runs, then "
            "timed runs; prints p50/p90 and the ratio bundle / PyTorch."
        ),
    )
    add_session_arguments(parser)
    parser.add_argument(
        "--prompt", type=prompt_text, help="the prompt to time (a synthetic caption)"
    )
    parser.add_argument("--json", type=Path, help="also write the measurements to this JSON file")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_runs(args)
    if args.json is not None and not args.json.parent.is_dir():
        raise UserError(f"folder {args.json.parent} for --json does not exist")
    options = runtime_options(args.bundle, args.runtime_option)

    from instaflow_edge.atomic import atomic_file
    from instaflow_edge.calibration.prompts import load_prompts
    from instaflow_edge.jsonio import dumps
    from instaflow_edge.latency import compare_latency, environment
    from instaflow_edge.manifest import read_manifest
    from instaflow_edge.quiet import quiet_libraries
    from instaflow_edge.runtimes import load_session
    from instaflow_edge.runtimes.torch_ref import load_reference
    from instaflow_edge.tables import latency_table
    from instaflow_edge.validate import component_feeds, reference_io

    quiet_libraries()
    manifest = read_manifest(args.bundle)
    bundle = load_session(args.bundle, args.device, options)  # verifies every file's sha256 first
    reference_id = args.reference or manifest.source_model.get("id")
    reference = load_reference(reference_id, reference_device(args.device))
    prompt = args.prompt or load_prompts("synthetic", limit=1)[0]
    input_ids = reference.tokenize([prompt])
    noise = reference.pipeline.make_noise([0]).numpy()
    specs = {name: entry.spec for name, entry in manifest.components.items()}
    feeds = component_feeds(specs, reference_io(reference, input_ids, noise))
    latency = compare_latency(bundle, reference, feeds, input_ids, noise, args.runs, args.warmup)
    env = environment(bundle, reference, args.device)
    print(
        f"bundle {args.bundle} ({manifest.target}, {manifest.precision}, "
        f"{manifest.quantization or 'not quantized'}) on {bundle.executed_on}; "
        f"PyTorch on {reference.executed_on}; {env['threads']['torch']} torch threads"
    )
    print(latency_table(latency))
    if args.json:
        result: dict[str, Any] = {
            "bundle": str(args.bundle),
            "latency": latency,
            "environment": env,
        }
        with atomic_file(args.json) as staging:
            staging.write_text(dumps(result))
        logger.info("wrote %s", args.json)
    return 0
