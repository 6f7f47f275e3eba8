"""Small helpers shared by every frozen kw_only config dataclass in `hyphae.training`.

Configs are plain frozen dataclasses (STYLE.md §6). These helpers keep their `__post_init__`
checks one line each and give every config the same strict `from_dict`: an unknown key is an
error that names the known ones, so a typo in a TOML file never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Build the config dataclass `cls` from a mapping, rejecting unknown keys.

    Args:
        cls: a dataclass type (a frozen kw_only config).
        data: field name -> value. Lists are turned into tuples for tuple-typed fields so that
            configs read from TOML/JSON compare equal to those built in code.

    Returns:
        The config; its `__post_init__` has validated the values.

    Raises:
        ValueError: a key is not a field of `cls` (the message lists the valid keys).
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown {cls.__name__} key(s) {unknown}; valid keys are {sorted(fields)}"
        )
    values = {}
    for key, value in data.items():
        nested = _nested_config_type(fields[key])
        if nested is not None and isinstance(value, Mapping):
            value = from_dict(nested, value)
        elif isinstance(value, list):
            value = tuple(value)
        values[key] = value
    return cls(**values)


def _nested_config_type(f: dataclasses.Field) -> type | None:
    """The dataclass type of a field whose default is itself a config, else None."""
    default = f.default
    if default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    return type(default) if dataclasses.is_dataclass(default) else None


def to_dict(config: Any) -> dict[str, Any]:
    """The config as a plain dict (tuples become lists) that `from_dict` reads back."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    """Raise ValueError unless `value` > 0 (or >= 0 when `allow_zero`)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value!r}")


def check_int(name: str, value: int, *, minimum: int) -> None:
    """Raise ValueError unless `value` is an int >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_range(name: str, value: float, low: float, high: float) -> None:
    """Raise ValueError unless low <= value <= high."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value!r}")


def check_choice(name: str, value: object, choices: tuple[object, ...]) -> None:
    """Raise ValueError unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
