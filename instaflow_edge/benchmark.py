"""Bundles timed beside the PyTorch fp32 reference (`instaflow-edge bench`): the bundles of every
target, precision, quantization method and preset asked for, made into a cache by the export and
quantize flows when missing, then timed in interleaved rounds in one process, with FLOPs, memory,
size on disk and parity; written as JSON, CSV, a PNG chart and a Markdown table."""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from instaflow_edge import __version__
from instaflow_edge.atomic import atomic_directory
from instaflow_edge.components import RECIPE, component_specs
from instaflow_edge.errors import UserError
from instaflow_edge.gates import GateFailed
from instaflow_edge.jsonio import dumps
from instaflow_edge.latency import END_TO_END, interleaved, machine, summarize
from instaflow_edge.manifest import BundleError, read_manifest
from instaflow_edge.memory import peak_memory
from instaflow_edge.metrics import image_psnr, tensor_metrics
from instaflow_edge.runtimes import RuntimeUnavailable, Session, load_session

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
PARTS = (*RECIPE, END_TO_END)  # what can be timed: each component, and text ids to image
REFERENCE = "pytorch-fp32"
RESULTS = "bench.json"  # the file that makes an --out folder one of ours
CALIBRATION_PROMPTS = 64  # for the calibrated methods, as the README's quantized rows
NOTES = {
    "speedup_p50": "PyTorch fp32 p50 / this p50, timed in the same rounds (above 1: faster)",
    "gflop_per_s": "the reference's FLOPs (torch.utils.flop_counter: matmuls, convolutions, "
    "attention) for the call, over its p50",
    "images_per_s": "batch / p50 (for a component: its samples per second)",
    "psnr_db": "tensor PSNR of the component's output, image PSNR (8-bit) end to end, against "
    "PyTorch fp32 on the same inputs",
    "peak_rss_mib": "the process's peak resident memory while the bundle loaded and ran each "
    "timed call once, above its resident memory before (Linux VmHWM, reset per bundle); the "
    "reference's includes loading the model",
    "size_mib": "the files the manifest lists for the component (end to end: the whole bundle)",
}


@dataclass
class Planned:
    """One bundle to time: how it is made (an export at `precision`, a quantization of the
    target's `source` export with `method`, or a `preset`), where it is, and the caller's runtime
    settings over the bundle's own."""

    name: str
    target: str
    precision: str | None = None
    method: str | None = None
    source: str | None = None
    preset: str | None = None
    path: Path | None = None
    runtime_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Timed:
    """A loaded session in the bench: its name, what it is and ran with (`info`, its memory
    too), its PSNR per (part, batch) and its size on disk per part in MiB."""

    name: str
    session: Session
    info: dict[str, Any]
    psnr: dict[tuple[str, int], float] = field(default_factory=dict)
    sizes: dict[str, float] = field(default_factory=dict)


# -- what to time ---------------------------------------------------------------------------------
def plan(
    targets: list[str],
    precisions: list[str],
    methods: list[str] | None,
    presets: list[str] | None,
    device: str,
) -> tuple[list[Planned], list[dict[str, str]]]:
    """The bundles of these targets at these precisions, with these quantization methods (None:
    each target's, but those named like a precision) and presets (None: each target's). A target
    that cannot be timed here is skipped, saying why."""
    from instaflow_edge.export import get_exporter, target_names
    from instaflow_edge.export.base import PRECISIONS
    from instaflow_edge.runtimes import get_runtime

    for target in targets:
        if target not in target_names():
            raise UserError(
                f"unknown target {target!r}; known targets: {', '.join(target_names())}"
            )
    for precision in precisions:
        if precision not in PRECISIONS:
            raise UserError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    exporters, skipped = {}, []
    for target in targets:
        try:
            exporters[target] = get_exporter(target)
        except UserError as error:  # its libraries are not installed here
            skipped.append({"bundle": target, "reason": str(error)})
    for kind, asked in (("method", methods), ("preset", presets)):
        known = {name for e in exporters.values() for name in getattr(e, f"{kind}s")}
        unknown = [name for name in asked or [] if name not in known]
        if unknown:
            raise UserError(
                f"unknown {kind} {unknown[0]!r} for targets {', '.join(targets)}; "
                f"theirs: {', '.join(sorted(known)) or 'none'}"
            )
    planned = []
    for target, exporter in exporters.items():
        why = get_runtime(exporter.runtime).why_not_timed(device)
        if why:
            skipped.append({"bundle": target, "reason": why})
            continue
        planned += [Planned(f"{target}-{p}", target, precision=p) for p in precisions]
        source = "fp32" if "fp32" in exporter.quantizes_from else exporter.quantizes_from[0]
        wanted = methods if methods is not None else exporter.methods
        for method in exporter.methods:
            if method in wanted and (methods is not None or method not in PRECISIONS):
                name = f"{target}-{source}-{method}"
                planned.append(Planned(name, target, method=method, source=source))
        for preset in exporter.presets:
            if presets is None or preset in presets:
                planned.append(Planned(f"{target}-{preset}", target, preset=preset))
    return planned, skipped


