"""Latency of a bundle session next to the PyTorch reference: warm-up, timed runs, p50/p90, ratios."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from tqdm import tqdm

from instaflow_edge.manifest import library_versions
from instaflow_edge.runtimes.base import Session

END_TO_END = "end_to_end"


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
    """Time each component (the bundle's feeds; the reference gets them as float32) and end to end.

    `feeds`: component -> the bundle's inputs for one call. A row's ratio is bundle / PyTorch.
    """
    calls: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {}
    for component, inputs in feeds.items():
        reference_inputs = {name: _as_reference(value) for name, value in inputs.items()}
        calls[component] = (
            bundle.prepare(component, inputs),
            reference.prepare(component, reference_inputs),
        )
    calls[END_TO_END] = (
        lambda: bundle.generate(input_ids, noise),
        lambda: reference.generate(input_ids, noise),
    )
    rows = {}
    for name, (bundle_call, reference_call) in tqdm(calls.items(), desc="latency", unit="part"):
        timed_bundle = summarize(time_calls(bundle_call, runs, warmup))
        timed_reference = summarize(time_calls(reference_call, runs, warmup))
        rows[name] = {
            "bundle": timed_bundle,
            "reference": timed_reference,
            "ratio_p50": timed_bundle["p50_ms"] / timed_reference["p50_ms"],
            "ratio_p90": timed_bundle["p90_ms"] / timed_reference["p90_ms"],
        }
    return {"runs": runs, "warmup": warmup, "batch": int(noise.shape[0]), "rows": rows}


def environment(bundle: Session, reference: Session, device: str) -> dict[str, Any]:
    """Where the numbers were measured: device, what actually ran, threads, library versions."""
    import torch

    return {
        "device": device,
        "runtime": bundle.settings(),
        "bundle_executed_on": bundle.executed_on,
        "reference_executed_on": reference.executed_on,
        "threads": {
            "cpu_count": os.cpu_count(),
            "torch": torch.get_num_threads(),
            "bundle": getattr(bundle, "threads", None),
        },
        "library_versions": library_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }


def _as_reference(value: np.ndarray) -> np.ndarray:
    return value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value
