"""Deduplication: exact copies (re-spaced, re-cased) and near copies (MinHash LSH), Korean and English."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestration.data.config import DedupConfig
from orchestration.data.dedup import BUCKET_CAP, Deduplicator, Fingerprints, MinHasher, lsh_bands
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
    # the extremes reach the grid's edges: 0.05 -> one row per band, 0.99 -> one band
    for threshold in (0.05, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99):
        for num_perm in (8, 16, 32, 64, 128, 256):
            if (threshold, num_perm) == (0.99, 256):
                continue  # (1, 167) here, (1, 166) there: 201-point trapezoids against quadrature
            expected = lsh._optimal_param(threshold, num_perm, 0.5, 0.5)
            assert lsh_bands(threshold, num_perm) == expected, (threshold, num_perm)


def test_minhash_permutations_are_seeded_bijections():
    """Each permutation is a bijection of uint32 (a odd, x ^ b invertible): distinct shingles never
    collide; a seed gives one family; the defaults are DedupConfig's."""
    hasher = MinHasher(num_perm=64, seed=3)
    assert (hasher.a % 2 == 1).all() and len(set(hasher.a.tolist())) == 64 and len(set(hasher.b.tolist())) == 64
    x = np.random.default_rng(0).choice(2**32, size=50_000, replace=False).astype(np.uint32)
    values = hasher.permute(x)
    assert values.dtype == np.uint32 and values.shape == (50_000, 64)
    assert all(len(np.unique(values[:, i])) == len(x) for i in range(64))
    again, other = MinHasher(num_perm=64, seed=3), MinHasher(num_perm=64, seed=4)
    assert np.array_equal(again.permute(x[:100]), values[:100]) and not np.array_equal(other.a, hasher.a)
    default, config = MinHasher(), DedupConfig()
    assert (len(default.a), default.shingle_chars) == (config.num_perm, config.shingle_chars)
    assert np.array_equal(default.a, MinHasher(seed=config.seed).a)


def test_a_signature_is_the_minimum_over_the_texts_own_shingles():
    """Computed text by text, apart: shingles straddling two texts of a batch never count, a text's
    last shingle does, and a batch longer than one pass (ROWS_PER_PASS) splits nowhere."""
    from orchestration.data import dedup
    from orchestration.data.fingerprint import codepoints, window_hashes

    hasher = MinHasher(num_perm=32, shingle_chars=5, seed=1)
    texts = [normalize(t) for t in quickstart_korean(400)] + ["abcde", "abcd", "", normalize(KO)]
    texts.append("".join(texts[:400]))  # alone longer than one pass
    assert sum(max(0, len(t) - 4) for t in texts) > dedup.ROWS_PER_PASS
    sig, has = hasher.signatures(texts)
    for i, text in enumerate(texts):
        shingles = (window_hashes(codepoints(text), 5) >> np.uint64(32)).astype(np.uint32)
        assert has[i] == (len(text) >= 5), i
        expected = hasher.permute(shingles).min(axis=0) if len(shingles) else np.full(32, 2**32 - 1, np.uint32)
        assert np.array_equal(sig[i], expected), i


def test_kept_documents_are_remembered_in_every_band_and_counted():
    docs = [normalize(d) for d in quickstart_korean(3000) + quickstart_english()[:600] if len(normalize(d)) >= 40]
    dedup = Deduplicator(DedupConfig())
    reasons = dedup.check(docs)
    assert dedup.n_kept == reasons.count(None) > 1024  # past the first growth of the store
    kept = [d for d, r in zip(docs, reasons) if r is None]
    assert np.array_equal(dedup.kept[: dedup.n_kept], dedup.hasher.signatures(kept)[0])
    for table in dedup.tables:  # band hash -> a kept document, or a list of at most BUCKET_CAP
        for value in table.values():
            members = value if isinstance(value, list) else [value]
            assert all(isinstance(m, int) and 0 <= m < dedup.n_kept for m in members)
            assert len(members) <= BUCKET_CAP
    assert sum(len(v) if isinstance(v, list) else 1 for v in dedup.tables[0].values()) == dedup.n_kept
    assert dedup.check([]) == []


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


def test_the_threshold_is_inclusive_and_a_band_bucket_holds_bucket_cap_documents():
    """Agreeing in exactly threshold x num_perm signature entries is a near duplicate (96 of 128 at
    0.75), one fewer is not; a band hash shared by many kept documents remembers the first BUCKET_CAP."""
    dedup = Deduplicator(DedupConfig(threshold=0.75))
    rng = np.random.default_rng(0)
    keys = [7] * dedup.bands  # every band hash equal: each query meets every kept document
    first = rng.integers(0, 2**32, 128, dtype=np.uint32)
    dedup._remember(first, keys)
    for agreeing, near in ((96, True), (95, False)):
        other = first.copy()
        other[agreeing:] += np.uint32(1)
        assert dedup._near_duplicate(other, keys) is near, agreeing
    for _ in range(3 * BUCKET_CAP):
        dedup._remember(rng.integers(0, 2**32, 128, dtype=np.uint32), keys)
    assert all(table[7] == list(range(BUCKET_CAP)) for table in dedup.tables)
    assert dedup.n_kept == 1 + 3 * BUCKET_CAP


