"""Subcommands that are declared but not built yet: each has its help text and says so when run."""

from __future__ import annotations

import argparse

from instaflow_edge.errors import UserError

PENDING: dict[str, tuple[str, str]] = {}


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
