"""Runtimes: one module per runtime behind the `Runtime` contract, named by a bundle's manifest.

A bundle's manifest names the module of this package that runs it (`"runtime": "onnxruntime"`);
that module defines one `Runtime` subclass. Adding a runtime is adding its module, nothing else.
Modules load lazily, so that importing this package pulls in neither torch nor any runtime.
"""

from __future__ import annotations

import pkgutil
from importlib import import_module, util
from pathlib import Path
from typing import Any

from instaflow_edge.errors import UserError
from instaflow_edge.manifest import read_manifest
from instaflow_edge.runtimes.base import Runtime, RuntimeOptions, RuntimeUnavailable, Session

# modules of this package that are not runtimes
SUPPORT_MODULES = frozenset({"base", "mil_interpreter"})

__all__ = [
    "Runtime",
    "RuntimeOptions",
    "RuntimeUnavailable",
    "Session",
    "get_runtime",
    "load_session",
    "runtime_names",
]


def runtime_names() -> list[str]:
    """The runtime modules of this package (a module added to its path counts too)."""
    return sorted(
        module.name
        for module in pkgutil.iter_modules(__path__)
        if module.name not in SUPPORT_MODULES and not module.name.startswith("_")
    )


def get_runtime(name: str) -> Runtime:
    """The Runtime defined by module `name` of this package, or one clear error."""
    if (
        not isinstance(name, str)
        or not name.isidentifier()
        or name in SUPPORT_MODULES
        or util.find_spec(f"{__name__}.{name}") is None
    ):
        raise UserError(f"no runtime named {name!r}; known: {', '.join(runtime_names())}")
    module = import_module(f"{__name__}.{name}")
    found = [
        value
        for value in vars(module).values()
        if isinstance(value, type)
        and issubclass(value, Runtime)
        and value.__module__ == module.__name__
        and getattr(value, "name", None) == name
    ]
    if len(found) != 1:
        raise UserError(f"module {module.__name__} defines no runtime named {name!r}")
    return found[0]()


def load_session(
    bundle: Path, device: str = "cpu", options: RuntimeOptions | dict | None = None, **settings: Any
) -> Session:
    """Load any bundle with the runtime its manifest names (files checked against sha256 first)."""
    return get_runtime(read_manifest(bundle).runtime).load(
        Path(bundle), device, options, **settings
    )
