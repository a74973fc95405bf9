"""Quality filters on Korean and English examples; the numpy statistics against naive counts."""

from __future__ import annotations

import dataclasses
import unicodedata
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestration.data.config import FilterConfig, LengthRule, RepeatedNgramsRule
from orchestration.data.filters import (
    DIGIT,
    LETTER,
    PROSE,
    SPACE,
    SYMBOL,
    char_stats,
    ngram_fractions,
    quality_reasons,
)

GOOD_KO = "오늘은 날씨가 맑아서 가족과 함께 한강 공원에 가서 자전거를 탔습니다. 저녁에는 근처 식당에서 비빔밥을 먹었어요."
GOOD_EN = "It was a bright cold day in April, and the clocks were striking thirteen. Winston Smith slipped quickly home."


def reason(
    text: str, config: FilterConfig | None = None, language: str | None = None
) -> str | None:
    return quality_reasons(
        [text], config or FilterConfig(), None if language is None else [language]
    )[0]


def test_good_documents_pass():
    assert quality_reasons([GOOD_KO, GOOD_EN], FilterConfig(), ["ko", "en"]) == [None, None]


@pytest.mark.parametrize(
    "text, language, rule",
    [
        ("짧다", "ko", "length"),
        ("Too short", "en", "length"),
        ("가 나 다 라 마 바 사 아 자 차 카 타 파 하", "ko", "word_length"),
        (
            "aaaaaaaaaaaaaaaaaaaaaaaaa bbbbbbbbbbbbbbbbbbbbbbbbbbbbb http://example.com/a/very/long/path",
            "en",
            "word_length",
        ),
        ("별 백개주고싶다 ★★★★☆☆☆☆♡♡♡♡ ♥♥♥", "ko", "symbols"),
        ("### $$$ @@@ *** ||| hello world ###", "en", "symbols"),
        ("연락처 010 3227 2293 02 555 1234 1588 0000", "ko", "digits"),
        ("2014 2015 2016 2017 2018 2019 total 12345", "en", "digits"),
        ("Привет, как дела? Это длинный текст на русском языке.", "other", "script"),
        ("今日は天気がいいので、公園に散歩に行きました。", "other", "script"),
    ],
)
def test_each_rule_drops_its_example(text, language, rule):
    assert reason(text, language=language) == rule


def test_korean_without_spaces_has_its_own_word_length_bound():
    unspaced = "볼만하긴한데다보고나면좀찜찜한느낌이네요"  # 19 syllables, one eojeol
    assert reason(unspaced, language="ko") is None
    assert reason(unspaced, language="en") == "word_length"  # the general bound (12) applies


def test_prose_punctuation_is_not_junk():
    assert (
        reason('"Why, I know it, Tom." "Who?" said Huck... "No--not now!"', language="en") is None
    )
    assert reason("정말 재밌었던 기억... 다시 보고 싶네요~~ (진짜로!)", language="ko") is None


def test_repeated_lines_and_ngrams():
    lines = "\n".join(["구독과 좋아요 부탁드립니다"] * 6 + ["오늘의 영상은 여기까지입니다"])
    assert reason(lines, language="ko") == "repeated_lines"
    spam = " ".join(["buy cheap watches now"] * 20)
    assert reason(spam, language="en") == "repeated_ngrams"
    korean_spam = " ".join(["지금 바로 클릭하세요 최저가 보장"] * 15)
    assert reason(korean_spam, language="ko") == "repeated_ngrams"
    varied = " ".join(GOOD_EN.split() * 1)  # 20 distinct words: below min_words, not judged
    assert reason(varied, language="en") is None


def test_rules_switch_off_and_first_failure_wins():
    text = "love ★★★★ ♥♥♥♥"
    assert reason(text) == "length"
    off = dataclasses.replace(FilterConfig(), length=LengthRule(enabled=False))
    assert reason(text, off) == "symbols"
    assert reason("... !!! ??? ... !!! ???") == "script"  # not a letter in it
    every_rule_off = FilterConfig(
        **{
            f.name: dataclasses.replace(getattr(FilterConfig(), f.name), enabled=False)
            for f in dataclasses.fields(FilterConfig)
        }
    )
    assert reason(text, every_rule_off) is None


def naive_classes(text: str) -> Counter:
    out = Counter()
    for ch in text:
        cat = unicodedata.category(ch)
        if ch.isspace():
            out[SPACE] += 1
        elif cat == "Nd":
            out[DIGIT] += 1
        elif cat[0] in "PS":
            out["punct"] += 1
        elif "\uac00" <= ch <= "\ud7a3":
            out[LETTER["hangul"]] += 1
        elif ch.isascii() and ch.isalpha():
            out[LETTER["latin"]] += 1
    return out


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.text(alphabet="가나다 abcXYZ 0123.,!#★\n\t한", max_size=40), min_size=1, max_size=5)
)
def test_char_stats_match_naive_counts(texts):
    chars, words, counts = char_stats(texts)
    for i, text in enumerate(texts):
        naive = naive_classes(text)
        assert chars[i] == len(text)
        assert words[i] == len(text.split())
        for cls in (SPACE, DIGIT, LETTER["hangul"], LETTER["latin"]):
            assert counts[i, cls] == naive[cls]
        assert counts[i, PROSE] + counts[i, SYMBOL] == naive["punct"]


def naive_ngram_fractions(words: list[str]) -> tuple[list[float], list[float]]:
    total = max(sum(map(len, words)), 1)
    top, dup = [], []
    for n in range(2, 5):
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        count = max(grams.values(), default=0)
        chars = max((sum(map(len, g)) for g, c in grams.items() if c == count), default=0)
        top.append(chars * count / total if count > 1 else 0.0)
    for n in range(5, 11):
        seen, covered = set(), [False] * len(words)
        for i in range(len(words) - n + 1):
            gram = tuple(words[i : i + n])
            if gram in seen:
                covered[i : i + n] = [True] * n
            seen.add(gram)
        dup.append(sum(len(w) for w, c in zip(words, covered) if c) / total)
    return top, dup


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.sampled_from(["가", "나다", "라마바", "a", "bc", "def"]), min_size=0, max_size=60)
)
def test_ngram_fractions_match_naive(words):
    docs = [words, words[::2], words[:7], words[1:]]  # a batch: n-grams never run across documents
    top, dup = ngram_fractions(docs)
    for i, doc in enumerate(docs):
        naive_top, naive_dup = naive_ngram_fractions(doc)
        assert top[i].tolist() == pytest.approx(naive_top) and dup[i].tolist() == pytest.approx(
            naive_dup
        )


def test_ngram_rule_thresholds_are_tunable():
    spam = " ".join(["buy cheap watches now"] * 20)
    lenient = dataclasses.replace(
        FilterConfig(),
        repeated_ngrams=RepeatedNgramsRule(
            max_top_ngram_chars=(1.0, 1.0, 1.0), max_duplicate_ngram_chars=(1.0,) * 6
        ),
    )
    assert reason(spam, lenient, "en") is None