def make_bundles(
    pipeline: Any, planned: list[Planned], cache: Path, skipped: list[dict[str, str]]
) -> list[Planned]:
    """Export into `cache` (a folder per model weights) every planned bundle not there yet, with
    the sources its quantization needs and one calibration set for the calibrated methods; a
    bundle that misses its parity gates is skipped, with the numbers. Returns those that exist."""
    fingerprint = pipeline.fingerprint()
    folder = Path(cache) / fingerprint[:16]
    made = []
    for item in planned:
        item.path = folder / item.name
        try:
            _make(pipeline, item, folder, fingerprint)
        except GateFailed as error:
            skipped.append({"bundle": item.name, "reason": str(error)})
            continue
        made.append(item)
    return made


def _make(pipeline: Any, item: Planned, folder: Path, fingerprint: str) -> None:
    from instaflow_edge.export import get_exporter

    exporter = get_exporter(item.target)
    if item.preset is not None:
        recorded = exporter.preset(item.preset).runtime_options
        if not _cached(item.path, fingerprint, recorded):
            exporter.export_preset(pipeline, item.path, item.preset, overwrite=True)
        return
    if item.method is None:
        if not _cached(item.path, fingerprint):
            exporter.export(pipeline, item.path, item.precision, overwrite=True)
        return
    source = folder / f"{item.target}-{item.source}"
    if not _cached(source, fingerprint):
        exporter.export(pipeline, source, item.source, overwrite=True)
    if not _cached(item.path, fingerprint):
        calibration = None
        if item.method in exporter.calibrated_methods:
            calibration = _calibration_set(pipeline, folder / "calibration")
        exporter.quantize(source, item.path, item.method, calibration, overwrite=True)


def _cached(bundle: Path, fingerprint: str, runtime_options: Any = None) -> bool:
    """Whether `bundle` is a readable bundle of these weights with these recorded settings."""
    try:
        manifest = read_manifest(bundle)
    except BundleError:
        return False
    return manifest.source_model.get("sha256") == fingerprint and manifest.runtime_options == dict(
        runtime_options or {}
    )


def _calibration_set(pipeline: Any, path: Path) -> Path:
    """The cache's calibration set (made once) from `_calibration_prompts`."""
    from instaflow_edge.calibration import load_calibration
    from instaflow_edge.calibration.builder import build_calibration

    try:
        load_calibration(path)
        return path
    except UserError:
        prompts = _calibration_prompts(pipeline)
        return build_calibration(pipeline, prompts, path, overwrite=path.exists())


def _calibration_prompts(pipeline: Any) -> list[str]:
    """The first prompts of the model's own prompt set."""
    from instaflow_edge.calibration.prompts import load_prompts, model_prompt_set

    return load_prompts(model_prompt_set(pipeline), CALIBRATION_PROMPTS)


# -- timing -----------------------------------------------------------------------------------------
@dataclass
class Inputs:
    """What every side is fed: token ids and noise for the largest batch, and the reference's
    inputs and outputs of every component at each batch (`validate.reference_io`)."""

    prompts: list[str]
    ids: np.ndarray
    noise: np.ndarray
    recorded: dict[int, dict[str, dict[str, np.ndarray]]]


