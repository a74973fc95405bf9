"""Deduplication: exact copies (re-spaced, re-cased) and near copies (MinHash LSH), Korean and English."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from orchestration.data.config import DedupConfig
from orchestration.data.dedup import Deduplicator, MinHasher, lsh_bands
from orchestration.data.fingerprint import normalize
from tests.conftest import quickstart_english, quickstart_korean

KO = (
    "청와대 국민청원 게시판에 올라온 글입니다. 현재 사범대학과 교육대학의 예비교사들이 임용절벽으로 매우 힘들어하고 있으며, "
    "정부는 기간제 교사의 정규직 전환이 임용 절벽과는 무관하다고 주장하지만 학생 수가 줄어드는 상황에서 설득력이 없습니다."
)
EN = (
    "The Prime Minister has denied he knew AWB was paying kickbacks to Iraq despite writing to the wheat exporter "
    "asking to be kept fully informed on Iraq wheat sales, letters released by the Cole inquiry show."
)


def check(texts: list[str], config: DedupConfig | None = None) -> list[str | None]:
    return Deduplicator(config or DedupConfig()).check([normalize(t) for t in texts])


def test_exact_duplicates_ignore_spacing_case_and_punctuation():
    texts = [
        KO,
        KO.replace(" ", "  ").replace(".", "!"),
        EN,
        EN.upper().replace(",", ""),
        "something else entirely",
    ]
    assert check(texts) == [None, "exact", None, "exact", None]


def test_near_duplicates_with_a_few_edits_are_dropped_first_one_kept():
    ko_edit = KO.replace("매우 힘들어하고", "무척 힘들어하고").replace(
        "설득력이 없습니다", "설득력이 없어요"
    )
    en_edit = EN.replace("has denied", "denied").replace("show", "showed")
    assert check([KO, EN, ko_edit, en_edit]) == [None, None, "near", "near"]


def test_different_documents_are_kept():
    docs = quickstart_korean(3000)[:2000] + quickstart_english()[:500]
    docs = [
        d for d in docs if len(normalize(d)) >= 40
    ]  # long enough for shingles to mean something
    reasons = check(docs)
    assert reasons.count("near") <= len(docs) // 200  # real reviews/lines: near copies are rare


def test_switches():
    texts = [KO, KO + " 감사합니다"]
    assert check(texts, DedupConfig(near=False)) == [None, None]
    assert check([KO, KO], DedupConfig(exact=False)) == [None, "near"]
    assert check([KO, KO], DedupConfig(exact=False, near=False)) == [None, None]


def test_batches_remember_earlier_batches():
    dedup = Deduplicator(DedupConfig())
    assert dedup.check([normalize(KO)]) == [None]
    assert dedup.check([normalize(EN), normalize(KO.replace("매우", "무척"))]) == [None, "near"]


def test_lsh_bands_agree_with_datasketch():
    lsh = pytest.importorskip("datasketch.lsh")
    for threshold, num_perm in [(0.8, 128), (0.5, 64), (0.9, 256)]:
        assert lsh_bands(threshold, num_perm) == lsh._optimal_param(threshold, num_perm, 0.5, 0.5)


def test_minhash_estimates_jaccard():
    hasher = MinHasher(num_perm=256, shingle_chars=5, seed=1)
    rng = np.random.default_rng(0)
    base = normalize(KO + EN)
    for cut in (5, 30, 80):
        other = base[:cut] + "".join(rng.choice(list("가나다라abc"), size=40)) + base[cut + 40 :]
        a = {base[i : i + 5] for i in range(len(base) - 4)}
        b = {other[i : i + 5] for i in range(len(other) - 4)}
        sig, has = hasher.signatures([base, other])
        assert has.all()
        assert np.mean(sig[0] == sig[1]) == pytest.approx(len(a & b) / len(a | b), abs=0.1)


def test_short_texts_have_no_signature_and_only_exact_applies():
    _, has = MinHasher().signatures(["abcd", "abcdefgh", ""])
    assert has.tolist() == [False, True, False]
    assert check(["짧은 글", "짧은 글"], dataclasses.replace(DedupConfig(), exact=False)) == [
        None,
        None,
    ]
