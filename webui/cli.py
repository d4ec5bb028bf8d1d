"""Command-line flags generated from the config dataclasses, so a setting is declared once."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Type, TypeVar

T = TypeVar("T")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(tp: Any) -> Any:
    """Optional[int] -> int."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) is typing.Union and len(args) == 1 else tp


def add_flags(parser: argparse.ArgumentParser, cls: Type[Any], title: str) -> None:
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = _base_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        if kind is bool:
            group.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        if default is not None:
            help_text += f" (default: {default})"
        group.add_argument(
            _flag(f.name),
            type=kind,
            choices=f.metadata.get("choices"),
            default=None,
            metavar=f.name.upper() if not f.metadata.get("choices") else None,
            help=help_text,
        )


def from_args(cls: Type[T], args: argparse.Namespace) -> T:
    """Build the dataclass from parsed flags; flags not given keep the field's default."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}
    return cls(**given)


def non_defaults(config: Any, secret_fields: tuple[str, ...] = ("token",)) -> dict[str, Any]:
    """Settings that differ from their defaults, secrets redacted, for the start-up log."""
    fresh = type(config)()
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value != getattr(fresh, f.name):
            out[f.name] = "***" if f.name in secret_fields and value else value
    return out
