"""`instaflow-edge bench`: bundles timed beside PyTorch fp32 in the same rounds: one bundle, or a
model's bundles over targets, precisions, quantization methods and presets (made when missing)."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
from pathlib import Path
from typing import Any

from instaflow_edge.commands.common import add_runtime_arguments, check_runs, prompt_text
from instaflow_edge.errors import UserError

logger = logging.getLogger(__name__)

MODEL_FLAGS = ("targets", "precisions", "methods", "presets")  # not with --bundle


def register(subparsers: argparse._SubParsersAction) -> None:
    from instaflow_edge.benchmark import PARTS

    parser = subparsers.add_parser(
        "bench",
        help="time bundles against PyTorch fp32 in the same run (one bundle, or a model's)",
        description=(
            "Time the parts of bundles (each component, and token ids to image) and PyTorch fp32 "
            "in interleaved rounds in this process, after checking each bundle against PyTorch "
            "on the same inputs. With --bundle, that bundle; else the bundles of a model (the "
            "embedded default without --model) for every target, precision, quantization method "
            "and preset asked for, exported into --cache when missing. Prints p50 and the speed "
            "against PyTorch, PSNR, images/s, GFLOP/s, peak memory and size; --out writes "
            "bench.json, bench.csv, bench.png and bench.md. --runtime-option [TARGET:]KEY=VALUE "
            "sets KEY for TARGET's bundles, or for every runtime that takes KEY, over what a "
            "bundle's manifest records."
        ),
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--bundle", type=Path, help="time this bundle")
    source.add_argument(
        "--model",
        help="time this model's bundles: 'tiny' (embedded default), 'sd15', a directory or hub id",
    )
    parser.add_argument(
        "--reference",
        help="with --bundle: the PyTorch reference (default: the model it was exported from)",
    )
    lists = "comma-separated; with --model"
    parser.add_argument("--targets", type=_names, help=f"targets ({lists}; default: all)")
    parser.add_argument(
        "--precisions", type=_names, help=f"export precisions ({lists}; default: all)"
    )
    parser.add_argument(
        "--methods",
        type=_names,
        help=f"quantization methods, each from the target's fp32 export ({lists}; 'none'; "
        "default: each target's, but those named like a precision)",
    )
    parser.add_argument(
        "--presets", type=_names, help=f"export presets ({lists}; 'none'; default: the targets')"
    )
    parser.add_argument(
        "--peers",
        type=_peers,
        default=[],
        help="what a user would run instead, timed beside the bundles, comma-separated: "
        "pytorch-bf16 (autocast), torch-compile (inductor; compiles for minutes on a large "
        "model), optimum-onnx, optimum-intel, optimum-intel-hybrid (the client's own export of "
        "the model, made into --cache once, run in the client's venv from clients/build_venvs.sh "
        "or $INSTAFLOW_CLIENT_VENVS) (default: none)",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        help="where the model's bundles and the clients' exports (--peers) are made and kept "
        "(default: "
        "$XDG_CACHE_HOME/instaflow-edge/bench, else ~/.cache/instaflow-edge/bench)",
    )
    add_runtime_arguments(parser)
    parser.add_argument(
        "--batch", type=_batches, default=[1], help="batch sizes, comma-separated (default 1)"
    )
    parser.add_argument(
        "--components",
        type=_parts,
        default=list(PARTS),
        help=f"what to time, comma-separated: {', '.join(PARTS)} (default: all)",
    )
    parser.add_argument("--runs", type=int, default=10, help="timed rounds (10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (2)")
    parser.add_argument(
        "--prompt", type=prompt_text, help="the prompt to time (default: synthetic captions)"
    )
    parser.add_argument("-o", "--out", type=Path, help="folder for bench.json/.csv/.png/.md")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.set_defaults(run=run)


def _names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected names separated by commas, not {text!r}")
    return [] if names == ["none"] else names


def _peers(text: str) -> list[str]:
    from instaflow_edge.client_peers import CLIENT_PEERS
    from instaflow_edge.runtimes.torch_ref import PEERS

    peers = _names(text)
    known = [*PEERS, *CLIENT_PEERS]
    unknown = [peer for peer in peers if peer not in known]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown peer {unknown[0]!r}; choose from {', '.join(known)}"
        )
    return peers


def _batches(text: str) -> list[int]:
    try:
        batches = sorted({int(part) for part in text.split(",")})
    except ValueError:
        batches = []
    if not batches or batches[0] < 1:
        raise argparse.ArgumentTypeError(
            f"expected batch sizes of at least 1 separated by commas, not {text!r}"
        )
    return batches


def _parts(text: str) -> list[str]:
    from instaflow_edge.benchmark import PARTS

    parts = _names(text)
    unknown = [part for part in parts if part not in PARTS]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(
            f"unknown component {(unknown or [text])[0]!r}; choose from {', '.join(PARTS)}"
        )
    return [part for part in PARTS if part in parts]


def run(args: argparse.Namespace) -> int:
    check_runs(args)
    if args.bundle is not None:
        given = [f"--{flag}" for flag in MODEL_FLAGS if getattr(args, flag) is not None]
        if given:
            raise UserError(f"{given[0]} applies to a bench over a model, not to --bundle")
    elif args.reference is not None:
        raise UserError("--reference applies to --bundle (a model's bench times that model)")
    from instaflow_edge.atomic import check_replaceable, check_writable
    from instaflow_edge.client_peers import CLIENT_PEERS, peer_python

    if args.out is not None:
        from instaflow_edge.benchmark import RESULTS

        check_replaceable(args.out, args.overwrite, RESULTS)  # before any work
    cache = args.cache or default_cache()
    if args.bundle is None or any(peer in CLIENT_PEERS for peer in args.peers):
        check_writable(cache, "--cache")  # where bundles and the clients' exports are made

    from instaflow_edge import benchmark
    from instaflow_edge.commands.common import reference_device
    from instaflow_edge.quiet import quiet_libraries
    from instaflow_edge.tables import bench_table

    if args.bundle is not None:
        from instaflow_edge.manifest import read_manifest
        from instaflow_edge.runtimes import get_runtime

        manifest = read_manifest(args.bundle)
        item = benchmark.Planned(args.bundle.name, manifest.target, path=args.bundle)
        why = get_runtime(manifest.runtime).why_not_timed(args.device)
        planned, skipped = ([], [{"bundle": item.name, "reason": why}]) if why else ([item], [])
        model = args.reference or manifest.source_model.get("id")
        targets = [manifest.target]
    else:
        from instaflow_edge.export import target_names
        from instaflow_edge.export.base import PRECISIONS

        targets = args.targets or target_names()
        precisions = args.precisions if args.precisions is not None else list(PRECISIONS)
        planned, skipped = benchmark.plan(
            targets, precisions, args.methods, args.presets, args.device
        )
        model = args.model
    options = split_runtime_options(args.runtime_option, targets)
    for item in planned:
        item.runtime_options = options.get(item.target, {})

    for peer in args.peers:
        if peer in CLIENT_PEERS:
            peer_python(peer)  # before any work: its venv is there
    quiet_libraries()
    reference, inputs = benchmark.open_reference(
        model, reference_device(args.device), args.batch, args.prompt
    )
    if args.bundle is not None:
        from instaflow_edge.validate import check_comparable

        check_comparable(reference.session, model, manifest)
    if args.bundle is None:
        planned = benchmark.make_bundles(reference.session.pipeline, planned, cache, skipped)
    peers = benchmark.open_peers(args.peers, reference, inputs, args.components, cache)
    try:
        result = benchmark.run_bench(
            reference,
            peers,
            inputs,
            planned,
            skipped,
            args.components,
            args.runs,
            args.warmup,
            args.device,
        )
    finally:
        for peer in peers:
            getattr(peer.session, "close", lambda: None)()  # a client's worker process
    print(bench_table(result))
    if args.out is not None:
        benchmark.write_results(args.out, result, command(args, targets), args.overwrite)
        logger.info("wrote %s (bench.json, bench.csv, bench.png, bench.md)", args.out)
    return (
        0 if len(result["bundles"]) > 1 + len(peers) else 3
    )  # 3: nothing could be timed here, as validate


def split_runtime_options(pairs: list[str], targets: list[str]) -> dict[str, dict[str, Any]]:
    """--runtime-option [TARGET:]KEY=VALUE pairs as each target's runtime settings: a pair with a
    target goes to it; one without, to every target whose runtime takes the key."""
    from instaflow_edge.export import get_exporter
    from instaflow_edge.runtimes import get_runtime

    classes = {}
    for target in targets:
        try:
            classes[target] = get_runtime(get_exporter(target).runtime).options
        except UserError:
            continue  # not installed here: skipped by the plan
    given: dict[str, list[str]] = {target: [] for target in classes}
    for pair in pairs:
        head, sep, rest = pair.partition(":")
        if sep and "=" not in head:
            if head not in classes:
                raise UserError(f"--runtime-option {pair}: target {head!r} is not benchmarked")
            given[head].append(rest)
            continue
        key = pair.partition("=")[0].strip().replace("-", "_")
        takers = [target for target, cls in classes.items() if key in cls.keys()]
        if not takers:
            raise UserError(
                f"unknown runtime option {key!r} for {', '.join(classes) or 'these targets'}"
            )
        for target in takers:
            given[target].append(pair)
    return {target: classes[target].given_values(found) for target, found in given.items()}


def default_cache() -> Path:
    home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(home) / "instaflow-edge" / "bench"


def command(args: argparse.Namespace, targets: list[str]) -> str:
    """The command that repeats this bench (settings spelled out, cache and --out left out)."""
    words = ["instaflow-edge", "bench"]
    if args.bundle is not None:
        words += ["--bundle", str(args.bundle)]
    else:
        words += ["--model", args.model or "tiny", "--targets", ",".join(targets)]
        for flag in ("precisions", "methods", "presets"):
            value = getattr(args, flag)
            if value is not None:
                words += [f"--{flag}", ",".join(value) or "none"]
    if args.peers:
        words += ["--peers", ",".join(args.peers)]
    words += ["--batch", ",".join(map(str, args.batch))]
    words += ["--components", ",".join(args.components)]
    words += ["--runs", str(args.runs), "--warmup", str(args.warmup)]
    if args.device != "cpu":
        words += ["--device", args.device]
    for pair in args.runtime_option:
        words += ["--runtime-option", pair]
    if args.prompt:
        words += ["--prompt", args.prompt]
    return shlex.join(words)
