"""Command-line pieces several commands share: bundle sessions, runtime options, gate overrides."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from instaflow_edge.errors import UserError
from instaflow_edge.gates import GATE_FLAGS


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """--device and --runtime-option KEY=VALUE, for the commands that run a bundle."""
    parser.add_argument(
        "--device",
        default="cpu",
        help="where the bundle runs (cpu; onnx: cuda; openvino: GPU, NPU, AUTO; coreml: "
        "coreml-device); PyTorch runs on cuda when the bundle does, else on the cpu",
    )
    parser.add_argument(
        "--runtime-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting of the bundle's runtime (repeatable): onnxruntime threads, spinning, "
        "graph_optimization, memory_arena, cuda_graph; openvino inference_precision "
        "(f32|f16|bf16|default), threads, "
        "performance_hint, cache_dir; coreml compute_units, require_device; all: fused, "
        "reduce_memory (one graph held at a time: sd15's peak is the UNet's alone)",
    )


def runtime_options(bundle: Path, pairs: list[str]) -> dict[str, Any]:
    """The runtime settings --runtime-option pairs give, typed and checked before anything loads;
    the bundle's own recorded settings stay beneath them."""
    from instaflow_edge.manifest import read_manifest
    from instaflow_edge.runtimes import get_runtime

    return get_runtime(read_manifest(bundle).runtime).options.given_values(pairs)


def reference_device(device: str) -> str:
    """Where PyTorch runs beside a bundle on `device`: CUDA with CUDA, else the CPU."""
    return "cuda" if device.startswith("cuda") else "cpu"


def add_session_arguments(parser: argparse.ArgumentParser) -> None:
    """The options validate and bench share: bundle, reference, device, runtime, timed runs."""
    parser.add_argument("--bundle", type=Path, required=True, help="the bundle directory")
    parser.add_argument(
        "--reference",
        help="the PyTorch reference model (default: the model the bundle was exported from)",
    )
    add_runtime_arguments(parser)
    parser.add_argument("--runs", type=int, default=10, help="timed runs per measurement (10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up runs first (2)")


def check_runs(args: argparse.Namespace) -> None:
    if args.runs < 1 or args.warmup < 0:
        raise UserError("--runs must be at least 1 and --warmup at least 0")


def add_gate_arguments(parser: argparse.ArgumentParser) -> None:
    """--min-tensor-psnr, --min-image-psnr, --min-unet-cosine: a number, or 'off'."""
    group = parser.add_argument_group(
        "gate overrides (a number, or 'off'; recorded in the manifest or report)"
    )
    for flag in GATE_FLAGS:
        metavar = "C|off" if "cosine" in flag else "DB|off"
        group.add_argument(
            "--" + flag.replace("_", "-"),
            type=_gate_value,
            default=argparse.SUPPRESS,
            metavar=metavar,
        )


def gate_overrides(args: argparse.Namespace) -> dict[str, float | None]:
    return {gate: getattr(args, flag) for flag, gate in GATE_FLAGS.items() if hasattr(args, flag)}


def _gate_value(text: str) -> float | None:
    if text.lower() == "off":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'off', not {text!r}") from None


def option_classes(kind: str) -> dict[str, type]:
    """Every target's export (kind "export") or quantize options class, by target."""
    from instaflow_edge.export import get_exporter, target_names

    classes = {}
    for target in target_names():
        try:
            exporter = get_exporter(target)
        except UserError:
            continue  # a target whose libraries are not installed offers no flags
        classes[target] = getattr(exporter, f"{kind}_options")
    return classes


MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed


def seed_value(text: str) -> int:
    """--seed: a whole number from 0 to 2**63 - 1."""
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if not 0 <= seed <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"a seed is from 0 to {MAX_SEED}, not {seed}")
    return seed


def prompt_text(text: str) -> str:
    """--prompt: text that is valid UTF-8 (bytes that are not arrive as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(
            f"{text.encode('utf-8', 'replace').decode()!r} is not valid UTF-8 text"
        ) from None
    return text
