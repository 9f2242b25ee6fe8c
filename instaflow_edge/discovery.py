"""Finding targets and runtimes by module name: how `export/` and `runtimes/` grow by one file.

A package's plug-in modules are its modules minus the support modules it names; the class a
name stands for is the one subclass of `base` defined in that module whose `key` attribute is
the name. Nothing is imported until a name is asked for. Standard library only.
"""

from __future__ import annotations

import pkgutil
from collections.abc import Iterable
from importlib import import_module, util
from types import ModuleType

from instaflow_edge.errors import UserError


def module_names(package: ModuleType, support: Iterable[str]) -> list[str]:
    """The plug-in modules of `package` (a module added to its `__path__` counts too)."""
    return sorted(
        module.name
        for module in pkgutil.iter_modules(package.__path__)
        if module.name not in set(support) and not module.name.startswith("_")
    )


def is_module(package: ModuleType, name: object, support: Iterable[str]) -> bool:
    """Whether `name` (from a user or a manifest) is one of the package's plug-in modules."""
    return (
        isinstance(name, str)
        and name.isidentifier()
        and name not in set(support)
        and util.find_spec(f"{package.__name__}.{name}") is not None
    )


def defined_class(module: ModuleType, base: type, key: str, name: str) -> type:
    """The one subclass of `base` that `module` defines with `key` == `name`."""
    found = [
        value
        for value in vars(module).values()
        if isinstance(value, type)
        and issubclass(value, base)
        and value.__module__ == module.__name__
        and getattr(value, key, None) == name
    ]
    if len(found) != 1:
        raise UserError(f"module {module.__name__} defines no {base.__name__} for {name!r}")
    return found[0]


def load_module(package: ModuleType, name: str) -> ModuleType:
    return import_module(f"{package.__name__}.{name}")
