"""Kiwi morpheme boundaries: the cut rule, the cache, and the marks the trainer sees."""

from __future__ import annotations

import pytest

from hanyeong.errors import ConfigError
from tokenizer.morphemes import BOUNDARY, MorphemeCache, MorphemeMarker, boundaries, count_runs, parse_categories
from tokenizer.pipeline import training_pre_tokenizer


def test_parse_categories_accepts_tag_prefixes_and_kiwipiepy_names():
    assert parse_categories("E") == ("E",)
    assert parse_categories("j, e") == ("E", "J")
    assert parse_categories(["xsv", "JK"]) == ("JK", "XSA", "XSV")
    with pytest.raises(ConfigError, match="unknown morpheme category 'Q'"):
        parse_categories("Q")


# 먹었습니다 = 먹/VV 었/EP 습니다/EF; 학교에서는 = 학교/NNG 에서/JKB 는/JX; 된 = 되/VV ㄴ/ETM (one syllable)
EATEN = ((0, "VV"), (1, "EP"), (2, "EF"))
SCHOOL = ((0, "NNG"), (2, "JKB"), (4, "JX"))
BECAME = ((0, "VV"), (0, "ETM"))


def test_cut_where_the_category_changes_only():
    assert boundaries(EATEN, 5, ("E",)) == [1]  # 먹|었습니다: the ending chain stays whole
    assert boundaries(SCHOOL, 5, ("J",)) == [2]  # 학교|에서는
    assert boundaries(SCHOOL, 5, ("JK", "JX")) == [2, 4]  # finer categories cut finer
    assert boundaries(SCHOOL, 5, ("E",)) == []
    assert boundaries(BECAME, 1, ("E",)) == []  # never inside a syllable


def test_marker_marks_only_selected_boundaries():
    cache = MorphemeCache(None)
    cache.analyses = {"먹었습니다": EATEN, "학교에서는": SCHOOL}
    marker = MorphemeMarker(cache, ("E",))
    text = f"학교에서는 밥을 먹었습니다{BOUNDARY}."
    assert marker.mark(text) == f"학교에서는 밥을 먹{BOUNDARY}었습니다."


def test_marker_leaves_runs_in_whole_uncut():
    cache = MorphemeCache(None)
    cache.analyses = {"먹었습니다": EATEN, "학교에서는": SCHOOL}
    marker = MorphemeMarker(cache, ("E", "J"), whole=frozenset({"먹었습니다"}))
    assert marker.mark("학교에서는 먹었습니다") == f"학교{BOUNDARY}에서는 먹었습니다"


def test_training_pre_tokenizer_cuts_and_drops_the_marks():
    pieces = [p for p, _ in training_pre_tokenizer().pre_tokenize_str(f" 먹{BOUNDARY}었습니다")]
    joined = "".join(pieces)
    assert len(pieces) == 2 and BOUNDARY.encode() not in joined.encode()


def test_real_kiwi_and_the_cache_round_trip(tmp_path):
    runs = count_runs(["먹었습니다 먹었습니다 학교에서는", "가"])
    assert runs == {"먹었습니다": 2, "학교에서는": 1}  # single syllables are never candidates
    cache = MorphemeCache(tmp_path / "kiwi.parquet")
    assert cache.analyse(runs) == 2
    cache.save()
    again = MorphemeCache(tmp_path / "kiwi.parquet")
    assert again.analyses == cache.analyses and again.analyse(runs) == 0
    marker = MorphemeMarker(again, ("E",))
    assert marker.marked["먹었습니다"] == f"먹{BOUNDARY}었습니다"


def test_damaged_cache_is_ignored_with_a_warning(tmp_path, capsys):
    (tmp_path / "kiwi.parquet").write_bytes(b"not parquet")
    assert MorphemeCache(tmp_path / "kiwi.parquet").analyses == {}
    assert "ignoring unreadable morpheme cache" in capsys.readouterr().err
