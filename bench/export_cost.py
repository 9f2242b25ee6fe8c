"""Benchmark: what an export costs, per target: wall time and peak resident memory of the user's own
command (`instaflow-edge export --model MODEL --target T`, parity check included), each in a child
process whose peak is its own (wait4's ru_maxrss), beside the fp32 bytes of the model's largest
component (issue 16's goal: peak <= 2.5x the UNet's fp32 weights). With --peers, the clients' own
exporters (optimum-onnx's main_export, optimum-intel's OVDiffusionPipeline export=True) run from the
same model, saved once as a diffusers folder, in their venvs (clients/build_venvs.sh). With
--quantize TARGET:METHOD, `instaflow-edge quantize` of that target's new bundle too (a calibrated
method reads --calibration).

Usage: python bench/export_cost.py [--model sd15] [--targets onnx,openvino,coreml] [--peers]
       [--quantize openvino:int8-full --calibration DIR] [--workdir DIR]
       -> bench/results/export_cost_MODEL.json and .md
(sd15: about 20 minutes on 2 cores and up to the peak it reports, so run nothing else beside it.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from instaflow_edge.client_peers import export_command, worker_env
from instaflow_edge.latency import machine
from instaflow_edge.pipeline import OneStepPipeline

RESULTS = Path(__file__).resolve().parent / "results"
GOAL = 2.5  # peak resident memory over the largest component's fp32 weights
# the clients' exporters at their defaults, and how each checks what it wrote
CLIENTS = {
    "optimum-onnx": "each graph against PyTorch within an atol (main_export's validation)",
    "optimum-intel": "none",
}


def timed_child(command: list[str], log: Path, env: dict[str, str] | None = None) -> dict:
    """Run `command` to the end; its wall time and peak resident memory (its own, not ours)."""
    started = time.perf_counter()
    with open(log, "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=output, env=env)
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
        raise SystemExit(f"{' '.join(command[:4])} ... failed: {tail}")
    return {"seconds": round(seconds, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2)}


def our_row(command: list[str], out: Path, label: str) -> dict:
    """One `instaflow-edge` command writing bundle `out`: its cost, and what its manifest says."""
    print(f"instaflow-edge {label} ...", flush=True)
    cost = timed_child([*command, "-o", str(out), "--overwrite"], out.with_suffix(".log"))
    manifest = json.loads((out / "manifest.json").read_text())
    row = {
        "exporter": f"instaflow-edge {label}",
        "precision": manifest["precision"],
        "check": check_of(manifest["details"]["parity"]),
        **cost,
        "bundle_gib": folder_gib(out),
    }
    print(row, flush=True)
    return row


def check_of(parity: dict) -> str:
    """What the export-time check of one of our bundles did."""
    if "skipped" in parity:
        return f"none: {parity['skipped']}"
    return f"PSNR gates per graph and end to end against {parity['against']}, run on {parity['executed_on']}"


def folder_gib(folder: Path) -> float:
    return round(sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**30, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--targets", default="onnx,openvino,coreml")
    parser.add_argument("--peers", action="store_true", help="the clients' exporters too")
    parser.add_argument("--quantize", action="append", default=[], metavar="TARGET:METHOD")
    parser.add_argument("--calibration", type=Path, help="the set a calibrated method reads")
    parser.add_argument("--workdir", type=Path, help="keep the bundles here (default: a temp dir)")
    args = parser.parse_args()

    pipeline = OneStepPipeline.from_pretrained(args.model)
    weights = {
        name: sum(p.numel() * 4 for p in getattr(pipeline, name).parameters()) / 2**30
        for name in ("text_encoder", "unet", "vae")
    }
    largest = max(weights, key=weights.get)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="export-cost-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.peers:
        pipeline.save_pretrained(workdir / "model", overwrite=True)
    pipeline.release_weights()  # this process stays small: the children's peaks are their own

    rows = []
    ours = [sys.executable, "-m", "instaflow_edge"]
    for target in args.targets.split(","):
        command = [*ours, "export", "--model", args.model, "--target", target]
        rows.append(our_row(command, workdir / f"ours-{target}", f"export --target {target}"))
    for pair in args.quantize:
        target, method = pair.split(":")
        command = [
            *ours,
            "quantize",
            "--method",
            method,
            "--bundle",
            str(workdir / f"ours-{target}"),
        ]
        if args.calibration:
            command += ["--calibration", str(args.calibration)]
        label = f"quantize --method {method} ({target})"
        rows.append(our_row(command, workdir / f"ours-{target}-{method}", label))
    for client in CLIENTS if args.peers else ():
        out = workdir / f"peer-{client}"
        shutil.rmtree(out, ignore_errors=True)
        command = export_command(client, workdir / "model", out)
        print(f"{client}'s own export ...", flush=True)
        cost = timed_child(command, workdir / f"peer-{client}.log", worker_env())
        rows.append(
            {
                "exporter": f"{client}'s own export",
                "precision": "fp32",
                "check": CLIENTS[client],
                **cost,
                "bundle_gib": folder_gib(out),
            }
        )
        print(rows[-1], flush=True)
    for row in rows:
        row["peak_over_weights"] = round(row["peak_rss_gib"] / weights[largest], 2)
        row["goal_met"] = row["peak_over_weights"] <= GOAL

    result = {
        "benchmark": f"export cost of {args.model}: wall time and peak resident memory per exporter",
        "fp32_weights_gib": {name: round(size, 2) for name, size in weights.items()},
        "goal": f"peak resident memory <= {GOAL}x the {largest}'s fp32 weights "
        f"({GOAL * weights[largest]:.1f} GiB)",
        "machine": machine(),
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"export_cost_{args.model}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    """The table of one run, as the README shows it."""
    cpu, host = result["machine"]["cpu"], result["machine"]
    lines = [
        f"{result['goal'][0].upper()}{result['goal'][1:]}; {cpu['model']} "
        f"({', '.join(cpu['flags'])}), {host['threads']['cpu_count']} cores, "
        f"{host['memory_gib']:.0f} GiB:",
        "",
        "| exporter | precision | its check | wall time | peak RSS | x weights | goal |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['exporter']} | {row['precision']} | {row['check']}"
            f" | {row['seconds']:.0f} s | {row['peak_rss_gib']:.2f} GiB"
            f" | {row['peak_over_weights']:.2f}x | {'met' if row['goal_met'] else 'not met'} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
