"""Runtimes: one module per runtime behind the `Runtime` contract, named by a bundle's manifest.

A bundle's manifest names the module of this package that runs it (`"runtime": "onnxruntime"`);
that module defines one `Runtime` subclass. Adding a runtime is adding its module, nothing else.
Modules load lazily, so that importing this package pulls in neither torch nor any runtime.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from instaflow_edge import discovery
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
    return discovery.module_names(sys.modules[__name__], SUPPORT_MODULES)


def get_runtime(name: str) -> Runtime:
    """The Runtime defined by module `name` of this package, or one clear error."""
    package = sys.modules[__name__]
    if not discovery.is_module(package, name, SUPPORT_MODULES):
        raise UserError(f"no runtime named {name!r}; known: {', '.join(runtime_names())}")
    module = discovery.load_module(package, name)
    return discovery.defined_class(module, Runtime, "name", name)()


def load_session(
    bundle: Path, device: str = "cpu", options: RuntimeOptions | dict | None = None, **settings: Any
) -> Session:
    """Load any bundle with the runtime its manifest names (files checked against sha256 first)."""
    runtime = get_runtime(read_manifest(bundle).runtime)
    return runtime.load(Path(bundle), device, options, **settings)
