"""What every config shares: the error type, the value checks and the YAML converter.

Every error names the field, the value it got and what would be valid, so that a bad recipe fails
before any process starts. ``from_dict`` builds a config tree from plain dicts (YAML), rejecting
unknown keys with the list of known ones and values of the wrong type with the field's path.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import (
    Any,
    Literal,
    NoReturn,
    TypeGuard,
    TypeVar,
    get_args,
    get_origin,
    get_type_hints,
)


class ConfigError(ValueError):
    """A config value that cannot work; the message says which field and what to change."""


def fail(path: str, value: Any, allowed: str) -> NoReturn:
    """Raise the ConfigError of field ``path`` holding ``value``: '``path``=value is invalid:
    ``allowed``'."""
    raise ConfigError(f"{path}={value!r} is invalid: {allowed}")


def is_int(value: Any) -> TypeGuard[int]:
    """An integer, and not a bool (YAML's ``true`` is an int to Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> TypeGuard[int | float]:
    """An int or a float, and not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_choice(path: str, value: Any, choices: Any) -> None:
    """``value`` must be one of the Literal type ``choices`` (or a tuple of values)."""
    allowed = get_args(choices) or tuple(choices)
    if value not in allowed:
        fail(path, value, f"must be one of {allowed}")


def check_flags(config: Any, path: str, names: tuple[str, ...]) -> None:
    """Each field of ``names`` must be a real bool (YAML's 'yes' is a string)."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, bool):
            fail(f"{path}.{name}", value, "must be true or false")


def check_int(path: str, value: Any, minimum: int, allowed: str | None = None) -> None:
    """``value`` must be an integer >= ``minimum`` (``allowed``: the message instead)."""
    if not is_int(value) or value < minimum:
        fail(path, value, allowed or f"must be an integer >= {minimum}")


# ---------------------------------------------------------------------------------------------
# dicts (YAML) -> dataclasses

T = TypeVar("T")


def _convert_union(tp: Any, value: Any, path: str) -> Any:
    options = get_args(tp)
    if value is None and type(None) in options:
        return None
    errors = []
    for option in options:
        if option is type(None):
            continue
        try:
            return _convert(option, value, path)
        except ConfigError as e:
            errors.append(str(e))
    raise ConfigError(errors[0] if errors else f"{path}: cannot be {value!r}")


def _convert_scalar(tp: Any, value: Any, path: str) -> Any:
    if tp is bool and not isinstance(value, bool):
        fail(path, value, "must be true or false")
    if tp is int and not is_int(value):
        fail(path, value, "must be an integer")
    if tp is str and not isinstance(value, str):
        fail(path, value, "must be a string")
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if not is_number(value):
            fail(path, value, "must be a number")
        if not math.isfinite(value):  # YAML reads .nan / .inf; no setting here means them
            fail(path, value, "must be a finite number")
        return float(value)
    return value


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _convert_union(tp, value, path)
    if origin is Literal:
        check_choice(path, value, tp)
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            fail(path, value, f"must be a mapping of {tp.__name__} fields")
        return from_dict(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            fail(path, value, "must be a list")
        (item,) = get_args(tp)[:1] or (Any,)
        return [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is Any:
        return value
    return _convert_scalar(tp, value, path)


def from_dict(cls: type[T], data: dict[str, Any], path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]  # (T: a dataclass)
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else key
        if key not in names:
            raise ConfigError(f"unknown key '{full}'; known keys here: {', '.join(names)}")
        kwargs[key] = _convert(hints[key], value, full)
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """The inverse of :func:`from_dict` (nested plain dicts)."""
    return dataclasses.asdict(config)
