"""Strict building of the config dataclasses from TOML tables (see config.py).

Nested tables and arrays of tables become their dataclasses, TOML integers become floats where a
float is wanted, any other type mismatch, unknown key or impossible value is a `ConfigError` that
names the key path (`filters.length.min_chars`).
"""

from __future__ import annotations

import dataclasses
import types
import typing

from orchestration.data.config import (
    SCRIPTS,
    BenchmarkConfig,
    DecontaminateConfig,
    DedupConfig,
    DigitRule,
    LengthRule,
    PrepareConfig,
    RepeatedLinesRule,
    RepeatedNgramsRule,
    ScriptRule,
    ShardConfig,
    SourceConfig,
    SymbolRule,
    WordLengthRule,
)
from hanyeong.errors import ConfigError
from orchestration.core.spec import _build


def build(cls, data: object, where: str):
    """A `cls` from a TOML table: nested tables and arrays of tables built, types checked."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    converted = {
        k: _convert(hints[k], v, f"{where}.{k}") if k in hints else v for k, v in data.items()
    }
    obj = _build(cls, converted, where)  # refuses unknown and missing keys, naming them
    _check_values(obj, where)
    return obj


def _convert(hint, value, where: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be an array, got {type(value).__name__}")
        return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        return _convert(next(a for a in args if a is not type(None)), value, where)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise ConfigError(f"{where} must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def _check_values(obj, where: str) -> None:
    checks = _CHECKS.get(type(obj), ())
    for name, ok, what in checks:
        if not ok(getattr(obj, name)):
            raise ConfigError(f"{where}.{name} must be {what}, got {getattr(obj, name)!r}")
    if isinstance(obj, LengthRule) and obj.min_chars > obj.max_chars:
        raise ConfigError(
            f"{where}: min_chars ({obj.min_chars}) is above max_chars ({obj.max_chars})"
        )
    if isinstance(obj, WordLengthRule) and obj.min_mean_chars > min(
        obj.max_mean_chars, obj.max_mean_chars_ko
    ):
        raise ConfigError(f"{where}: min_mean_chars is above max_mean_chars")
    if isinstance(obj, ScriptRule):
        unknown = sorted(set(obj.scripts) - set(SCRIPTS))
        if unknown:
            raise ConfigError(
                f"{where}.scripts: unknown {', '.join(unknown)}; known: {', '.join(SCRIPTS)}"
            )
    if isinstance(obj, (PrepareConfig, DecontaminateConfig)):
        items = obj.sources if isinstance(obj, PrepareConfig) else obj.benchmarks
        names = [item.name for item in items]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigError(f"{where}: the name {twice[0]!r} is used twice")
    if isinstance(obj, RepeatedNgramsRule) and (
        len(obj.max_top_ngram_chars) > 3 or len(obj.max_duplicate_ngram_chars) > 6
    ):
        raise ConfigError(
            f"{where}: give at most 3 top-n-gram (n=2..4) and 6 duplicate-n-gram (n=5..10) limits"
        )


_share = (lambda x: 0.0 <= x <= 1.0, "a share between 0 and 1")
_positive = (lambda x: x > 0, "positive")
_CHECKS = {
    LengthRule: [("min_chars", lambda x: x >= 0, "0 or more"), ("max_chars", *_positive)],
    WordLengthRule: [
        ("min_mean_chars", lambda x: x >= 0, "0 or more"),
        ("max_mean_chars", *_positive),
        ("max_mean_chars_ko", *_positive),
    ],
    SymbolRule: [("max_ratio", *_share)],
    DigitRule: [("max_ratio", *_share)],
    ScriptRule: [("min_ratio", *_share)],
    RepeatedLinesRule: [("max_duplicate_lines", *_share), ("max_duplicate_line_chars", *_share)],
    RepeatedNgramsRule: [
        ("min_words", lambda x: x >= 0, "0 or more"),
        ("max_top_ngram_chars", lambda xs: all(0 <= x <= 1 for x in xs), "shares between 0 and 1"),
        (
            "max_duplicate_ngram_chars",
            lambda xs: all(0 <= x <= 1 for x in xs),
            "shares between 0 and 1",
        ),
    ],
    DedupConfig: [
        ("threshold", lambda x: 0 < x <= 1, "in (0, 1]"),
        ("shingle_chars", *_positive),
        ("num_perm", lambda x: 2 <= x <= 1024, "between 2 and 1024"),
    ],
    DecontaminateConfig: [
        ("window_chars", lambda x: x >= 8, "at least 8"),
        ("short_item_min_chars", lambda x: x >= 0, "0 or more"),
    ],
    BenchmarkConfig: [("name", bool, "a non-empty name"), ("files", bool, "a non-empty list")],
    SourceConfig: [("name", bool, "a non-empty name"), ("paths", bool, "a non-empty list")],
    ShardConfig: [
        # list<int32> offsets: a shard must stay under 2^31 tokens
        ("text_bytes_per_shard", lambda x: 0 < x <= 2_000_000_000, "between 1 and 2e9"),
        ("documents_per_shard", *_positive),
        (
            "compression",
            lambda x: x in ("zstd", "snappy", "gzip", "none"),
            "zstd, snappy, gzip or none",
        ),
    ],
}
