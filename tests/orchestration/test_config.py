"""The one config builder (orchestration/core/config.py): keys, types, nested tables, the classes'
own checks, all one ConfigError whose message starts with the key path; to_table round-trips."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hanyeong.errors import ConfigError
from orchestration.core.config import build, to_table


@dataclass(frozen=True)
class Inner:
    size: int
    share: float = 0.5

    def __post_init__(self) -> None:
        if not 0 <= self.share <= 1:
            raise ConfigError(f"share must be in [0, 1], got {self.share}")


@dataclass(frozen=True)
class Custom:
    """A table that does not map 1:1: built by its own from_dict."""

    words: tuple[str, ...]

    @classmethod
    def from_dict(cls, data, where):
        return cls(tuple(str(data).split()))


@dataclass(frozen=True)
class Outer:
    name: str
    inner: Inner = field(default_factory=lambda: Inner(1))
    items: tuple[Inner, ...] = ()
    pair: tuple[float, float] = (0.0, 1.0)
    limit: int | None = None
    custom: Custom | None = None

    def __post_init__(self) -> None:
        if len(self.items) > 3:
            raise ConfigError(f"items: at most 3, got {len(self.items)}")


def test_a_table_becomes_its_dataclass():
    outer = build(Outer, {"name": "a", "inner": {"size": 2, "share": 1}, "items": [{"size": 3}],
                          "pair": [1, 2], "custom": "x y"})  # fmt: skip
    assert outer == Outer("a", Inner(2, 1.0), (Inner(3),), (1.0, 2.0), None, Custom(("x", "y")))
    assert isinstance(outer.inner.share, float) and isinstance(outer.pair, tuple)


@pytest.mark.parametrize("table, message", [
    ({"name": "a", "nmae": 1}, r"^top: unknown key\(s\) nmae; known: name, inner, items, pair, limit, custom$"),
    ({}, r"^top: missing key\(s\) name$"),
    ({"name": 1}, r"^top.name must be str, got int 1$"),
    ({"name": "a", "limit": True}, r"^top.limit must be int, got bool True$"),
    ({"name": "a", "inner": 3}, r"^top.inner must be a table, got int 3$"),
    ({"name": "a", "inner": {"size": 1, "share": 2}}, r"^top.inner.share must be in \[0, 1\], got 2.0$"),
    ({"name": "a", "items": [{"size": 1}, {"size": "2"}]}, r"^top.items\[1\].size must be int, got str '2'$"),
    ({"name": "a", "items": {"size": 1}}, r"^top.items must be an array, got dict"),
    ({"name": "a", "items": [{"size": 1}] * 4}, r"^top.items: at most 3, got 4$"),
    ({"name": "a", "pair": [1]}, r"^top.pair must be an array of 2, got 1 \[1\]$"),
])  # fmt: skip
def test_every_mistake_names_its_key_path(table, message):
    with pytest.raises(ConfigError, match=message):
        build(Outer, table, "top")


def test_at_the_root_the_path_is_the_key():
    with pytest.raises(ConfigError, match=r"^inner.share must be"):
        build(Outer, {"name": "a", "inner": {"size": 1, "share": -1}})
    with pytest.raises(ConfigError, match=r"^unknown key\(s\) x"):
        build(Outer, {"name": "a", "x": 1})


@given(st.builds(Outer, name=st.text(min_size=1), inner=st.builds(Inner, st.integers(), st.floats(0, 1)),
                 items=st.lists(st.builds(Inner, st.integers()), max_size=3).map(tuple),
                 limit=st.one_of(st.none(), st.integers())))  # fmt: skip
def test_to_table_round_trips(outer):
    table = to_table(outer)
    assert "limit" not in table or outer.limit is not None  # TOML has no null
    assert build(Outer, table) == outer
