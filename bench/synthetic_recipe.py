"""InstaFlow in miniature: run `instaflow-edge train --recipe synthetic`, keep its table in bench/results/."""

# Usage: `python bench/synthetic_recipe.py [--workdir runs/synthetic] [--scale full] [--resume]
# [--seconds-note TEXT]`. The recipe is resumable: after an interruption, run the same command with
# --resume. A note on how the stages' wall times were taken (e.g. a shared CPU) goes into the JSON.

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from instaflow_edge.atomic import atomic_file
from instaflow_edge.cli import main as cli_main
from instaflow_edge.train.recipe import SCALES

RESULTS = Path(__file__).parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/synthetic"))
    parser.add_argument("--scale", default="full", choices=tuple(SCALES))
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds-note", default="", help="how the wall times were taken")
    args = parser.parse_args()
    argv = ["train", "--recipe", "synthetic", "--workdir", str(args.workdir)]
    argv += ["--scale", args.scale, "--threads", str(args.threads)]
    status = cli_main(argv + (["--resume"] if args.resume else []))
    if status:
        return status
    RESULTS.mkdir(exist_ok=True)
    table = (args.workdir / "eval" / "table.md").read_text()
    with atomic_file(RESULTS / f"synthetic_{args.scale}.md") as staging:
        staging.write_text(table)
    summary = json.loads((args.workdir / "summary.json").read_text())
    summary["machine"] = {
        "cpu_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
    }
    if args.seconds_note:
        summary["seconds_note"] = args.seconds_note
    with atomic_file(RESULTS / f"synthetic_{args.scale}.json") as staging:
        staging.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {RESULTS}/synthetic_{args.scale}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
