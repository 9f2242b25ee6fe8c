"""Typed options: dataclasses whose fields become command-line flags and `KEY=VALUE` settings.

Exporters, quantizers and runtimes each declare their options as a dataclass derived from
`Options`; a field's metadata carries its help text and, where the values are a closed set, its
choices. The CLI generates its flags from these classes (`add_option_flags`), reads them back into
the chosen target's class (`options_from_args`), and parses `--runtime-option KEY=VALUE` with
`Options.given_values`: adding an option is adding one field. Standard library only.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from instaflow_edge.errors import UserError

T = TypeVar("T", bound="Options")


def option(default: Any, help: str, choices: tuple[Any, ...] | None = None) -> Any:
    """A dataclass field with its help text and, optionally, its allowed values."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclasses.dataclass(frozen=True)
class Options:
    """Base of every options class: construction checks choices and types in one place."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            choices = field.metadata.get("choices")
            if choices is not None and value not in choices and value is not None:
                allowed = ", ".join(str(c) for c in choices)
                raise UserError(f"unknown {field.name} {value!r}; choose one of {allowed}")
            kind = _value_type(self, field)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, field.name, float(value))
            elif value is not None and not isinstance(value, kind):
                raise UserError(f"option {field.name} must be {kind.__name__}, not {value!r}")

    @classmethod
    def keys(cls) -> list[str]:
        return [field.name for field in dataclasses.fields(cls)]

    @classmethod
    def from_mapping(cls: type[T], values: Mapping[str, Any] | None) -> T:
        """From a dict of typed values; an unknown key is a user error naming the known ones."""
        values = dict(values or {})
        unknown = sorted(set(values) - set(cls.keys()))
        if unknown:
            raise UserError(
                f"unknown option {unknown[0]!r} for {cls.describe()}; "
                f"known: {', '.join(cls.keys()) or 'none'}"
            )
        return cls(**values)

    @classmethod
    def coerce(cls: type[T], value: T | Mapping[str, Any] | None, **overrides: Any) -> T:
        """This class from an instance of it, a mapping of its fields or None (the defaults),
        with `overrides` (more fields) on top; another options class is a user error."""
        if value is None or isinstance(value, Mapping):
            return cls.from_mapping({**(value or {}), **overrides})
        if not isinstance(value, cls):
            raise UserError(f"expected {cls.__name__}, got {type(value).__name__}")
        return cls.from_mapping({**value.to_dict(), **overrides}) if overrides else value

    @classmethod
    def given_values(cls, pairs: Iterable[str]) -> dict[str, Any]:
        """The fields `KEY=VALUE` strings give (the command line's --runtime-option), each
        converted to its field's type: ints, floats, booleans (true/false/1/0/yes/no), strings,
        `none` for None; checked, and only those (they go over a bundle's recorded options)."""
        fields = {field.name: field for field in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for pair in pairs:
            key, sep, text = pair.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or not key:
                raise UserError(f"expected KEY=VALUE, not {pair!r}")
            if key not in fields:
                raise UserError(
                    f"unknown option {key!r} for {cls.describe()}; "
                    f"known: {', '.join(fields) or 'none'}"
                )
            values[key] = _convert(text.strip(), _value_type(cls, fields[key]), key)
        cls.from_mapping(values)  # choices and types checked
        return values

    @classmethod
    def describe(cls) -> str:
        return (cls.__doc__ or cls.__name__).strip().splitlines()[0].rstrip(".")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _value_type(owner: Any, field: dataclasses.Field) -> type:
    """The field's type without `| None` (annotations are strings under `from __future__`)."""
    hints = typing.get_type_hints(owner if isinstance(owner, type) else type(owner))
    hint = hints[field.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def _convert(text: str, kind: type, key: str) -> Any:
    if text.lower() == "none":
        return None
    try:
        if kind is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        return kind(text)
    except ValueError:
        raise UserError(f"option {key} expects {kind.__name__}, not {text!r}") from None


# -- the command line ---------------------------------------------------------------------------
def add_option_flags(
    parser: argparse.ArgumentParser, owners: Mapping[str, type[Options]], title: str
) -> None:
    """One flag per field of the option classes of every owner (a target name -> its class).

    A field several targets share becomes one flag; its help says which targets take it. Flags
    default to "not given", so that `options_from_args` can refuse a flag the chosen target lacks.
    """
    group = parser.add_argument_group(title)
    seen: dict[str, tuple[dataclasses.Field, list[str]]] = {}
    for owner, cls in owners.items():
        for field in dataclasses.fields(cls):
            seen.setdefault(field.name, (field, []))[1].append(owner)
    for name, (field, users) in seen.items():
        flag = "--" + name.replace("_", "-")
        kind = _value_type(next(c for o, c in owners.items() if o == users[0]), field)
        help_text = f"{', '.join(users)}: {field.metadata.get('help', '')}"
        if field.default not in (None, False, dataclasses.MISSING):
            help_text += f" (default {field.default})"
        if kind is bool:  # one that is on by default can be turned off: --no-NAME
            action = argparse.BooleanOptionalAction if field.default is True else "store_true"
            group.add_argument(flag, action=action, default=argparse.SUPPRESS, help=help_text)
            continue
        group.add_argument(
            flag,
            type=kind,
            choices=field.metadata.get("choices"),
            default=argparse.SUPPRESS,
            help=help_text,
        )


def options_from_args(
    cls: type[T],
    args: argparse.Namespace,
    owner: str,
    all_keys: Iterable[str],
    defaults: Mapping[str, Any] | None = None,
) -> T:
    """The options `cls` for `owner` from parsed flags over `defaults` (a preset's); a given flag
    it does not take is refused."""
    given = {key: getattr(args, key) for key in all_keys if hasattr(args, key)}
    foreign = sorted(set(given) - set(cls.keys()))
    if foreign:
        raise UserError(f"--{foreign[0].replace('_', '-')} does not apply to {owner}")
    return cls.from_mapping({**(defaults or {}), **given})
