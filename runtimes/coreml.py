"""Core ML runtime: real Core ML prediction on macOS, the MIL reference interpreter elsewhere.

Off macOS, results are labelled "MIL interpreter (Linux)" and are never device measurements:
they check the converted program itself, op by op, in its own precision. Imports numpy,
`tokenizers` and coremltools (which itself imports torch when installed); never torch directly.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from instaflow_edge.errors import UserError
from instaflow_edge.manifest import Manifest
from instaflow_edge.options import option
from instaflow_edge.runtimes.base import (
    BundleSession,
    GraphTensor,
    Runtime,
    RuntimeOptions,
    RuntimeUnavailable,
    Session,
)

INTERPRETER = f"MIL interpreter ({platform.system()})"
DEVICE_NAMES = ("cpu", "coreml", "coreml-device")
COMPUTE_UNITS = ("ALL", "CPU_AND_NE", "CPU_AND_GPU", "CPU_ONLY")


@dataclass(frozen=True)
class CoreMLOptions(RuntimeOptions):
    """Core ML options."""

    compute_units: str | None = option(
        None, "compute units for Core ML prediction (default: the bundle's)", COMPUTE_UNITS
    )
    require_device: bool = option(
        False, "refuse to fall back to the MIL interpreter off macOS (as device coreml-device)"
    )


def on_macos() -> bool:
    return platform.system() == "Darwin"


def _require_coremltools():
    try:
        import coremltools
    except ImportError as error:
        raise RuntimeUnavailable("coremltools is not installed: pip install coremltools") from error
    return coremltools


class _Predictor:
    """One .mlpackage: Core ML's MLModel on macOS, else the MIL interpreter on its saved program."""

    def __init__(self, path: Path, compute_units: str, device: bool):
        ct = _require_coremltools()
        self.device = device
        if device:
            self.model = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit[compute_units])
            description = self.model.get_spec().description
            self.tensors = {
                feature.name: _feature_tensor(feature)
                for feature in (*description.input, *description.output)
            }
            self.inputs = {i.name: np.dtype(self.tensors[i.name][1]) for i in description.input}
            self.executed_on = f"Core ML ({compute_units})"
        else:
            from instaflow_edge.runtimes.mil_interpreter import load_program

            self.model = load_program(path)
            self.tensors = {
                name: (tuple(d if isinstance(d, int) else None for d in shape), dtype.name)
                for name, (shape, dtype) in {**self.model.inputs, **self.model.outputs}.items()
            }
            self.inputs = {name: dtype for name, (_, dtype) in self.model.inputs.items()}
            self.executed_on = INTERPRETER

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        typed = {name: np.asarray(feeds[name]).astype(dtype) for name, dtype in self.inputs.items()}
        outputs = self.model.predict(typed) if self.device else self.model.run(typed)
        return {name: np.asarray(value) for name, value in outputs.items()}


def _feature_tensor(feature) -> GraphTensor:
    """A Core ML model description's multiarray feature as (shape, dtype); a package saved
    without shapes (outputs often are) says None."""
    kinds = {65568: "float32", 65552: "float16", 131104: "int32", 65600: "float64"}
    array = feature.type.multiArrayType
    return (tuple(array.shape) or None, kinds.get(array.dataType))


class CoreMLSession(BundleSession):
    """One predictor per package; packages take batch 1, so a batch runs one sample at a time."""

    runtime = "coreml"

    def __init__(
        self, bundle: Path, manifest: Manifest, options: CoreMLOptions, compute_units: str
    ):
        self.compute_units = compute_units
        self.attach_bundle(bundle, manifest, options)
        self.load_graphs()
        self.executed_on = next(iter(self.loaded.values())).executed_on

    def load_graph(self, component: str, path: Path) -> _Predictor:
        return _Predictor(path, self.compute_units, device=on_macos())

    def infer(self, component: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.graph(component)(inputs)

    def graph_tensors(self, component: str, graph: _Predictor) -> dict[str, GraphTensor]:
        return graph.tensors


class CoreMLRuntime(Runtime):
    """Core ML bundles: `device` "cpu"/"coreml" runs Core ML where it exists (macOS), the MIL
    interpreter elsewhere; "coreml-device" (or option require_device) insists on Core ML."""

    name = "coreml"
    target = "coreml"
    options = CoreMLOptions

    def open(
        self, bundle: Path, manifest: Manifest, device: str, options: CoreMLOptions
    ) -> Session:
        if device not in DEVICE_NAMES:
            raise UserError(f"unknown Core ML device {device!r}; use {', '.join(DEVICE_NAMES)}")
        if (device == "coreml-device" or options.require_device) and not on_macos():
            raise RuntimeUnavailable(
                f"Core ML prediction runs only on macOS, not on {platform.system()}: "
                "use device 'cpu' for the MIL interpreter's parity check instead"
            )
        recorded = manifest.details.get("options", {}).get("compute_units") or "ALL"
        return CoreMLSession(bundle, manifest, options, options.compute_units or recorded)

    def why_not_timed(self, device: str) -> str | None:
        if on_macos():
            return None
        return (
            f"Core ML predicts only on macOS: on {platform.system()} its bundles run through the "
            "MIL interpreter (numpy), whose latency is not a device's"
        )
