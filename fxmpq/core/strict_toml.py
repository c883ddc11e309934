"""A strict reader of one parsed TOML table: typed values, unknown keys refused, every error naming file and key path.

Used by the hardware schema (fxmpq/hardware/spec.py); errors are HardwareSpecError, the schema's error class."""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from typing import Any, TypeVar

from ..errors import HardwareSpecError, brief

_MISSING = object()


class Table:
    """A view on one TOML table that hands out typed values and rejects unknown keys, naming the key path."""

    def __init__(self, data: Mapping[str, Any], path: str, file: str):
        self.data, self.path, self.file, self.used = data, path, file, set()

    def where(self, key: str | None = None) -> str:
        p = self.path if key is None else (f"{self.path}.{key}" if self.path else key)
        return f"{self.file}: {p or '<top level>'}"

    def fail(self, key: str | None, msg: str) -> HardwareSpecError:
        return HardwareSpecError(f"{self.where(key)}: {msg}")

    def take(self, key: str, types: type | tuple[type, ...], default: Any = _MISSING) -> Any:
        self.used.add(key)
        if key not in self.data:
            if default is _MISSING:
                raise self.fail(key, "missing required field")
            return default
        value = self.data[key]
        if not _isinstance(value, types):
            raise self.fail(key, f"expected {_type_name(types)}, found {_type_name(type(value))} {brief(value)}")
        return value

    def table(self, key: str, default: Any = _MISSING) -> Table:
        value = self.take(key, dict, default)
        sub = self.path + "." + key if self.path else key
        return Table(value, sub, self.file)

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise self.fail(None, f"unknown key(s) {', '.join(map(repr, unknown))}; allowed: "
                            f"{', '.join(sorted(self.used))}")


def _isinstance(value: Any, types: type | tuple[type, ...]) -> bool:
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool):
        return bool in types
    if float in types and isinstance(value, int):
        return True
    return isinstance(value, types)


def _type_name(t: type | tuple[type, ...]) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
             dict: "a table"}
    ts = t if isinstance(t, tuple) else (t,)
    return " or ".join(names.get(x, x.__name__) for x in ts)


def number(t: Table, key: str, default: Any = _MISSING, *, negative: bool = False) -> float:
    """A TOML number as a finite float (non-negative unless `negative`); an integer too large for a float, inf,
    nan or a refused sign is a HardwareSpecError naming the key, like a wrong type."""
    value = t.take(key, float, default)
    expected = f"expected a finite{'' if negative else ' non-negative'} number"
    try:
        x = float(value)
    except OverflowError:
        raise t.fail(key, f"{expected}, found {brief(value)}") from None
    if not math.isfinite(x) or (x < 0 and not negative):
        raise t.fail(key, f"{expected}, found {x!r}")
    return x


E = TypeVar("E", bound=enum.Enum)


def enum_value(t: Table, key: str, cls: type[E], what: str) -> E:
    """The string at `key` as a member of the enum `cls`; HardwareSpecError listing the members otherwise."""
    value = t.take(key, str)
    try:
        return cls(value)
    except ValueError:
        raise t.fail(key, f"unknown {what} {value!r}; expected one of {', '.join(x.value for x in cls)}") from None
