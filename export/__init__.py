"""Exporters: one module per target (ONNX, Core ML, OpenVINO) behind the `Exporter` contract.

The target `T` is the module `instaflow_edge.export.T`, which defines one `Exporter` subclass
whose `target` is `T`; adding a target is adding its module (and its runtime's), nothing else.
Modules load lazily: listing the targets imports none of them.
"""

from __future__ import annotations

import sys

from instaflow_edge import discovery
from instaflow_edge.errors import UserError

SUPPORT_MODULES = frozenset({"base"})  # modules of this package that are not targets

__all__ = ["get_exporter", "target_names"]


def target_names() -> list[str]:
    """Every target: the modules of this package (a module added to its path counts too)."""
    return discovery.module_names(sys.modules[__name__], SUPPORT_MODULES)


def get_exporter(target: str):
    """The Exporter for `target`, or one clear error naming the known targets."""
    package = sys.modules[__name__]
    if not discovery.is_module(package, target, SUPPORT_MODULES):
        raise UserError(f"unknown target {target!r}; known targets: {', '.join(target_names())}")
    try:
        module = discovery.load_module(package, target)
    except ImportError as error:
        raise UserError(
            f"target {target} needs {error.name or 'a package'} installed: "
            "pip install 'instaflow-edge[full]'"
        ) from error
    from instaflow_edge.export.base import Exporter

    return discovery.defined_class(module, Exporter, "target", target)()