def sequential_reference(texts: list[str], config: DedupConfig) -> list[str | None]:
    """The documented rule, written plainly: keep the first of exact copies; drop a text whose
    signature agrees with an earlier kept one's in >= threshold of its entries, when both share a
    band hash; a band hash remembers its first BUCKET_CAP kept texts."""
    dedup = Deduplicator(config)  # for its hash family and band mix only
    sig, has = dedup.hasher.signatures(texts)
    b, r = dedup.bands, dedup.rows
    keys = (sig[:, : b * r].reshape(len(texts), b, r).astype(np.uint64) * dedup.band_mix).sum(axis=2)
    seen, buckets, reasons = set(), [{} for _ in range(b)], []
    for i, text in enumerate(texts):
        if config.exact and text in seen:
            reasons.append("exact")
            continue
        near = config.near and has[i]
        candidates = [j for band in range(b) for j in buckets[band].get(int(keys[i, band]), [])] if near else []
        if any(np.mean(sig[j] == sig[i]) >= config.threshold for j in candidates):
            reasons.append("near")
            continue
        reasons.append(None)
        seen.add(text)
        if near:
            for band in range(b):
                bucket = buckets[band].setdefault(int(keys[i, band]), [])
                if len(bucket) < BUCKET_CAP:
                    bucket.append(i)
    return reasons


@st.composite
def near_duplicate_corpora(draw):
    """Texts drawn from a few bases, each copied, cut or edited a little; short texts over a small
    alphabet, so band hashes collide often and buckets fill past BUCKET_CAP."""
    letters = st.text(alphabet="가나다abc", min_size=3, max_size=40)
    bases = draw(st.lists(letters, min_size=1, max_size=4))
    texts = []
    for _ in range(draw(st.integers(1, 70))):
        text = draw(st.sampled_from(bases))
        for _ in range(draw(st.integers(0, 3))):
            at = draw(st.integers(0, len(text)))
            text = text[:at] + draw(st.text(alphabet="가나다abc", max_size=3)) + text[at + 1 :]
        texts.append(text)
    return texts


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    texts=near_duplicate_corpora(),
    threshold=st.sampled_from([0.3, 0.5, 0.8]),
    num_perm=st.sampled_from([8, 32]),
    shingle_chars=st.sampled_from([2, 3, 5]),
    switches=st.sampled_from([(True, True), (False, True), (True, False)]),
    cuts=st.lists(st.integers(0, 70), max_size=6),
)
def test_decisions_from_fingerprints_computed_apart_are_the_sequential_ones(
    texts, threshold, num_perm, shingle_chars, switches, cuts
):
    """Fingerprints computed chunk by chunk in another Deduplicator (as Ray tasks compute them), then
    decided in document order, drop exactly the texts one sequential `check` drops, and the
    plainly written rule agrees."""
    exact, near = switches
    config = DedupConfig(exact=exact, near=near, threshold=threshold, num_perm=num_perm, shingle_chars=shingle_chars)
    expected = Deduplicator(config).check(texts)
    worker, driver, decided = Deduplicator(config), Deduplicator(config), []
    bounds = [0, *sorted(c for c in cuts if c < len(texts)), len(texts)]
    for start, end in itertools.pairwise(bounds):
        decided += driver.decide(worker.fingerprint(texts[start:end]))
    assert decided == expected == sequential_reference(texts, config)
    assert worker.n_kept == 0 and not worker.exact_seen  # fingerprinting remembers nothing


def test_generated_corpora_reach_near_duplicates():
    texts = ["가나다abc가나다" + "abc"[i % 3] * (i % 4) + "가나"[i % 2] for i in range(80)]
    config = DedupConfig(exact=False, threshold=0.3, num_perm=8, shingle_chars=2)
    reasons = Deduplicator(config).check(texts)
    assert reasons == sequential_reference(texts, config) and "near" in reasons


def test_decide_compares_only_the_first_bucket_cap_kept_documents_of_a_band_hash():
    """From fingerprints alone: a copy of the first kept document is near, a copy of the one kept
    after a full bucket is not (its band hashes' buckets never remembered it)."""
    dedup = Deduplicator(DedupConfig(exact=False, threshold=0.75))
    n = BUCKET_CAP + 2
    sig = np.random.default_rng(0).integers(0, 2**32, (n + 2, 128), dtype=np.uint32)
    sig[n], sig[n + 1] = sig[0], sig[BUCKET_CAP]
    keys = np.full((n + 2, dedup.bands), 7, dtype=np.uint64)  # every band hash shared
    fp = Fingerprints(n + 2, None, sig, np.ones(n + 2, dtype=bool), keys)
    assert dedup.decide(fp) == [None] * n + ["near", None]
    assert dedup.n_kept == n + 1 and all(t[7] == list(range(BUCKET_CAP)) for t in dedup.tables)
