"""Decontamination: planted benchmark items are caught however they are re-spaced, re-cased or
re-punctuated; clean text is not; hash collisions never drop a document."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestration.data import fingerprint
from orchestration.data.config import PrepareConfig, load_config
from orchestration.data.decontaminate import Decontaminator, build_index
from orchestration.data.fingerprint import normalize
from hanyeong.errors import ConfigError
from tests.conftest import (
    REPO,
    SHARED_DATA,
    needs_shared_data,
    quickstart_english,
    quickstart_korean,
)
from tests.orchestration.data.support import ITEMS, write_benchmark


def toy_index(tmp_path, items=ITEMS, **overrides):
    table = {**write_benchmark(tmp_path / "bench", items), **overrides}
    return build_index(PrepareConfig.from_dict({"decontaminate": table}).decontaminate)


def removed(index, docs: list[str]) -> list[str | None]:
    return [m and m.benchmark for m in Decontaminator(index).check([normalize(d) for d in docs])]


def respace(text: str) -> str:
    return re.sub(r"\s+", "   ", text).replace("다.", "다 .").replace("?", " ?")


def repunctuate(text: str) -> str:
    return text.replace(",", ";").replace(".", "!").replace("?", "...").replace(" ", " - ", 3)


@pytest.fixture(scope="module")
def clean_docs():
    return quickstart_korean(3000) + quickstart_english("pride_and_prejudice")[:2000]


def test_planted_items_are_removed_in_every_disguise(tmp_path, clean_docs):
    index = toy_index(tmp_path)
    planted = []
    for item, disguise in zip(ITEMS * 4, [str, respace, str.upper, repunctuate] * len(ITEMS)):
        planted.append(
            f"{clean_docs[len(planted)]} {disguise(item)} {clean_docs[-1 - len(planted)]}"
        )
    assert removed(index, planted) == ["toy"] * len(planted)
    assert removed(index, clean_docs) == [None] * len(clean_docs)


def raw_span(item: str, start: int, length: int) -> str:
    """The stretch of `item` as written (spaces, punctuation) whose normalized form is
    normalize(item)[start : start + length]; the ITEMS normalize one character at a time."""
    kept = [i for i, c in enumerate(item) if normalize(c)]
    assert "".join(item[i] for i in kept).casefold() == normalize(item)
    return item[kept[start] : kept[start + length - 1] + 1]


@st.composite
def pieces(draw):
    """(item, raw piece): any stretch of >= 50 normalized characters of an item, drawn directly,
    so no case is thrown away; ends of the item (first and last window) are drawn as often as any."""
    item = draw(st.sampled_from(ITEMS))
    size = len(normalize(item))
    length = draw(st.integers(50, min(140, size)))
    anchor = draw(st.sampled_from(["head", "tail", "inside"]))
    start = {"head": 0, "tail": size - length}.get(anchor) or draw(st.integers(0, size - length))
    return item, raw_span(item, start, length)


@settings(max_examples=150, deadline=None)
@given(
    drawn=pieces(),
    before=st.text(alphabet="가나다라 abcXYZ.,!?\n", max_size=80),
    after=st.text(alphabet="마바사 defUVW;:-\t", max_size=80),
    upper=st.booleans(),
)
def test_any_50_char_substring_planted_anywhere_is_caught(tmp_path_factory, drawn, before, after, upper):
    _, piece = drawn
    index = _cached_toy_index(tmp_path_factory)
    doc = before + (piece.upper() if upper else piece) + after
    assert removed(index, [doc]) == ["toy"]


@pytest.mark.parametrize("end", ["first", "last"])
def test_an_items_first_or_last_window_alone_is_caught_at_either_end_of_a_document(tmp_path, end):
    """Exactly one 50-character window of each item, planted at the start, middle and end of a
    document: every window of an item is indexed, the first and the last included, and every
    window of a document is checked, its first and last included."""
    index = toy_index(tmp_path)
    docs, expected = [], []
    for item in ITEMS:
        size = len(normalize(item))
        window = raw_span(item, 0 if end == "first" else size - 50, 50)
        assert len(normalize(window)) == 50
        docs += [window, f"{window} 그리고 나머지 글", f"앞의 글 {window}", f"앞 {window} 뒤"]
        expected += ["toy"] * 4
        one_short = raw_span(item, 0 if end == "first" else size - 49, 49)  # 49 characters: no window
        docs.append(f"앞 {one_short} 뒤")
        expected.append(None)
    assert removed(index, docs) == expected


def test_the_index_holds_each_distinct_window_of_each_item_once_and_counts_what_it_read(tmp_path):
    # the fifth item repeats its windows; the last is short
    items = [*ITEMS, "가나다라마바사" * 12, "오늘 날씨"]
    index = toy_index(tmp_path, items=items)
    W, norms = 50, [normalize(t) for t in items]
    long = [n for n in norms if len(n) >= W]
    pairs = {(n[i : i + W], k) for k, n in enumerate(long) for i in range(len(n) - W + 1)}
    assert index.item_texts == long and index.item_benchmark == [0] * len(long)
    assert len(index.hashes) == len(index.owners) == len(pairs) < sum(len(n) - W + 1 for n in long)
    assert sorted(index.owners.tolist()) == sorted(k for _, k in pairs)
    assert list(index.hashes) == sorted(index.hashes)
    assert index.stats == {"toy": {"files": 1, "items": 6, "items_with_windows": 5, "short_items_matched_whole": 0,
                                   "windows": sum(len(n) - W + 1 for n in long)}}  # fmt: skip
    # memory as reported (decontaminate_corpus's index_bytes): the arrays, and the texts as UCS-4
    text_bytes = 4 * sum(map(len, long))
    assert index.nbytes == index.hashes.nbytes + index.owners.nbytes + index.bitmap.nbytes + text_bytes
    checker = Decontaminator(index)
    checker.check([normalize(ITEMS[0]), "깨끗한 글"])
    checker.check([normalize(items[4])])
    assert checker.checked == 3 and dict(checker.removed) == {"toy": 2}


def test_each_benchmark_counts_its_own_items(tmp_path):
    shorts = ["오늘 날씨는 정말 맑아요", "What is the capital of France"]
    write_benchmark(tmp_path / "b", [*ITEMS[:2], shorts[0]], name="first")
    write_benchmark(tmp_path / "b", [*ITEMS[2:], shorts[1], "hi"], name="second")
    benchmarks = [{"name": n, "files": [f"{n}.jsonl"], "fields": ["question"]} for n in ("first", "second")]
    table = {"root": str(tmp_path / "b"), "benchmarks": benchmarks, "short_item_min_chars": 5}
    index = build_index(PrepareConfig.from_dict({"decontaminate": table}).decontaminate)
    windows = [sum(len(normalize(t)) - 49 for t in items) for items in (ITEMS[:2], ITEMS[2:])]
    assert index.stats == {
        "first": {"files": 1, "items": 3, "items_with_windows": 2, "short_items_matched_whole": 1, "windows": windows[0]},
        "second": {"files": 1, "items": 4, "items_with_windows": 2, "short_items_matched_whole": 1, "windows": windows[1]},
    }  # fmt: skip
    assert removed(index, shorts + ["hi"]) == ["first", "second", None]  # "hi": under 5 characters


def test_results_do_not_depend_on_the_bitmap_screen(tmp_path, monkeypatch, clean_docs):
    """Hashes that all share their top bits pass every window through the bitmap to the binary
    search; a window whose hash lies past every benchmark hash is a miss, not an error."""
    real = fingerprint.window_hashes
    monkeypatch.setattr(
        fingerprint, "window_hashes", lambda codes, width: real(codes, width) | np.uint64(0xFFFFF << 44)
    )
    index = toy_index(tmp_path)
    docs = clean_docs[:300] + [f"앞 {respace(item)} 뒤" for item in ITEMS]
    assert removed(index, docs) == [None] * 300 + ["toy"] * len(ITEMS)


def test_items_exactly_a_window_long_and_short_items_exactly_the_minimum(tmp_path):
    exact = ITEMS[2][: len(raw_span(ITEMS[2], 0, 50))]  # 50 normalized characters
    short = "오늘 날씨는 정말 맑아요"  # 10 normalized characters
    assert (len(normalize(exact)), len(normalize(short))) == (50, 10)
    index = toy_index(tmp_path / "a", items=[exact, short], short_item_min_chars=10)
    assert index.item_texts == [normalize(exact)] and index.short == {normalize(short): 0}
    assert removed(index, [f"앞 {exact} 뒤", short]) == ["toy", "toy"]
    match = Decontaminator(index).check([normalize(short)])[0]
    assert (match.item, match.window) == (-1, normalize(short))  # a whole short item: no item index
    # short_item_min_chars = 0 (the default): short items are not matched at all
    index = toy_index(tmp_path / "b", items=[exact, short])
    assert index.short == {} and removed(index, [short]) == [None]


def test_benchmark_files_missing_or_matching_nothing_are_config_errors(tmp_path):
    table = write_benchmark(tmp_path / "bench")
    nested = tmp_path / "bench" / "a" / "b"
    nested.mkdir(parents=True)
    (tmp_path / "bench" / "toy.jsonl").rename(nested / "toy.jsonl")
    for files, error in [(["**/*.jsonl"], None), (["a/b/toy.jsonl"], None), (["toy.jsonl"], "no such file"),
                         (["**/*.parquet"], "no such file")]:  # fmt: skip
        config = {**table, "benchmarks": [{**table["benchmarks"][0], "files": files}]}
        build = lambda: build_index(PrepareConfig.from_dict({"decontaminate": config}).decontaminate)  # noqa: E731
        if error is None:
            assert build().stats["toy"]["items"] == len(ITEMS), files  # ** reaches every depth
        else:
            with pytest.raises(ConfigError, match=f"decontaminate.benchmarks 'toy': .*: {error}"):
                build()


_INDEX = {}


def _cached_toy_index(factory):
    if "toy" not in _INDEX:
        _INDEX["toy"] = toy_index(factory.mktemp("toy"))
    return _INDEX["toy"]


def test_short_windows_do_not_match_and_short_items_only_whole(tmp_path):
    index = toy_index(
        tmp_path,
        items=[*ITEMS, "오늘 날씨는 정말 맑고 화창합니다 산책 가요"],
        short_item_min_chars=15,
    )
    assert removed(index, [ITEMS[0][:45]]) == [None]  # 49 characters of an item: no 50-char window
    assert removed(index, ["오늘 날씨는, 정말 맑고 화창합니다! 산책 가요."]) == [
        "toy"
    ]  # the whole short item
    assert removed(
        index, ["오늘 날씨는 정말 맑고 화창합니다 산책 가요. 그리고 영화도 봤어요."]
    ) == [None]


def test_hash_collisions_are_confirmed_by_comparing_strings(tmp_path, monkeypatch, clean_docs):
    real = fingerprint.window_hashes
    monkeypatch.setattr(
        fingerprint, "window_hashes", lambda codes, width: real(codes, width) % np.uint64(5)
    )
    index = toy_index(tmp_path)  # every window collides with a fifth of all benchmark windows
    assert len(np.unique(index.hashes)) <= 5
    docs = clean_docs[:200] + [f"앞 {repunctuate(item)} 뒤" for item in ITEMS]
    assert removed(index, docs) == [None] * 200 + ["toy"] * len(ITEMS)


def test_first_benchmark_in_config_order_is_credited(tmp_path):
    write_benchmark(tmp_path / "b", ITEMS[:2], name="first")
    write_benchmark(tmp_path / "b", ITEMS[1:], name="second")
    config = PrepareConfig.from_dict(
        {
            "decontaminate": {
                "root": str(tmp_path / "b"),
                "benchmarks": [
                    {"name": "first", "files": ["first.jsonl"], "fields": ["question"]},
                    {"name": "second", "files": ["second.jsonl"], "fields": ["question"]},
                ],
            }
        }
    )
    checker = Decontaminator(build_index(config.decontaminate))
    matches = checker.check([normalize(ITEMS[1]), normalize(ITEMS[3]), normalize(ITEMS[0])])
    assert [m.benchmark for m in matches] == ["first", "second", "first"]
    assert dict(checker.removed) == {"first": 2, "second": 1}


# ---- the shared benchmarks and corpora -----------------------------------------------------------


@pytest.fixture(scope="module")
def shared_index():
    return build_index(load_config(REPO / "recipes" / "prepare-shared.toml").decontaminate)


@needs_shared_data
def test_shared_recipe_reads_every_benchmark(shared_index):
    stats = shared_index.stats
    assert {
        "gsm8k",
        "kobest-boolq",
        "komt-bench",
        "mt-bench",
        "click",
        "kmmlu",
        "kobbq",
        "humaneval",
        "truthfulqa",
        "alpaca-eval",
        "vicuna-bench",
        "korean-safety",
    } <= set(stats)
    assert all(s["items"] > 0 for s in stats.values())
    assert stats["gsm8k"]["items"] == 2 * 2 * 1319  # test + test_socratic, question + answer


@needs_shared_data
def test_every_shared_benchmark_item_planted_is_caught(shared_index):
    rng = np.random.default_rng(0)
    picks = [rng.integers(len(shared_index.item_texts)) for _ in range(300)]
    docs = [
        f"오늘의 글입니다. {_unnormalize(shared_index.item_texts[i], rng)} 이상입니다."
        for i in picks
    ]
    found = Decontaminator(shared_index).check([normalize(d) for d in docs])
    assert all(m is not None for m in found)


def _unnormalize(text: str, rng) -> str:
    """Re-space and re-case a normalized item: what a scraped copy might look like."""
    cuts = sorted(rng.choice(len(text), size=min(len(text) // 7, 20), replace=False).tolist())
    parts = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    return ", ".join(p.upper() if i % 2 else p for i, p in enumerate(parts))


# True overlaps of the shared corpora with the shared benchmarks (50-character normalized windows):
# a Supreme Court formula on proof beyond reasonable doubt quoted by two petitions and by KMMLU
# ("유죄의 인정은 법관으로 하여금 합리적인 의심을 할 여지가 없을 정도로 ..."), and the list of planets
# ("Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus and Neptune") in an ABC news story and in
# TruthfulQA, and two Korean Wikipedia passages (La La Land; BTS's 2010 audition) that are both
# KorQuAD contexts and KoBEST BoolQ test passages. (Instruction and code corpora under sft/ share code such as fibonacci and is_prime with
# HumanEval, MT-Bench and AlpacaEval; those are not pretraining text and are not sampled here.)
KNOWN_OVERLAPS = {
    "ko/petitions/petitions_2019-05.jsonl.gz": {"kmmlu": 2},
    "ko/korquad/KorQuAD_v1.0_dev.json.gz": {"kobest-boolq": 2},
    "en/nltk/abc.jsonl.gz": {"truthfulqa": 1},
}
SAMPLE = {
    "ko/nsmc/nsmc_raw_reviews.subset.jsonl.gz": ("review", 60_000),
    "ko/petitions/petitions_2019-05.jsonl.gz": ("content", None),
    "ko/petitions/petitions_2017-08.jsonl.gz": ("content", None),
    "ko/korquad/KorQuAD_v1.0_dev.json.gz": ("data.paragraphs.context", None),
    "en/nltk/abc.jsonl.gz": ("text", None),
    "en/nltk/inaugural.jsonl.gz": ("text", None),
    "en/wikitext-2/test.txt.gz": (None, None),
    "en/gutenberg/moby_dick.txt.gz": (None, None),
}


@needs_shared_data
def test_no_false_positives_on_shared_corpora_beyond_known_overlaps(shared_index):
    from pathlib import Path

    from tokenizer.corpus import TextFields, read_file

    for name, (fields, limit) in SAMPLE.items():
        docs, _ = read_file(
            Path(SHARED_DATA / name), TextFields.parse([fields] if fields else None)
        )
        checker = Decontaminator(shared_index)
        checker.check([normalize(d) for d in docs[:limit]])
        assert dict(checker.removed) == KNOWN_OVERLAPS.get(name, {}), name


@needs_shared_data
def test_gsm8k_copy_in_a_web_page_is_caught(shared_index):
    with open(SHARED_DATA / "benchmarks" / "gsm8k" / "test.jsonl", encoding="utf-8") as f:
        problem = json.loads(f.readline())["question"]
    page = (
        f"Homework help!! Q1) {problem.replace(' ', '  ').lower()} Thanks in advance -- posted 2021"
    )
    assert [m.benchmark for m in Decontaminator(shared_index).check([normalize(page)])] == ["gsm8k"]


def test_standalone_run_keeps_text_unchanged_even_a_lone_surrogate(tmp_path):
    from orchestration.data.decontaminate_corpus import decontaminate_corpus

    config = PrepareConfig.from_dict({"decontaminate": write_benchmark(tmp_path / "bench")})
    (tmp_path / "in").mkdir()
    docs = [
        {"text": "깨진 글자 \ud800 하나"},
        {"text": f"앞 {ITEMS[2].lower()} 뒤"},
        {"text": "  spaced  \n"},
    ]
    (tmp_path / "in" / "web.jsonl").write_text(
        "".join(json.dumps(d) + "\n" for d in docs)
    )  # \ud800 escaped
    report = decontaminate_corpus([str(tmp_path / "in")], config.decontaminate, tmp_path / "out")
    assert report["documents"] == {"read": 3, "kept": 2, "removed": {"toy": 1}}
    lines = (tmp_path / "out" / "documents" / "web.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["text"] for line in lines] == [docs[0]["text"], docs[2]["text"]]
