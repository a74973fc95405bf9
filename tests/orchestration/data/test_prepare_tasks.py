"""A chunk's per-document steps, run alone (no Ray): what they drop, count and hand the driver."""

from __future__ import annotations

import numpy as np

from orchestration.data.clean import clean_text
from orchestration.data.config import PrepareConfig
from orchestration.data.decontaminate import build_index
from orchestration.data.dedup import Deduplicator
from orchestration.data.fingerprint import normalize, text_hash
from orchestration.data.prepare_tasks import Chunk, ChunkRunner, check_chunk
from tests.conftest import quickstart_korean
from tests.orchestration.data.support import ITEMS, write_benchmark


def chunk() -> Chunk:
    reviews = [t for t in quickstart_korean(400) if len(t) > 40][:30]
    texts = [
        " \u200b \n",  # empty once cleaned
        "short",  # too short for the filter
        reviews[0] + "  \t그리고\u00a0끝.",  # changed by clean
        f"{reviews[1]} 그리고 {ITEMS[0]}",  # holds a benchmark item
        *reviews[2:],
        reviews[2],  # a copy: dropped later, in the driver, not here
    ]
    return Chunk("c", "c.jsonl", 10, texts, len(texts))


def test_a_chunk_is_checked_alone(tmp_path):
    config = PrepareConfig.from_dict({"decontaminate": write_benchmark(tmp_path / "bench")})
    index = build_index(config.decontaminate)
    raw = chunk().texts
    result, texts = check_chunk(config, index, chunk())
    drops = {("c", "other", "clean:empty"): 1, ("c", "en", "filter:length"): 1}
    assert dict(result.ledger.counts) == drops
    assert dict(result.ledger.read) == {("c", "other"): 1, ("c", "en"): 1, ("c", "ko"): len(raw) - 2}
    assert result.survivors == list(range(2, len(raw))) and set(result.languages) == {"ko"}
    assert chunk().id(3) == "c.jsonl#13"
    assert texts == [clean_text(raw[i], config.clean) for i in result.survivors]
    assert result.changed == sum(clean_text(t, config.clean) != t for t in raw) >= 2
    assert result.nbytes == [len(t.encode("utf-8")) for t in texts]
    assert [m.benchmark if m else None for m in result.matches] == [None, "toy"] + [None] * (len(texts) - 2)
    normalized = [normalize(t) for t in texts]
    fp, again = result.fingerprints, Deduplicator(config.dedup).fingerprint(normalized)
    assert fp.exact == [text_hash(t) for t in normalized] and fp.exact[-1] == fp.exact[2]
    assert np.array_equal(fp.sig, again.sig) and np.array_equal(fp.keys, again.keys)
    assert set(result.seconds) == {"clean", "filter", "normalize", "dedup", "decontaminate"}


def test_switched_off_steps_hand_over_nothing(tmp_path):
    config = PrepareConfig.from_dict({"dedup": {"exact": False, "near": False}})
    result, texts = check_chunk(config, None, chunk())
    assert result.fingerprints is None and result.matches is None and len(texts) == len(result.survivors)


def test_the_runner_in_this_process_settles_in_order_with_markers():
    config = PrepareConfig()
    runner = ChunkRunner(config, None, connect=None, in_flight=0)
    texts = chunk().texts
    first, second = Chunk("c", "c", 0, texts[:5], 5), Chunk("c", "c", 5, texts[5:], len(texts) - 5)
    settled = runner.submit(first, "first") + runner.submit(second, "second") + runner.mark("end")
    assert [payload for payload, _, _ in settled] == ["first", "second", "end"]
    assert settled[-1][1:] == (None, None) and isinstance(settled[0][2], list)
