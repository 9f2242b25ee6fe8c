"""Exporters: one module per target (ONNX, Core ML, OpenVINO) behind the `Exporter` contract.

Modules load lazily; adding a target is adding its module and one line in EXPORTERS.
"""

from __future__ import annotations

from importlib import import_module

from instaflow_edge.errors import UserError

# target -> "module:class"
EXPORTERS: dict[str, str] = {
    "onnx": "instaflow_edge.export.onnx:OnnxExporter",
    "openvino": "instaflow_edge.export.openvino:OpenVinoExporter",
    "coreml": "instaflow_edge.export.coreml:CoreMLExporter",
}

__all__ = ["EXPORTERS", "get_exporter"]


def get_exporter(target: str):
    """The Exporter for `target`, or one clear error naming the known targets."""
    if target not in EXPORTERS:
        known = ", ".join(sorted(EXPORTERS)) or "none yet"
        raise UserError(f"unknown target {target!r}; known targets: {known}")
    module_name, class_name = EXPORTERS[target].split(":")
    return getattr(import_module(module_name), class_name)()
