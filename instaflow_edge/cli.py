"""The `instaflow-edge` command line: one subcommand per module in `instaflow_edge.commands`."""

from __future__ import annotations

import argparse
import errno
import logging
import sys
import warnings
from pathlib import Path

from instaflow_edge import __version__
from instaflow_edge.atomic import COMMITTED
from instaflow_edge.commands import (
    bench,
    calibrate,
    export,
    generate,
    inspect,
    quantize,
    train,
    validate,
)
from instaflow_edge.errors import UserError
from instaflow_edge.gates import GateFailed

PROG = "instaflow-edge"
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
DESCRIPTION = """\
Take a one-step InstaFlow text-to-image model to the edge: generate with the PyTorch
reference, export to ONNX Runtime / Core ML / OpenVINO, quantize, validate parity and
latency, train. Without --model, every command uses the small embedded default model."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (generate, inspect, export, quantize, calibrate, validate, bench, train):
        module.register(subparsers)
    return parser


class _OneLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{PROG}: {record.levelname.lower()}: {record.getMessage()}"


def _configure_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter())
    logger = logging.getLogger("instaflow_edge")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.ERROR if quiet else logging.INFO)
    if quiet:
        from instaflow_edge.quiet import no_progress_bars

        no_progress_bars()
    logger.propagate = False
    logging.captureWarnings(False)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # coremltools warns at import about its untested torch and scikit-learn versions and, off
    # macOS, about each native proxy it lacks (ten lines before any output of ours)
    logging.getLogger("coremltools").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.quiet)
    try:
        return int(args.run(args) or 0)
    except GateFailed as error:  # as validate: 1 when a gate fails, nothing written
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    except UserError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the machine's refusal: a full or read-only disk, no permission
        if error.errno not in DISK_ERRORS:
            raise
        where = f": {error.filename}" if error.filename else ""
        print(f"{PROG}: error: {error.strerror}{where}; nothing was written", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        if out is not None and Path(out).resolve() in COMMITTED:
            print(f"{PROG}: interrupted after {out} was complete: it is kept", file=sys.stderr)
            return 0
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
