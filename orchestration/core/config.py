"""Strict TOML table -> config dataclass, shared by the recipe's tables (STYLE rule 6).

An unknown key, a missing key, a wrong type or a value the dataclass refuses is a `ConfigError`
naming the key path (`stage[1].optim.lr must be positive`). Nested dataclass fields are built from
their sub-tables the same way; arrays become tuples, TOML integers become floats where a float is
wanted.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path

from hanyeong.errors import ConfigError


def check_type(hint, value, where: str):
    """`value` as the type `hint` asks (int -> float allowed; arrays -> tuples), else ConfigError."""
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else build_table(hint, value, where)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return check_type(next(a for a in args if a is not type(None)), value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be an array, got {type(value).__name__} {value!r}")
        return tuple(check_type(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and type(value) is not hint:
        raise ConfigError(f"{where} must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def build_table(cls, table: object, where: str, alias: str | None = None, **builders):
    """A `cls` from a TOML table: unknown or missing keys, wrong types and the class's own checks
    are ConfigErrors naming the key path. `builders[key](value, path)` builds nested tables;
    `alias` is how the class's own messages name it (e.g. 'optim'), replaced by `where`."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table, got {type(table).__name__} {table!r}")
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(table) - set(hints))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(hints)}"
        )
    values = {k: builders[k](v, f"{where}.{k}") if k in builders else check_type(hints[k], v, f"{where}.{k}")
              for k, v in table.items()}  # fmt: skip
    missing = [
        f.name
        for f in fields(cls)
        if f.name not in values and f.default is MISSING and f.default_factory is MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {', '.join(missing)}")
    try:
        return cls(**values)
    except ConfigError as err:
        raise ConfigError(rename(str(err), where, alias, set(hints))) from None


def rename(message: str, where: str, alias: str | None = None, keys: set[str] = frozenset()) -> str:
    """A check's message with its key path made the caller's: 'lr must...' -> 'stage[0].optim.lr
    must...' when it starts with one of `keys`, else 'stage[0].optim: ...'."""
    if message.startswith(where):
        return message
    if alias and message.startswith(alias):
        return where + message[len(alias) :]
    first = re.split(r"[\s.\[:(]", message, maxsplit=1)[0]
    return f"{where}.{message}" if first in keys else f"{where}: {message}"


def positive_int(value, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def plain(value):
    """Tuples as lists, recursively: the shape TOML and JSON give back."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def read_toml(path: str | Path, what: str = "config") -> dict:
    """The tables of a TOML file; a missing or malformed file is one ConfigError naming it."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such {what} file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None
