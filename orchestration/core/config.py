"""The one builder from a TOML/JSON table to a config dataclass (STYLE rule 6): `build(cls, data, where)`.

Every config of the project is a frozen dataclass that maps 1:1 onto a table: the model spec, the
optimizer, the recipe's tables and stages, the loader's mixture, the prepare and chat configs. They
are all built here, one way:

1. The table's keys against the fields: an unknown or a missing key is an error naming them.
2. Each value against its field's type hint: TOML integers become floats where a float is wanted,
   arrays become tuples, nested tables and arrays of tables become their dataclasses (a class with
   its own `from_dict(data, where)` builds itself that way, for a table that does not map 1:1
   such as `[run.tokenizer]`; any other is built by `build`).
3. The class itself, whose `__post_init__` checks the values.

ONE VALIDATION STYLE. A config dataclass checks its values in `__post_init__` and raises a
`ConfigError` whose message starts with the field it is about, as a key path relative to its table:
'lr must be positive, got -1', 'replay: fractions sum to 1.2; ...', 'sources[0].weight ...'. The
builder knows where the table sits and prefixes that key path when it catches the error
('optim.lr must be positive, got -1'); no message is read back or rewritten. A caller that knows
more (a stage's number and name, a file) puts it in front: "stage 1 'general': optim.lr ...".
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path

from hanyeong.errors import ConfigError


def build(cls, data: object, where: str = ""):
    """A `cls` from a table: unknown or missing keys, wrong types and the class's own checks are
    one ConfigError whose message starts with the key path (`where`, the table's; '' the root)."""
    if not isinstance(data, dict):
        got = f"{type(data).__name__} {data!r}"
        raise ConfigError(f"{where or 'the config'} must be a table, got {got}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls) if f.init]
    unknown = sorted(set(data) - set(names))
    if unknown:
        listed = ", ".join(map(str, unknown))
        raise ConfigError(at(where, f"unknown key(s) {listed}; known: {', '.join(names)}"))
    missing = [f.name for f in fields(cls)
               if f.init and f.name not in data and f.default is MISSING and f.default_factory is MISSING]  # fmt: skip
    if missing:
        raise ConfigError(at(where, f"missing key(s) {', '.join(missing)}"))
    values = {k: convert(hints[k], v, key(where, k)) for k, v in data.items()}
    try:
        return cls(**values)
    except ConfigError as err:  # the class's own check: its message starts with the field
        raise ConfigError(key(where, str(err))) from None


def convert(hint, value, where: str):
    """`value` as the type `hint` asks for, or a ConfigError naming `where`."""
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        from_dict = getattr(hint, "from_dict", None)
        return from_dict(value, where) if from_dict is not None else build(hint, value, where)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return convert(options[0], value, where)
        for option in options:  # e.g. int | str: the first that takes the value
            try:
                return convert(option, value, where)
            except ConfigError:
                continue
        names = " or ".join(getattr(a, "__name__", str(a)) for a in options)
        raise ConfigError(f"{where} must be {names}, got {type(value).__name__} {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be an array, got {type(value).__name__} {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        elif len(args) != len(value):
            got = f"{len(value)} {list(value)!r}"
            raise ConfigError(f"{where} must be an array of {len(args)}, got {got}")
        return tuple(convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table, got {type(value).__name__} {value!r}")
        return {k: convert(args[1], v, key(where, k)) for k, v in value.items()} if args else value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and type(value) is not hint:
        raise ConfigError(f"{where} must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def key(where: str, rest: str) -> str:
    """A key path inside `where`: key('stage.optim', 'lr') -> 'stage.optim.lr' ('' is the root)."""
    return f"{where}.{rest}" if where else rest


def at(where: str, message: str) -> str:
    """A message about the table at `where` itself: 'run.tokenizer: ...' ('' is the root)."""
    return f"{where}: {message}" if where else message


def to_table(obj) -> dict:
    """A config dataclass as its table: nested dataclasses as tables, tuples as lists, and None
    values of fields that default to None left out (TOML has no null).
    `build(cls, to_table(x)) == x`."""
    out = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if value is None and f.default is None:
            continue
        out[f.name] = to_table(value) if dataclasses.is_dataclass(value) else plain(value)
    return out


def positive_int(value, name: str) -> None:
    """ConfigError '<name> must be a positive integer' unless `value` is one (bools are not)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def plain(value):
    """Tuples as lists, recursively: the shape TOML and JSON give back."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_table(value)
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
