"""`instaflow-edge calibrate`: record what every component sees at t=1000 for a prompt set."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from instaflow_edge.commands.common import seed_value
from instaflow_edge.errors import UserError

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "calibrate",
        help="make a calibration set (every component's inputs at t=1000) from prompts",
        description=(
            "Run the PyTorch reference once per prompt at the model's operating point (t=1000, "
            "noise seed SEED+i) and record each component's exact inputs and outputs as sharded "
            "safetensors: the calibration set every quantizer of every target reads."
        ),
    )
    parser.add_argument(
        "--model",
        help="model: 'tiny' (embedded default), 'sd15' (random weights), a directory or a hub id",
    )
    parser.add_argument(
        "--prompts",
        required=True,
        help="a prompt set ('general' for real models, 'synthetic' for the embedded one) "
        "or a text file with one prompt per line",
    )
    parser.add_argument("--out", type=Path, required=True, help="the calibration set directory")
    parser.add_argument(
        "--seed", type=seed_value, default=0, help="noise seed of the first prompt (0)"
    )
    parser.add_argument("--limit", type=int, help="use only the first N prompts")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass (8)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing set at --out")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from instaflow_edge.calibration.prompts import load_prompts

    prompts = load_prompts(args.prompts, args.limit)
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")

    from instaflow_edge.calibration import load_calibration
    from instaflow_edge.calibration.builder import build_calibration
    from instaflow_edge.pipeline import OneStepPipeline
    from instaflow_edge.quiet import quiet_libraries

    quiet_libraries()
    pipeline = OneStepPipeline.from_pretrained(args.model)
    out = build_calibration(
        pipeline,
        prompts,
        args.out,
        seed=args.seed,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
    )
    calibration = load_calibration(out)
    logger.info(
        "wrote calibration set %s: %d prompts of %s, %d shard(s), model %s",
        out,
        len(calibration),
        args.prompts,
        len(calibration.shards),
        calibration.source_model,
    )
    return 0
