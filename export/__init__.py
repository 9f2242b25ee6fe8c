"""Exporters: one module per target (ONNX, Core ML, OpenVINO) behind the `Exporter` contract.

The target `T` is the module `instaflow_edge.export.T`, which defines one `Exporter` subclass
whose `target` is `T`; adding a target is adding its module (and its runtime's), nothing else.
Modules load lazily: listing the targets imports none of them.
"""

from __future__ import annotations

import pkgutil
from importlib import import_module, util

from instaflow_edge.errors import UserError

SUPPORT_MODULES = frozenset({"base"})  # modules of this package that are not targets

__all__ = ["get_exporter", "target_names"]


def target_names() -> list[str]:
    """Every target: the modules of this package (a module added to its path counts too)."""
    return sorted(
        module.name
        for module in pkgutil.iter_modules(__path__)
        if module.name not in SUPPORT_MODULES and not module.name.startswith("_")
    )


def get_exporter(target: str):
    """The Exporter for `target`, or one clear error naming the known targets."""
    if (
        not isinstance(target, str)
        or not target.isidentifier()
        or target in SUPPORT_MODULES
        or util.find_spec(f"{__name__}.{target}") is None
    ):
        raise UserError(f"unknown target {target!r}; known targets: {', '.join(target_names())}")
    try:
        module = import_module(f"{__name__}.{target}")
    except ImportError as error:
        raise UserError(
            f"target {target} needs {error.name or 'a package'} installed: "
            "pip install 'instaflow-edge[full]'"
        ) from error
    from instaflow_edge.export.base import Exporter

    found = [
        value
        for value in vars(module).values()
        if isinstance(value, type)
        and issubclass(value, Exporter)
        and value.__module__ == module.__name__
        and getattr(value, "target", None) == target
    ]
    if len(found) != 1:
        raise UserError(f"module {module.__name__} defines no exporter for target {target!r}")
    return found[0]()
