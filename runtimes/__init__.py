"""Runtimes: one module per runtime behind the `Runtime` contract, chosen by a bundle's target.

Modules load lazily, so that importing this package pulls in neither torch nor any runtime.
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path

from instaflow_edge.errors import UserError
from instaflow_edge.manifest import read_manifest
from instaflow_edge.runtimes.base import Runtime, RuntimeUnavailable, Session

# bundle target -> "module:class"; adding a runtime is adding its module and one line here
RUNTIMES = {
    "torch": "instaflow_edge.runtimes.torch_ref:TorchRuntime",
    "openvino": "instaflow_edge.runtimes.openvino:OpenVinoRuntime",
    "onnx": "instaflow_edge.runtimes.onnxruntime:OnnxRuntime",
    "coreml": "instaflow_edge.runtimes.coreml:CoreMLRuntime",
}

__all__ = ["RUNTIMES", "Runtime", "RuntimeUnavailable", "Session", "get_runtime", "load_session"]


def get_runtime(target: str) -> Runtime:
    if target not in RUNTIMES:
        raise UserError(f"no runtime for target {target!r}; known: {', '.join(sorted(RUNTIMES))}")
    module_name, class_name = RUNTIMES[target].split(":")
    return getattr(import_module(module_name), class_name)()


def load_session(bundle: Path, device: str = "cpu", **options) -> Session:
    """Load any bundle with the runtime its manifest's target names."""
    return get_runtime(read_manifest(bundle).target).load(Path(bundle), device, **options)
