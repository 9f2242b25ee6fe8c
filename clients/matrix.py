"""Which client runs which of our outputs, and how each check is made: the one table that
tests/test_clients.py checks and `python -m clients.matrix` writes to bench/results/.

A row exports the embedded default (and quantizes it where the row says), makes our image of one
prompt from seed-0 noise with our own runtime, and runs `clients/check.py` in the client's venv:
the client loads the folder with its own `from_pretrained` and generates one step from the same
noise. The PSNR of its uint8 image against ours is the row's number.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a red circle above a blue square"
CLIENT_CLASSES = {
    "optimum-onnx": ("optimum-onnx", "ORTDiffusionPipeline"),
    "optimum-intel": ("optimum-intel", "OVDiffusionPipeline (f32 inference precision)"),
    "diffusers": ("diffusers", "DiffusionPipeline"),
}


@dataclass(frozen=True)
class Row:
    client: str  # a venv under client_peers.client_venvs(), or "diffusers" (ours)
    target: str | None  # None: a model folder (save_pretrained), not a bundle
    method: str | None = None  # a quantization method, or "fp16" export precision

    @property
    def name(self) -> str:
        what = "model folder" if self.target is None else f"{self.target} {self.method or 'fp32'}"
        return f"{self.client}: {what}"


ROWS = [
    Row("optimum-onnx", "onnx"),
    Row("optimum-onnx", "onnx", "fp16"),
    Row("optimum-onnx", "onnx", "int8-dynamic"),
    Row("optimum-onnx", "onnx", "int8-static"),  # the fastest-cpu-int8 preset's QDQ graphs
    Row("optimum-intel", "openvino"),
    Row("optimum-intel", "openvino", "fp16"),
    Row("optimum-intel", "openvino", "int8-weights"),
    Row("optimum-intel", "openvino", "hybrid-vae"),  # the fastest-cpu-int8 preset's int8 IR
    Row("diffusers", None),
]


def client_python(client: str) -> Path | None:
    """The client venv's python (ours for diffusers), or None where it is not built."""
    from instaflow_edge.client_peers import client_python as venv_python

    return Path(sys.executable) if client == "diffusers" else venv_python(client)


def client_version(client: str) -> str:
    package = CLIENT_CLASSES[client][0]
    code = f"from importlib.metadata import version; print(version({package!r}))"
    python = client_python(client)
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True).stdout.strip()


def folder_for(row: Row, pipeline, fp32_bundles, work: Path, calibration: Path) -> Path:
    """What the row's client loads: a model folder, an fp32 bundle, an fp16 export or a
    quantized bundle (`fp32_bundles(target)` gives the fp32 export; a calibrated method's set is
    `calibration`)."""
    from instaflow_edge.export import get_exporter

    if row.target is None:
        return pipeline.save_pretrained(work / "model", overwrite=True)
    exporter = get_exporter(row.target)
    out = work / f"{row.target}-{row.method or 'fp32'}"
    if row.method == "fp16" and "fp16" not in exporter.methods:
        return exporter.export(pipeline, out, "fp16", overwrite=True)
    if row.method is None:
        return fp32_bundles(row.target)
    given = calibration if row.method in exporter.calibrated_methods else None
    return exporter.quantize(fp32_bundles(row.target), out, row.method, given, overwrite=True)


def our_image(row: Row, folder: Path, pipeline, noise: np.ndarray) -> np.ndarray:
    """Our image of the prompt: the bundle's own runtime, or the PyTorch pipeline."""
    if row.target is None:
        return pipeline(PROMPT, noise=pipeline.make_noise([0]), output_type="np")
    from instaflow_edge.runtimes import load_session

    session = load_session(folder, fused=False)
    return session.generate(session.tokenize([PROMPT]), noise)


def check(row: Row, folder: Path, noise: np.ndarray, ours: np.ndarray, work: Path) -> dict:
    """Run clients/check.py for the row in its client's venv; its JSON report plus the time."""
    np.save(work / "noise.npy", noise)
    np.save(work / "ours.npy", ours)
    command = [
        str(client_python(row.client)), str(ROOT / "clients" / "check.py"), row.client,
        str(folder), "--prompt", PROMPT, "--noise", str(work / "noise.npy"),
        "--reference", str(work / "ours.npy"),
    ]  # fmt: skip
    started = time.perf_counter()
    result = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    if result.returncode != 0:
        raise RuntimeError(f"{row.name} failed:\n{result.stderr[-3000:]}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return {**report, "seconds": round(time.perf_counter() - started, 1)}


def _db(value: float | str) -> str:
    return "identical" if value == "inf" else f"{float(value):.1f}"


def _defaults(run: dict) -> str:
    """The pipeline's default call (50 steps with guidance), as a table cell."""
    image = "finite image" if run["finite"] else "non-finite image"
    return f"{run['steps']} steps from t={run['first_timestep']:g}, {image}"


def main() -> int:
    """Run every row whose client is built; write bench/results/clients.{json,md}."""
    from instaflow_edge.calibration.builder import build_calibration
    from instaflow_edge.calibration.prompts import load_prompts
    from instaflow_edge.export import get_exporter
    from instaflow_edge.pipeline import OneStepPipeline

    pipeline = OneStepPipeline.from_pretrained()
    noise = pipeline.make_noise([0]).numpy()
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)

        @functools.cache
        def fp32(target: str) -> Path:
            exporter = get_exporter(target)
            return exporter.export(pipeline, work / f"{target}-fp32", overwrite=True)

        calibration = build_calibration(
            pipeline, load_prompts("synthetic", limit=8), work / "calibration"
        )  # what the tests' calibrated bundles are made from
        for row in ROWS:
            if client_python(row.client) is None:
                print(f"skipped {row.name}: no venv (clients/build_venvs.sh)", file=sys.stderr)
                continue
            folder = folder_for(row, pipeline, fp32, work, calibration)
            report = check(row, folder, noise, our_image(row, folder, pipeline, noise), work)
            results.append({"row": row.name, "version": client_version(row.client), **report})
            print(f"{row.name}: {report['psnr_db']} dB", file=sys.stderr)
    out = ROOT / "bench" / "results"
    (out / "clients.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "| client | version | loads | PSNR vs ours (dB) | UNet timestep | at its defaults | seconds |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {r['row']} | {r['version']} | {r['pipeline']} | {_db(r['psnr_db'])} | "
            f"{r['timesteps']} | {_defaults(r['defaults'])} | {r['seconds']} |"
            for r in results
        ),
    ]
    (out / "clients.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