def open_reference(
    model: str | None, device: str, batches: list[int], prompt: str | None
) -> tuple[Timed, Inputs]:
    """The PyTorch fp32 reference and its outputs at each batch (prompt repeated, or the first
    synthetic prompts), with the memory loading and running it took."""
    from instaflow_edge.calibration.prompts import load_prompts
    from instaflow_edge.runtimes.torch_ref import load_reference
    from instaflow_edge.validate import reference_io

    largest = max(batches)
    with peak_memory() as memory:
        reference = load_reference(model, device)
        prompts = [prompt] * largest if prompt else load_prompts("synthetic", largest)
        ids = reference.tokenize(prompts)
        noise = reference.pipeline.make_noise(range(largest)).numpy()
        recorded = {b: reference_io(reference, ids[:b], noise[:b]) for b in batches}
    info = {
        "target": "torch",
        "precision": "fp32",
        "quantization": None,
        "preset": None,
        "path": None,
        "runtime": reference.settings(),
        "threads": None,
        "static_batch": None,
        "peak_rss_mib": memory["peak_rss_mib"],
    }
    return Timed(REFERENCE, reference, info), Inputs(prompts, ids, noise, recorded)


def run_bench(
    reference: Timed,
    peers: list[Timed],
    inputs: Inputs,
    planned: list[Planned],
    skipped: list[dict[str, str]],
    parts: list[str],
    runs: int,
    warmup: int,
    device: str,
) -> dict[str, Any]:
    """Load each planned bundle and check it against the reference on every part and batch,
    then time them all, reference and peers first, in interleaved rounds; returns the results."""
    from instaflow_edge.validate import component_feeds

    batches = sorted(inputs.recorded)
    timed = [reference, *peers]
    for item in planned:
        try:
            timed.append(_open(item, device, inputs, parts))
        except RuntimeUnavailable as error:
            skipped.append({"bundle": item.name, "reason": str(error)})
    contract = component_specs(reference.session.pipeline.shapes)
    calls = {}
    for part in parts:
        for b in batches:
            for entry in timed:
                specs = getattr(entry.session, "specs", contract)  # a bundle's, or the model's
                feeds = component_feeds(specs, inputs.recorded[b])
                calls[part, b, entry.name] = _call(
                    entry.session, part, inputs.ids[:b], inputs.noise[:b], feeds
                )
    smallest = batches[0]
    flops = count_flops({part: calls[part, smallest, REFERENCE] for part in parts})
    per_sample = {part: count / smallest for part, count in flops.items()}
    load = {"before": os.getloadavg()[0]}
    times = interleaved(calls, runs, warmup, desc="bench")
    load["after"] = os.getloadavg()[0]
    by_name = {entry.name: entry for entry in timed}
    rows = []
    for (part, b, name), series in times.items():
        measured = summarize(series)
        seconds = measured["p50_ms"] / 1000
        gflop = per_sample[part] * b / 1e9
        rows.append(
            {
                "bundle": name,
                "part": part,
                "batch": b,
                **measured,
                "speedup_p50": summarize(times[part, b, REFERENCE])["p50_ms"] / measured["p50_ms"],
                "gflop": gflop,
                "gflop_per_s": gflop / seconds,
                "images_per_s": b / seconds,
                "psnr": "image" if part == END_TO_END else "tensor",
                "psnr_db": by_name[name].psnr.get((part, b)),
                "size_mib": by_name[name].sizes.get(part),
            }
        )
    pipeline = reference.session.pipeline
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": "instaflow-edge bench",
        "toolkit_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"id": pipeline.source, "sha256": pipeline.fingerprint()},
        "settings": {
            "parts": parts,
            "batches": batches,
            "runs": runs,
            "warmup": warmup,
            "device": device,
            "reference_device": reference.session.executed_on,
            "prompts": inputs.prompts,
        },
        "environment": {**machine(), "load_average_1min": load},
        "flops_per_sample": per_sample,
        "notes": NOTES,
        "bundles": [{"name": entry.name, **entry.info} for entry in timed],
        "skipped": skipped,
        "rows": rows,
    }


