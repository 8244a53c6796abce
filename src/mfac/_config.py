"""Typed option sets: one frozen dataclass per method is the single source of its options'
names, types, defaults, bounds and help text.

The library validates a call by building the dataclass (``__post_init__`` checks every field
against its annotation and bounds); the command line derives its flags and YAML keys from the
same fields (:func:`options_of`), and docs/cli.md's option tables are generated from them.
Only the standard library is used here, so every layer can import it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T", bound="Options")


@dataclass(frozen=True)
class Spec:
    """What an option means beyond its type: help text, bounds, choices, CLI exposure."""

    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    cli: bool = True  # a flag / recipe key (False: Python objects such as callables)
    kind: str | None = None  # CLI kind of a field whose Python type is broader (not checked)
    null_words: tuple[str, ...] = ("none", "null")
    short: str | None = None
    required: bool = False

    def bounds(self) -> str:
        """The bounds in words (``in [0, 1)``, ``>= 1``), for help and error messages."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        lo, hi = self.low, self.high
        if lo is None and hi is None:
            return ""
        if hi is None:
            return f"> {lo:g}" if self.low_open else f">= {lo:g}"
        if lo is None:
            return f"< {hi:g}" if self.high_open else f"<= {hi:g}"
        return f"in {'(' if self.low_open else '['}{lo:g}, {hi:g}{')' if self.high_open else ']'}"

    def inside(self, value: float) -> bool:
        """Whether ``value`` satisfies the bounds."""
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (
            value > self.high or (self.high_open and value == self.high)
        )


def option(default: Any, help: str, **spec: Any) -> Any:
    """A dataclass field carrying its :class:`Spec` (keyword arguments of Spec)."""
    return field(default=default, metadata={"spec": Spec(help, **spec)})


@dataclass(frozen=True)
class Option:
    """One field of an option set as the outside sees it."""

    name: str
    kind: str  # "int" | "float" | "bool" | "str" | "choice" | "path" | "list" | "any"
    nullable: bool
    default: Any
    spec: Spec
    checked: bool = True  # False: the API accepts more than the CLI kind (the method checks)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value: Any, where: str | None = None) -> Any:
        """``value`` converted to the field's type, or TypeError/ValueError naming the field."""
        name = where or self.name
        if not self.checked:
            return value
        if value is None:
            if self.nullable:
                return None
            raise ValueError(f"{name} needs a value, got None")
        kind = self.kind
        if kind == "int":
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an integer, got {value!r}")
            value = int(value)
        elif kind == "float":
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name} must be a number, got {value!r}")
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        elif kind == "bool":
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {value!r}")
        elif kind in ("str", "choice"):
            if not isinstance(value, str):
                raise TypeError(f"{name} must be a string, got {value!r}")
            if self.spec.choices and value not in self.spec.choices:
                raise ValueError(f"{name} must be {self.spec.bounds()}, got {value!r}")
        elif kind == "path":
            if not isinstance(value, (str, os.PathLike)):
                raise TypeError(f"{name} must be a path, got {value!r}")
            value = Path(value)
        elif kind == "list":
            if isinstance(value, str) or not isinstance(value, Iterable):
                raise TypeError(f"{name} must be a list of names, got {value!r}")
            value = tuple(str(v) for v in value)
        if kind in ("int", "float") and not self.spec.inside(value):
            raise ValueError(f"{name} must be {self.spec.bounds()}, got {value!r}")
        return value


def _kind(hint: Any, spec: Spec) -> tuple[str, bool, bool]:
    args = typing.get_args(hint)
    nullable = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        nullable = type(None) in args
        rest = [a for a in args if a is not type(None)]
        hint = rest[0] if len(rest) == 1 else Any
    if spec.kind is not None:
        return spec.kind, True, False
    if hint is str:
        return ("choice" if spec.choices else "str"), nullable, True
    simple = {bool: "bool", int: "int", float: "float", Path: "path"}
    if hint in simple:
        return simple[hint], nullable, True
    if typing.get_origin(hint) is tuple and typing.get_args(hint)[:1] == (str,):
        return "list", nullable, True
    return "any", True, False


@functools.cache
def options_of(cls: type) -> tuple[Option, ...]:
    """The options of a dataclass option set, in declaration order (base classes first)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("spec") or Spec("")
        kind, nullable, checked = _kind(hints[f.name], spec)
        out.append(Option(f.name, kind, nullable, f.default, spec, checked))
    return tuple(out)


@dataclass(frozen=True, kw_only=True)
class Options:
    """Base of every option set: fields are validated (and normalised) on construction."""

    def __post_init__(self) -> None:
        for opt in options_of(type(self)):
            object.__setattr__(self, opt.name, opt.check(getattr(self, opt.name)))
        self.validate()

    def validate(self) -> None:
        """Checks that involve several fields (subclasses override)."""

    @classmethod
    def build(cls: type[T], values: Mapping[str, Any], what: str) -> T:
        """``cls(**values)``, refusing unknown names with a TypeError that lists the known."""
        known = [o.name for o in options_of(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise TypeError(f"unknown options for {what}: {unknown}; it takes {known}")
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        """Field name -> value (a shallow copy)."""
        return {o.name: getattr(self, o.name) for o in options_of(type(self))}


def markdown_table(options: Iterable[Option]) -> str:
    """A Markdown table of options (key, type and bounds, default, meaning); cells escape
    ``|`` so that choices such as ``global | layer`` stay inside their column."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for o in options:
        if not o.spec.cli:
            continue
        kind = " | ".join(o.spec.choices) if o.kind == "choice" else o.kind
        bounds = o.spec.bounds() if o.kind != "choice" else ""
        kind += f" ({bounds})" if bounds else ""
        meaning = o.spec.help + (" **required**" if o.spec.required else "")
        cells = [f"`{o.name}`", kind, default_text(o, o.default), meaning]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)


def default_text(o: Option, value: Any) -> str:
    """``value`` as a default of ``o`` reads in help and docs; None is the option's own word for
    it where it has one (``auto``), else ``-``."""
    if value is None and o.spec.null_words[0] not in ("none", "null"):
        return o.spec.null_words[0]
    if value is None or value is dataclasses.MISSING:
        return "-"
    if isinstance(value, tuple):
        return ", ".join(map(str, value)) or "-"
    return f"{value:g}" if isinstance(value, float) else str(value)
