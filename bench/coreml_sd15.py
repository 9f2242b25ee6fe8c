"""Benchmark: Core ML fp16 conversion of the sd15 preset's UNet on CPU (time, peak memory, size),
then 4-bit palettization of it (time, peak memory, size ratio); writes
bench/results/coreml_sd15_cpu.json.

Each stage runs in its own child process so that its peak memory (ru_maxrss) is its own. The
conversion peaks near 15 GB: run it alone (no other sd15 job), e.g. `nice python bench/coreml_sd15.py`.
Usage: python bench/coreml_sd15.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "coreml_sd15_cpu.json"


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def size_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def stage_convert(package: Path) -> dict:
    from instaflow_edge.export import get_exporter
    from instaflow_edge.export.base import pytorch_io
    from instaflow_edge.pipeline import OneStepPipeline

    exporter = get_exporter("coreml")
    # as measured in the README: the original attention (the default is now split-einsum), ALL, iOS16
    options = exporter.export_options(attention="original")
    pipeline = OneStepPipeline.from_pretrained("sd15")
    traced = pytorch_io(pipeline, exporter.static_batch(options) or 1)
    job = exporter.conversion(pipeline, "unet", "fp16", options, traced)
    start = time.perf_counter()
    with exporter.scratch():  # coremltools' temporary packages, removed after the save
        model = exporter.convert(job)
        exporter.save(model, package, job)
    return {"seconds": time.perf_counter() - start, "size_mib": size_mib(package)}


def stage_palettize(package: Path, out: Path) -> dict:
    from instaflow_edge.export.coreml import compress_package

    start = time.perf_counter()
    compress_package(package, out, "palettize-4")
    return {"seconds": time.perf_counter() - start, "size_mib": size_mib(out)}


def child(stage: str, workdir: Path) -> dict:
    """Run one stage in a fresh interpreter; its JSON result includes its own peak memory."""
    result = subprocess.run(
        [sys.executable, __file__, "--stage", stage, "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"stage {stage} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stage", choices=("convert", "palettize"))
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    if args.stage:
        package, out = args.workdir / "Unet.mlpackage", args.workdir / "Unet-p4.mlpackage"
        record = (
            stage_convert(package) if args.stage == "convert" else stage_palettize(package, out)
        )
        print(json.dumps({**record, "peak_rss_gib": peak_rss_gib()}))
        return
    workdir = Path(tempfile.mkdtemp(prefix="coreml-sd15-", dir=args.workdir))
    try:
        convert = child("convert", workdir)
        print(
            f"fp16 conversion: {convert['seconds']:.0f} s, peak {convert['peak_rss_gib']:.1f} GiB"
        )
        palettize = child("palettize", workdir)
        ratio = convert["size_mib"] / palettize["size_mib"]
        print(f"palettize-4: {palettize['seconds']:.0f} s, {ratio:.2f}x smaller")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    from importlib.metadata import version

    results = {
        "model": "sd15 preset UNet (random weights), batch 1, 64x64 latents, 77x768 text",
        "machine": {"platform": platform.platform(), "cpu": platform.processor()},
        "versions": {name: version(name) for name in ("torch", "coremltools")},
        "fp16_conversion": convert,
        "palettize_4": palettize,
        "palettize_4_size_ratio": ratio,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
