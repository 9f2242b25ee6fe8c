"""OpenVINO: run an OpenVINO IR bundle on CPU, GPU, NPU or AUTO, and report the device that ran.

Imports only numpy, openvino, tokenizers and the standard library (never torch): edge boxes run
bundles with this module, and a test imports it with torch blocked.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from instaflow_edge.errors import UserError
from instaflow_edge.manifest import Manifest
from instaflow_edge.runtimes.base import BundleSession, Runtime, RuntimeUnavailable, Session

DEVICES = ("CPU", "GPU", "NPU", "AUTO")
HINTS = ("LATENCY", "THROUGHPUT")
# f32 by default: the CPU here would otherwise execute in bf16 (47 dB instead of 130 dB)
DEFAULT_PRECISION = "f32"
PRECISIONS = ("f32", "f16", "bf16", "default")


def _openvino():
    try:
        import openvino
    except ImportError as error:
        raise RuntimeUnavailable(
            "openvino is not installed: pip install 'instaflow-edge[runtime]'"
        ) from error
    return openvino


def resolve_device(device: str, available: list[str]) -> str:
    """The OpenVINO device name for `device` ("cpu", "GPU", "gpu.1", "AUTO"...), or why it is absent."""
    name = device.upper()
    kind = name.split(".")[0]
    if kind not in DEVICES:
        raise UserError(f"unknown OpenVINO device {device!r}: use one of {', '.join(DEVICES)}")
    present = any(found == name or found.split(".")[0] == name for found in available)
    if kind != "AUTO" and not present:
        raise RuntimeUnavailable(
            f"OpenVINO device {name} is not present here; available: {', '.join(available)}"
        )
    return name


def compile_config(
    performance_hint: str = "LATENCY",
    num_threads: int | None = None,
    cache_dir: str | Path | None = None,
    inference_precision: str = DEFAULT_PRECISION,
) -> dict[str, str]:
    """OpenVINO properties for compile_model from this toolkit's options (checked here)."""
    hint = performance_hint.upper()
    if hint not in HINTS:
        raise UserError(f"unknown performance hint {performance_hint!r}: use latency or throughput")
    if inference_precision not in PRECISIONS:
        raise UserError(
            f"unknown inference precision {inference_precision!r}: use {', '.join(PRECISIONS)}"
        )
    config = {"PERFORMANCE_HINT": hint}
    if num_threads is not None:
        if int(num_threads) < 1:
            raise UserError("num_threads must be at least 1")
        config["INFERENCE_NUM_THREADS"] = str(int(num_threads))
    if cache_dir is not None:
        config["CACHE_DIR"] = str(cache_dir)
    if inference_precision != "default":
        config["INFERENCE_PRECISION_HINT"] = inference_precision
    return config


class OpenVinoSession(BundleSession):
    """One compiled model and infer request per component.

    `executed_on` is what OpenVINO reports it ran on (AUTO resolved through EXECUTION_DEVICES);
    `inference_precision` is the precision the device actually executes in.
    """

    runtime = "openvino"

    def __init__(
        self, bundle: Path, manifest: Manifest, device: str, config: dict[str, str], fused: bool
    ):
        ov = _openvino()
        core = ov.Core()
        self.attach_bundle(bundle, manifest)
        self.compiled = {
            name: core.compile_model(str(bundle / entry.file), device, config)
            for name, entry in manifest.components.items()
        }
        self.requests = {
            name: model.create_infer_request() for name, model in self.compiled.items()
        }
        unet = self.compiled["unet"]
        self.executed_on = ",".join(unet.get_property("EXECUTION_DEVICES"))
        # AUTO passes these to the device it picks but does not report them: then what was asked
        precision = _property(unet, "INFERENCE_PRECISION_HINT")
        self.inference_precision = (
            precision.get_type_name()
            if precision is not None
            else config.get("INFERENCE_PRECISION_HINT", "default")
        )
        threads = _property(unet, "INFERENCE_NUM_THREADS")
        self.threads = int(
            threads if threads is not None else config.get("INFERENCE_NUM_THREADS", 0)
        )
        self.fused = fused and "generator" in self.compiled

    def run(self, component: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run a component; a static batch-1 graph fed a larger batch runs one sample at a time."""
        if component not in self.compiled:
            raise UserError(f"this bundle has no component {component!r}")
        spec = self.specs[component]
        missing = [t.name for t in spec.inputs if t.name not in feeds]
        if missing:
            raise UserError(f"{component} needs input(s) {', '.join(missing)}")
        inputs = {t.name: np.ascontiguousarray(feeds[t.name], dtype=t.dtype) for t in spec.inputs}
        batch = next(iter(inputs.values())).shape[0]
        if spec.inputs[0].shape[0] == 1 and batch > 1:
            parts = [
                self._infer(component, {k: v[i : i + 1] for k, v in inputs.items()})
                for i in range(batch)
            ]
            return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
        return self._infer(component, inputs)

    def _infer(self, component: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        request = self.requests[component]
        request.infer(inputs)
        return {
            t.name: request.get_tensor(t.name).data.copy() for t in self.specs[component].outputs
        }


def _property(compiled, name: str):
    """A compiled model's property, or None where the device (AUTO) does not report it."""
    try:
        return compiled.get_property(name)
    except RuntimeError:
        return None


class OpenVinoRuntime(Runtime):
    """OpenVINO IR bundles (optimum-intel's layout) on OpenVINO."""

    name = "openvino"
    target = "openvino"

    def load(
        self,
        bundle: Path,
        device: str = "cpu",
        fused: bool = True,
        performance_hint: str = "LATENCY",
        num_threads: int | None = None,
        cache_dir: str | Path | None = None,
        inference_precision: str = DEFAULT_PRECISION,
        **options,
    ) -> Session:
        """Verify every file's sha256, then compile each component for `device`."""
        bundle = Path(bundle)
        manifest = self.verify(bundle)
        ov = _openvino()
        name = resolve_device(device, ov.Core().available_devices)
        config = compile_config(performance_hint, num_threads, cache_dir, inference_precision)
        return OpenVinoSession(bundle, manifest, name, config, fused)
