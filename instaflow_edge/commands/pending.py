"""Subcommands that are declared but not built yet: each has its help text and says so when run."""

from __future__ import annotations

import argparse

from instaflow_edge.errors import UserError

PENDING = {
    "export": (
        "export the text encoder, UNet and VAE decoder to a bundle for one target",
        "Export a model to a self-describing bundle for ONNX Runtime, Core ML or OpenVINO.",
    ),
    "quantize": (
        "quantize a bundle (fp16, int8, palettization) into a new bundle",
        "Quantize an exported bundle for its target, optionally from a calibration set.",
    ),
    "validate": (
        "check a bundle's parity and latency against PyTorch and write a report",
        "Compare a bundle with the PyTorch reference on the same inputs and write reports.",
    ),
    "train": (
        "train, reflow and distill a one-step model",
        "The training core: rectified flow, reflow pairs, 2-RF and one-step distillation.",
    ),
    "bench": (
        "measure latency of a bundle against PyTorch in the same run",
        "Benchmark a bundle's latency as a ratio against PyTorch measured in the same process.",
    ),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    for name, (summary, description) in PENDING.items():
        parser = subparsers.add_parser(
            name,
            help=f"{summary} (not built yet)",
            description=f"{description} Not built yet in this version.",
        )
        parser.set_defaults(run=_not_built(name))


def _not_built(name: str):
    def run(args: argparse.Namespace) -> int:
        raise UserError(f"'{name}' is not built yet in this version of instaflow-edge")

    return run