def _open(item: Planned, device: str, inputs: Inputs, parts: list[str]) -> Timed:
    """Load a bundle and run each part once at each batch against the reference (its parity,
    and its warm-up), measuring the memory that takes."""
    manifest = read_manifest(item.path)
    with peak_memory() as memory:
        session = load_session(item.path, device, item.runtime_options)
        psnr = _parity(session, session.specs, inputs, parts)
    files = {
        name: sum((item.path / f).stat().st_size for f in entry.files)
        for name, entry in manifest.components.items()
    }
    files[END_TO_END] = sum((item.path / f).stat().st_size for f in manifest.all_files())
    info = {
        "target": manifest.target,
        "precision": manifest.precision,
        "quantization": manifest.quantization,
        "preset": manifest.details.get("preset"),
        "path": str(item.path),
        "runtime": session.settings(),
        "threads": getattr(session, "threads", None),
        "static_batch": session.specs["unet"].static_batch,
        "peak_rss_mib": memory["peak_rss_mib"],
    }
    sizes = {name: size / 2**20 for name, size in files.items()}
    return Timed(item.name, session, info, psnr, sizes)


def _parity(
    session: Session, specs: dict[str, Any], inputs: Inputs, parts: list[str]
) -> dict[tuple[str, int], float]:
    """Each part run once at each batch on the reference's inputs: its PSNR against them (and the
    session's warm-up)."""
    from instaflow_edge.validate import component_feeds

    psnr = {}
    for b, recorded in inputs.recorded.items():
        feeds = component_feeds(specs, recorded)
        for part in parts:
            if part == END_TO_END:
                images = session.generate(inputs.ids[:b], inputs.noise[:b])
                psnr[part, b] = image_psnr(recorded["generator"]["image"], images)
                continue
            output = specs[part].outputs[0].name
            got = session.run(part, feeds[part])[output]
            psnr[part, b] = tensor_metrics(recorded[part][output], got)["psnr_db"]
    return psnr


def open_peers(
    names: list[str],
    reference: Timed,
    inputs: Inputs,
    parts: list[str],
    cache: Path,
) -> list[Timed]:
    """What a user would run instead of a bundle, each checked against the reference like a
    bundle: the PyTorch peers (runtimes.torch_ref.PEERS; torch.compile compiles there) and the
    clients' own exports (client_peers.CLIENT_PEERS, made into `cache` once, each run by a
    worker in its client's venv)."""
    from instaflow_edge.client_peers import CLIENT_PEERS, open_client_peer
    from instaflow_edge.runtimes.torch_ref import PEERS, load_peer

    contract = component_specs(reference.session.pipeline.shapes)
    pipeline = reference.session.pipeline
    folder = Path(cache) / pipeline.fingerprint()[:16]
    peers = []
    for name in names:
        if name in CLIENT_PEERS:
            session = open_client_peer(
                name, reference.session, folder, _calibration_prompts(pipeline)
            )
            session.tokenize(inputs.prompts)  # the prompts behind the bench's token ids
            psnr = _parity(session, contract, inputs, parts)
            info = {
                **reference.info,
                "target": CLIENT_PEERS[name].client,
                "precision": name,
                "path": str(session.export),
                "runtime": session.settings(),
                "threads": session.ready.get("threads"),
                "peer": CLIENT_PEERS[name].description,
                "peak_rss_mib": session.peak_rss_mib(),
            }
            peers.append(Timed(name, session, info, psnr, session.sizes()))
            continue
        with peak_memory() as memory:
            session = load_peer(name, reference.session)
            psnr = _parity(session, contract, inputs, parts)
        info = {**reference.info, "precision": name, "peer": PEERS[name]}
        info["peak_rss_mib"] = memory["peak_rss_mib"]
        peers.append(Timed(name, session, info, psnr))
    return peers


def _call(
    session: Session,
    part: str,
    ids: np.ndarray,
    noise: np.ndarray,
    feeds: dict[str, dict[str, np.ndarray]],
) -> Callable[[], object]:
    if part == END_TO_END:
        return session.prepare_generate(ids, noise)
    return session.prepare(part, feeds[part])


