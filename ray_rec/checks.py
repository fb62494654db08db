"""Field checks shared by the settings classes of `ray_rec.config`: types (with the coercions a YAML
file needs), choices and ranges, each error naming the field and the value."""

from __future__ import annotations

import types
import typing
from dataclasses import fields
from typing import Any


def coerce(name: str, value: Any, hint: Any) -> Any:  # noqa: ANN401 (any field type)
    """``value`` as field ``name`` of type ``hint`` holds it, or a ValueError naming both. Numbers
    are not read as booleans nor booleans as numbers; a whole-number float reads as an int; a
    string that spells a number (YAML 1.1 reads ``1e-3`` as one) reads as a float."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(name, value, inner[0]) if len(inner) == 1 else value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{name}={value!r} must be true or false")
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{name}={value!r} must be a whole number")
    if hint is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"{name}={value!r} must be a number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{name}={value!r} must be a string")
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name}={value!r} must be a mapping")
        return {coerce(name, k, args[0]): coerce(f"{name}[{k!r}]", v, args[1]) for k, v in value.items()}
    return value  # other shapes (eval.ks) are checked by their section


def check_types(obj: Any, section: str) -> None:  # noqa: ANN401 (any settings dataclass)
    """Check and coerce every field of a frozen settings dataclass against its annotation."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        value = getattr(obj, f.name)
        coerced = coerce(f"{section}.{f.name}", value, hints[f.name])
        if coerced is not value:
            object.__setattr__(obj, f.name, coerced)


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}")


def check_range(name: str, value: float, low: float, high: float | None = None) -> None:
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name}={value!r} must be {bound}")
