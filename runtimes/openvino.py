"""OpenVINO: run an OpenVINO IR bundle on CPU, GPU, NPU or AUTO, and report the device that ran.

Imports only numpy, openvino, tokenizers and the standard library (never torch): edge boxes run
bundles with this module, and a test imports it with torch blocked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from instaflow_edge.errors import UserError
from instaflow_edge.manifest import Manifest
from instaflow_edge.memory import drop_mapped_pages
from instaflow_edge.options import option
from instaflow_edge.runtimes.base import (
    BundleSession,
    GraphTensor,
    Runtime,
    RuntimeOptions,
    RuntimeUnavailable,
    Session,
    thread_count,
)

DEVICES = ("CPU", "GPU", "NPU", "AUTO")


@dataclass(frozen=True)
class OpenVinoOptions(RuntimeOptions):
    """OpenVINO options."""

    # f32 by default: the CPU here would otherwise execute in bf16 (47 dB instead of 130 dB)
    inference_precision: str = option(
        "f32",
        "the precision the device executes in; 'default' leaves OpenVINO's own (bf16 on CPUs "
        "that have it, as optimum-intel runs)",
        ("f32", "f16", "bf16", "default"),
    )
    threads: int | None = option(None, "inference threads (default: OpenVINO's)")
    performance_hint: str = option(
        "LATENCY", "OpenVINO's performance hint", ("LATENCY", "THROUGHPUT")
    )
    cache_dir: str | None = option(None, "folder for OpenVINO's compiled-model cache")


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


def compile_config(options: OpenVinoOptions) -> dict[str, str]:
    """OpenVINO properties for compile_model from this runtime's options."""
    config = {"PERFORMANCE_HINT": options.performance_hint}
    if options.threads is not None:
        config["INFERENCE_NUM_THREADS"] = str(thread_count(options.threads))
    if options.cache_dir is not None:
        config["CACHE_DIR"] = str(options.cache_dir)
    if options.inference_precision != "default":
        config["INFERENCE_PRECISION_HINT"] = options.inference_precision
    return config


class OpenVinoSession(BundleSession):
    """One compiled model and infer request per component.

    `executed_on` is what OpenVINO reports it ran on (AUTO resolved through EXECUTION_DEVICES);
    `inference_precision` is the precision the device actually executes in.
    """

    runtime = "openvino"

    def __init__(self, bundle: Path, manifest: Manifest, device: str, options: OpenVinoOptions):
        self.core = _openvino().Core()
        self.device = device
        self.config = config = compile_config(options)
        self.attach_bundle(bundle, manifest, options)
        self.load_graphs()
        # what ran the UNet (with reduce_memory, the first graph loaded)
        compiled, _ = self.loaded.get("unet") or next(iter(self.loaded.values()))
        self.executed_on = ",".join(compiled.get_property("EXECUTION_DEVICES"))
        # AUTO passes these to the device it picks but does not report them: then what was asked
        precision = _property(compiled, "INFERENCE_PRECISION_HINT")
        self.inference_precision = (
            precision.get_type_name()
            if precision is not None
            else config.get("INFERENCE_PRECISION_HINT", "default")
        )
        threads = _property(compiled, "INFERENCE_NUM_THREADS")
        self.threads = int(
            threads if threads is not None else config.get("INFERENCE_NUM_THREADS", 0)
        )

    def load_graph(self, component: str, path: Path):
        """The compiled model and its infer request. The pages of the weights file that compiling
        read are handed back: the compiled model computes from its own copy (sd15's fp32 UNet in
        f32 held 6.7 GiB running, 3.5 GiB without them; in bf16 5.1 and 1.8 GiB)."""
        compiled = self.core.compile_model(str(path), self.device, self.config)
        drop_mapped_pages(path.with_suffix(".bin"))
        return compiled, compiled.create_infer_request()

    def settings(self) -> dict[str, object]:
        return {**super().settings(), "executed_precision": self.inference_precision}

    def graph_tensors(self, component: str, graph) -> dict[str, GraphTensor]:
        declared = {t.name for t in (*self.specs[component].inputs, *self.specs[component].outputs)}
        compiled, _ = graph
        return {  # a port has a set of names (a converted graph keeps its old ones too)
            min(port.get_names() & declared or port.get_names()): (
                tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape()),
                np.dtype(port.get_element_type().to_dtype()).name,
            )
            for port in (*compiled.inputs, *compiled.outputs)
        }

    def infer(self, component: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        _, request = self.graph(component)
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
    options = OpenVinoOptions

    def open(
        self, bundle: Path, manifest: Manifest, device: str, options: OpenVinoOptions
    ) -> Session:
        ov = _openvino()
        name = resolve_device(device, ov.Core().available_devices)
        return OpenVinoSession(bundle, manifest, name, options)