def count_flops(calls: dict[str, Callable[[], object]]) -> dict[str, int]:
    """FLOPs of one call of each part, as torch's flop counter counts them (the reference's)."""
    from torch.utils.flop_counter import FlopCounterMode

    flops = {}
    for part, call in calls.items():
        with FlopCounterMode(display=False) as counter:
            call()
        flops[part] = counter.get_total_flops()
    return flops


# -- results ----------------------------------------------------------------------------------------
CSV_FIELDS = (
    "bundle",
    "target",
    "precision",
    "quantization",
    "preset",
    "runtime_options",
    "executed_on",
    "part",
    "batch",
    "p50_ms",
    "p90_ms",
    "mean_ms",
    "speedup_p50",
    "gflop",
    "gflop_per_s",
    "images_per_s",
    "psnr",
    "psnr_db",
    "peak_rss_mib",
    "size_mib",
)


def write_results(out: Path, result: dict[str, Any], command: str, overwrite: bool) -> Path:
    """bench.json, bench.csv, bench.png and bench.md into the folder `out`, all or none."""
    from instaflow_edge.tables import bench_markdown

    with atomic_directory(Path(out), overwrite, RESULTS) as staging:
        (staging / RESULTS).write_text(dumps({**result, "command": command}))
        (staging / "bench.csv").write_text(csv_text(result))
        speed_chart(result).save(staging / "bench.png")
        (staging / "bench.md").write_text(bench_markdown(result, command))
    return Path(out)


def csv_text(result: dict[str, Any]) -> str:
    """One line per bundle, part and batch (CSV_FIELDS)."""
    bundles = {entry["name"]: entry for entry in result["bundles"]}
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in result["rows"]:
        entry = bundles[row["bundle"]]
        runtime = {k: v for k, v in entry["runtime"].items() if k != "runtime"}
        writer.writerow(
            {
                **entry,
                **row,
                "executed_on": runtime.pop("executed_on"),
                "runtime_options": ";".join(f"{k}={v}" for k, v in runtime.items()),
            }
        )
    return buffer.getvalue()


def speed_chart(result: dict[str, Any]):
    """A PNG-ready PIL image: per part, each bundle's speed against PyTorch fp32 (p50) as
    horizontal bars, one per batch, with a line at 1x. Drawn with Pillow (a base dependency)."""
    from PIL import Image, ImageDraw

    parts, batches = result["settings"]["parts"], result["settings"]["batches"]
    names = [entry["name"] for entry in result["bundles"]]
    speed = {(r["part"], r["batch"], r["bundle"]): r["speedup_p50"] for r in result["rows"]}
    colours = ["#1a73e8", "#e8710a", "#188038", "#a142f4", "#d93025"]
    label, bars, bar, gap, top = 190, 520, 12, 10, 34
    scale = bars / max(max(speed.values()), 1.0)
    height = top + len(parts) * (22 + len(names) * (len(batches) * bar + 3) + gap)
    image = Image.new("RGB", (label + bars + 70, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((8, 6), f"speed vs PyTorch fp32 (p50), {result['model']['id']}", fill="black")
    for index, b in enumerate(batches):
        x = label + index * 90
        draw.rectangle((x, 20, x + 10, 28), fill=colours[index % len(colours)])
        draw.text((x + 14, 18), f"batch {b}", fill="black")
    y = top
    for part in parts:
        draw.text((8, y + 4), part, fill="black")
        y += 22
        first = y
        for name in names:
            draw.text((16, y + max(len(batches) * bar - 11, 0) // 2), name[:30], fill="black")
            for index, b in enumerate(batches):
                value = speed[part, b, name]
                draw.rectangle(
                    (label, y, label + value * scale, y + bar - 2),
                    fill=colours[index % len(colours)],
                )
                draw.text((label + value * scale + 4, y), f"{value:.2f}x", fill="black")
                y += bar
            y += 3
        draw.line((label + scale, first - 4, label + scale, y), fill="#555555")
        y += gap
    return image
