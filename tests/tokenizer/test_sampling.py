"""Sampling: deterministic, order-independent, and holding the Korean share and byte budget."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hanyeong.errors import ConfigError
from tokenizer.language import detect_language
from tokenizer.sampling import SampleConfig, byte_targets, capped_total, draw_sample, water_level


def test_detect_language():
    assert detect_language("오늘 날씨가 좋네요") == "ko"
    assert detect_language("The weather is nice today") == "en"
    assert detect_language("AI 모델을 학습합니다") == "ko"  # a few English terms stay Korean
    assert detect_language("12345 !!!") == "other"


@given(
    ko=st.integers(0, 10**9),
    rest=st.integers(0, 10**9),
    share=st.none() | st.floats(0, 1),
    budget=st.none() | st.integers(1, 10**9),
)
def test_byte_targets_respect_availability_share_and_budget(ko, rest, share, budget):
    t = byte_targets({"ko": ko, "rest": rest}, share, budget)
    assert t["ko"] <= ko and t["rest"] <= rest
    if budget:
        assert t["ko"] + t["rest"] <= budget
    total = t["ko"] + t["rest"]
    if share is not None and ko and rest and total > 1000:
        assert abs(t["ko"] / total - share) < 1e-3
        # ...and it is the largest such sample: one side is exhausted or the budget is spent.
        assert ko - t["ko"] <= 2 or rest - t["rest"] <= 2 or (budget and total >= budget - 2)


def corpus(n=400):
    rng = random.Random(1)
    ko = [f"한국어 문서 {i} " + "가나다" * rng.randint(1, 30) for i in range(n)]
    en = [f"english document {i} " + "abc " * rng.randint(1, 30) for i in range(n // 2)]
    return ko + en + ko[:50]  # 50 exact duplicates


def test_sample_is_deterministic_and_independent_of_document_order():
    docs = corpus()
    config = SampleConfig(ko_share=0.6, seed=3)
    a = draw_sample(docs, config)
    shuffled = docs[:]
    random.Random(0).shuffle(shuffled)
    b = draw_sample(shuffled, config)
    assert sorted(a.train) == sorted(b.train)
    assert draw_sample(docs, SampleConfig(ko_share=0.6, seed=4)).train != a.train


def test_share_dedup_and_holdout_are_reported():
    sample = draw_sample(corpus(), SampleConfig(ko_share=0.6, holdout_fraction=0.05))
    stats = sample.stats
    assert stats.duplicates["ko"] == 50
    assert abs(stats.ko_share - 0.6) < 0.02
    assert set(sample.heldout) <= {"ko", "en"} and sample.heldout
    # Nothing lost silently: every unique document is trained on, held out or left out by balance.
    unique = sum(stats.read_docs.values()) - sum(stats.duplicates.values())
    held = sum(len(v) for v in sample.heldout.values())
    assert len(sample.train) + held + sum(stats.not_sampled_docs.values()) == unique
    assert not set(sample.train) & {d for v in sample.heldout.values() for d in v}


def test_budget_caps_training_bytes():
    docs = corpus()
    sample = draw_sample(docs, SampleConfig(max_bytes=5000))
    largest = max(len(d.encode()) for d in docs)
    assert sum(sample.stats.train.values()) <= 5000 + 2 * largest  # a document may cross the line on each side


def test_one_sided_corpus_keeps_its_own_mix():
    sample = draw_sample([f"한국어만 {i}" for i in range(100)], SampleConfig(ko_share=0.8))
    assert len(sample.train) > 90 and not sample.stats.share_applied


@given(sizes=st.lists(st.integers(1, 400), min_size=1, max_size=6), cap=st.sampled_from([0.1, 0.25, 0.5, 1.0]))
def test_capped_total_is_the_largest_total_no_source_exceeds_the_cap_in(sizes, cap):
    def holds(total):  # every source can give min(size, cap*total) and together they reach total
        c = max(cap, 1 / len(sizes))
        return sum(min(s, c * total) for s in sizes) >= total - 1e-9

    best = max(t for t in range(sum(sizes) + 1) if holds(t))
    assert abs(capped_total(sizes, cap) - best) <= 1
    assert capped_total(sizes, None) == sum(sizes)


@given(sizes=st.lists(st.integers(1, 400), min_size=1, max_size=6), fraction=st.floats(0, 1))
def test_water_level_fills_the_target(sizes, fraction):
    target = int(sum(sizes) * fraction)
    level = water_level(sizes, target)
    assert abs(sum(min(s, level) for s in sizes) - target) < 1e-6 or level == float("inf")


@given(cap=st.sampled_from([0.2, 0.3, 0.5]), big=st.integers(4, 20), seed=st.integers(0, 3))
def test_no_source_dominates_its_side(cap, big, seed):
    """The law the cap exists for: a source gets at most `cap` of its side's bytes (plus one
    document's overshoot), however large it is, and nothing is lost from the accounting."""
    rng = random.Random(seed)
    docs, sources = [], []
    for source, count in (("law", 40 * big), ("news", 40), ("essays", 30), ("reviews", 25), ("web", 20)):
        for i in range(count):
            docs.append(f"{source} 한국어 문서 {i} " + "가나다" * rng.randint(5, 15))
            sources.append(source)
    config = SampleConfig(ko_share=None, source_cap=cap, cap_floor=0, holdout_fraction=0.0, seed=seed)
    sample = draw_sample(docs, config, sources)
    rows = sample.stats.sources
    side = sum(r["train"] for r in rows.values())
    largest_doc = max(len(d.encode()) for d in docs)
    for row in rows.values():
        assert row["train"] <= cap * side + largest_doc
    assert sum(r["read"] for r in rows.values()) == sum(sample.stats.read.values())
    # Without the cap the biggest source keeps its natural (dominant) share.
    free = draw_sample(docs, SampleConfig(ko_share=None, source_cap=None, holdout_fraction=0.0), sources).stats.sources
    assert free["law (ko)"]["train"] / sum(r["train"] for r in free.values()) > 0.5


def test_the_cap_never_cuts_a_small_side_below_its_floor():
    docs = [f"큰 말뭉치 문서 {i} " + "가나다" * 20 for i in range(500)] + [f"작은 문서 {i}" for i in range(20)]
    sources = ["big"] * 500 + ["small"] * 20
    config = SampleConfig(ko_share=None, source_cap=0.25, holdout_fraction=0.0)
    assert len(draw_sample(docs, config, sources).train) == 520  # under the 50 MB floor: everything
    capped = draw_sample(docs, SampleConfig(ko_share=None, source_cap=0.25, cap_floor=0, holdout_fraction=0.0), sources)
    assert len(capped.train) < 100


@pytest.mark.parametrize(
    "kwargs", [{"ko_share": 1.5}, {"max_bytes": 0}, {"holdout_fraction": 1.0}, {"source_cap": 0.0}, {"source_cap": 1.5}]
)
def test_bad_settings_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        SampleConfig(**kwargs)
