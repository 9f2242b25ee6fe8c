"""Latency of bundle sessions next to the PyTorch reference: warm-up, timed rounds interleaved in
one process, p50/p90, ratios; the machine they ran on."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from tqdm import tqdm

from instaflow_edge.manifest import library_versions
from instaflow_edge.runtimes.base import CONTRACT_DTYPES, Session

END_TO_END = "end_to_end"
# CPU flags that decide which kernels the runtimes pick (vector width, int8 dot products, bf16, AMX)
KERNEL_FLAGS = ("avx2", "fma", "avx512", "vnni", "bf16", "amx")

K = TypeVar("K", bound=Hashable)


def time_calls(call: Callable[[], object], runs: int, warmup: int) -> list[float]:
    """Milliseconds of each of `runs` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return times


def interleaved(
    calls: Mapping[K, Callable[[], object]], runs: int, warmup: int, desc: str = "latency"
) -> dict[K, list[float]]:
    """Milliseconds of each call in each of `runs` rounds, after `warmup` untimed rounds. A round
    makes every call once, in order, so every series sees the same load: on a shared machine a
    ratio of series timed in separate blocks is noise."""
    times: dict[K, list[float]] = {key: [] for key in calls}
    for index in tqdm(range(warmup + runs), desc=desc, unit="round"):
        for key, call in calls.items():
            start = time.perf_counter()
            call()
            if index >= warmup:
                times[key].append((time.perf_counter() - start) * 1000)
    return times


def summarize(times_ms: list[float]) -> dict[str, Any]:
    """p50, p90, mean and the raw times of one timed series."""
    return {
        "p50_ms": float(np.percentile(times_ms, 50)),
        "p90_ms": float(np.percentile(times_ms, 90)),
        "mean_ms": float(np.mean(times_ms)),
        "times_ms": [round(t, 4) for t in times_ms],
    }


def compare_latency(
    bundle: Session,
    reference: Session,
    feeds: dict[str, dict[str, np.ndarray]],
    input_ids: np.ndarray,
    noise: np.ndarray,
    runs: int,
    warmup: int,
) -> dict[str, Any]:
    """Time each component (the bundle's feeds; the reference gets them in the contract's
    dtypes: a Core ML text encoder takes its token ids as float32) and end to end.

    `feeds`: component -> the bundle's inputs for one call. A row's ratio is bundle / PyTorch.
    """
    calls: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {}
    for component, inputs in feeds.items():
        reference_inputs = {
            name: value.astype(CONTRACT_DTYPES[component, name]) for name, value in inputs.items()
        }
        calls[component] = (
            bundle.prepare(component, inputs),
            reference.prepare(component, reference_inputs),
        )
    calls[END_TO_END] = (
        lambda: bundle.generate(input_ids, noise),
        lambda: reference.generate(input_ids, noise),
    )
    flat = {(name, side): pair[side] for name, pair in calls.items() for side in (0, 1)}
    times = interleaved(flat, runs, warmup)
    rows = {}
    for name in calls:
        timed_bundle, timed_reference = summarize(times[name, 0]), summarize(times[name, 1])
        rows[name] = {
            "bundle": timed_bundle,
            "reference": timed_reference,
            "ratio_p50": timed_bundle["p50_ms"] / timed_reference["p50_ms"],
            "ratio_p90": timed_bundle["p90_ms"] / timed_reference["p90_ms"],
        }
    return {"runs": runs, "warmup": warmup, "batch": int(noise.shape[0]), "rows": rows}


def environment(bundle: Session, reference: Session, device: str) -> dict[str, Any]:
    """Where the numbers were measured: device, what actually ran, threads, the machine."""
    found = machine()
    return {
        "device": device,
        "runtime": bundle.settings(),
        "bundle_executed_on": bundle.executed_on,
        "reference_executed_on": reference.executed_on,
        **found,
        "threads": {**found["threads"], "bundle": getattr(bundle, "threads", None)},
    }


def machine() -> dict[str, Any]:
    """The machine: CPU model and its kernel-deciding flags (from /proc/cpuinfo on Linux), cores,
    memory, torch's threads, OS, Python and library versions."""
    import torch

    cpu = {"model": platform.processor() or platform.machine(), "flags": []}
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    for line in info.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            cpu["model"] = value.strip()
        elif key.strip() == "flags":
            cpu["flags"] = sorted(f for f in value.split() if any(k in f for k in KERNEL_FLAGS))
            break
    return {
        "cpu": cpu,
        "memory_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
        "threads": {"cpu_count": os.cpu_count(), "torch": torch.get_num_threads()},
        "library_versions": library_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
