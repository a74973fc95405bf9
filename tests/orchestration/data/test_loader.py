"""The mixture loader: exact resume (also in a new process), conservation of documents, source
shares, seeds, segment ids, and one clear error per bad config or cursor."""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestration.data.loader import (
    DRAW_BLOCK,
    LoadedSource,
    MixtureConfig,
    MixtureLoader,
    ReplaySource,
    SourceWeight,
    TokenFile,
)
from hanyeong.errors import CheckpointError, ConfigError, DataError
from tests.conftest import REPO

PAD, BOS, EOS, VOCAB = 0, 1, 2, 5000
FAST = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(autouse=True, scope="module")
def loader_cache(tmp_path_factory):
    """This module's own token cache (tests/conftest.py gives the session one): the laws that count
    what an open builds start from an empty cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HANYEONG_LOADER_CACHE", str(tmp_path_factory.mktemp("loader-cache")))
        yield


def write_dataset(
    directory: Path,
    sources: dict[str, list[list[int]]],
    shards: int = 1,
    tokenizer: dict | None = None,
) -> None:
    """A dataset in the preparation pipeline's layout (manifest.json, shards/<source>/*.parquet)."""
    manifest = {
        "format": "hanyeong-dataset",
        "version": 1,
        "sources": {},
        "tokenizer": tokenizer
        or {"vocab_size": VOCAB, "bos_id": BOS, "eos_id": EOS, "pad_id": PAD},
    }
    for name, docs in sources.items():
        entry = manifest["sources"][name] = {
            "documents": len(docs),
            "tokens": sum(map(len, docs)),
            "shards": [],
        }
        for k, part in enumerate(np.array_split(np.arange(len(docs)), min(shards, len(docs)))):
            path = directory / "shards" / name / f"part-{k:05d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            rows = [docs[i] for i in part]
            table = pa.table(
                {
                    "id": [f"{name}-{i}" for i in part],
                    "language": ["ko"] * len(rows),
                    "input_ids": pa.array(rows, pa.list_(pa.int32())),
                }
            )
            pq.write_table(table, path, row_group_size=8)  # several chunks per shard
            entry["shards"].append(
                {
                    "path": str(path.relative_to(directory)),
                    "documents": len(rows),
                    "tokens": sum(map(len, rows)),
                    "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                }
            )
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2))


def make_docs(rng, n: int, low: int, high: int, tags) -> list[list[int]]:
    """n documents BOS, tag, body..., EOS; the tag (unique over all fixtures) names the document."""
    return [
        [BOS, next(tags), *rng.integers(3, VOCAB, rng.integers(low, high) - 3).tolist(), EOS]
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> tuple[Path, dict[int, tuple[str, int, list[int]]]]:
    """Two datasets under one root, and every document by its tag: (cursor key, index, tokens)."""
    root = tmp_path_factory.mktemp("datasets")
    rng, tags = np.random.default_rng(0), iter(range(VOCAB - 1000, VOCAB))
    layout = {
        "stage2": {
            "web": make_docs(rng, 40, 3, 60, tags),
            "code": make_docs(rng, 7, 20, 200, tags),
            "tiny": make_docs(rng, 3, 3, 6, tags),
        },
        "stage1": {"web": make_docs(rng, 25, 3, 40, tags)},
    }
    by_tag = {}
    for dataset, sources in layout.items():
        write_dataset(root / dataset, sources, shards=2)
        for name, docs in sources.items():
            by_tag.update({doc[1]: (f"{dataset}/{name}", i, doc) for i, doc in enumerate(docs)})
    return root, by_tag


@st.composite
def mixtures(draw) -> dict:
    names = draw(
        st.lists(st.sampled_from(["web", "code", "tiny", "*"]), min_size=1, max_size=3, unique=True)
    )
    config = {
        "sources": [
            {"dataset": "stage2", "source": n, "weight": draw(st.floats(0.1, 10))} for n in names
        ],
        "split_documents": draw(st.booleans()),
    }
    if draw(st.booleans()):
        config["replay"] = [{"dataset": "stage1", "fraction": draw(st.floats(0.05, 0.5))}]
    if draw(st.booleans()):  # web (40 documents) holds out up to 4, stage1/web (25) 2, code none
        config["hold_out"] = draw(st.integers(0, 5))
    return config


schedules = st.lists(
    st.tuples(st.integers(1, 90), st.integers(1, 4)), min_size=1, max_size=8
)  # (seq_len, rows)


def loader(
    root: Path, config: dict, seed: int = 0, seq_len: int = 16, rows: int = 2, **kwargs
) -> MixtureLoader:
    return MixtureLoader(MixtureConfig.from_dict(config), seq_len, rows, seed, root=root, **kwargs)


def read(data: MixtureLoader, schedule) -> list:
    """Batches at a schedule of (seq_len, batch_rows): the ramp changes shapes between batches."""
    out = []
    for seq_len, rows in schedule:
        data.seq_len, data.batch_rows = seq_len, rows
        out.append(data.next_batch())
    return out


def rows_of(batch) -> np.ndarray:
    """The packed rows of T + 1 tokens a batch was cut from."""
    return np.concatenate([batch.inputs[:, :1], batch.targets], axis=1)


def assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for name in ("inputs", "targets", "loss_mask", "segment_ids"):
            u, v = getattr(x, name), getattr(y, name)
            assert (u is None and v is None) or np.array_equal(u, v), name


# ---- resume ----------------------------------------------------------------------------------


@FAST
@given(config=mixtures(), seed=st.integers(0, 2**40), before=schedules, after=schedules)
def test_resume_from_a_cursor_gives_exactly_the_next_batches(datasets, config, seed, before, after):
    root, _ = datasets
    whole = loader(root, config, seed)
    read(whole, before)
    cursor = json.loads(json.dumps(whole.state()))  # through JSON, as in trainer_state.json
    expected = read(whole, after)
    resumed = loader(root, config, seed, state=cursor)
    assert resumed.tokens_delivered == cursor["tokens_delivered"]
    assert_same(read(resumed, after), expected)
    assert resumed.state() == whole.state()


def test_resume_across_draw_blocks(datasets):
    root, _ = datasets
    config = {
        "sources": [
            {"dataset": "stage2", "source": "tiny"},
            {"dataset": "stage2", "source": "web", "weight": 0.2},
        ]
    }
    whole = loader(root, config, seed=7, seq_len=255, rows=4)
    cursors, batches = [], []
    while whole.state()["documents_drawn"] < 2.5 * DRAW_BLOCK:
        cursors.append(whole.state())
        batches.append(whole.next_batch())
    assert len({c["documents_drawn"] // DRAW_BLOCK for c in cursors}) == 3
    for i in range(0, len(cursors) - 3, 3):
        assert_same(
            read(loader(root, config, seed=7, state=cursors[i]), [(255, 4)] * 3), batches[i : i + 3]
        )


def test_resume_in_a_new_process(datasets, tmp_path):
    root, _ = datasets
    config = {
        "sources": [
            {"dataset": "stage2", "source": "*", "weight": 2},
            {"dataset": "stage2", "source": "tiny"},
        ],
        "replay": [{"dataset": "stage1", "fraction": 0.25}],
    }
    whole = loader(root, config, seed=3, seq_len=40, rows=3)
    read(whole, [(40, 3)] * 5)
    (tmp_path / "cursor.json").write_text(json.dumps(whole.state()))
    expected = read(whole, [(40, 3)] * 4 + [(80, 2)] * 3)
    child = """
import json, sys, numpy as np
from orchestration.data.loader import MixtureConfig, MixtureLoader
config, root, cursor, out = sys.argv[1:]
config = MixtureConfig.from_dict(json.loads(config))
data = MixtureLoader(config, 40, 3, seed=3, root=root, state=json.load(open(cursor)))
batches = [data.next_batch() for _ in range(4)]
data.seq_len, data.batch_rows = 80, 2
batches += [data.next_batch() for _ in range(3)]
keys = ("inputs", "targets", "segment_ids")
np.savez(out, **{f"{k}_{i}": getattr(b, k) for i, b in enumerate(batches) for k in keys})
"""
    args = [json.dumps(config), str(root), str(tmp_path / "cursor.json"), str(tmp_path / "out.npz")]
    subprocess.run([sys.executable, "-c", child, *args], cwd=REPO, check=True)
    out = np.load(tmp_path / "out.npz")
    for i, batch in enumerate(expected):
        for k in ("inputs", "targets", "segment_ids"):
            assert np.array_equal(out[f"{k}_{i}"], getattr(batch, k)), (i, k)


# ---- conservation, segments, shares, seeds -----------------------------------------------------


def pieces(row: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """A row's non-pad tokens cut before each BOS: (column, tokens)."""
    cuts = sorted({0, *np.flatnonzero(row == BOS).tolist(), int((row != PAD).sum())})
    return [(a, row[a:b]) for a, b in itertools.pairwise(cuts) if b > a]


@FAST
@given(config=mixtures(), seed=st.integers(0, 2**40), schedule=schedules)
def test_documents_are_conserved_and_segments_follow_them(datasets, config, seed, schedule):
    root, by_tag = datasets
    data = loader(root, config, seed)
    stream = []
    for batch in read(data, schedule):
        for row in rows_of(batch):
            stream.append(row[row != PAD])
            if not config[
                "split_documents"
            ]:  # whole documents on one row, unless longer than a row
                for column, piece in pieces(row):
                    doc = by_tag[int(piece[1])][2] if piece[0] == BOS else None
                    assert (
                        doc is None
                        or len(piece) == len(doc)
                        or (column == 0 and len(doc) > len(row))
                    )
        # Segments: 0 at the start of each row, +1 exactly at each BOS (and where padding starts).
        seg, inputs = batch.segment_ids, batch.inputs
        assert (seg[:, 0] == 0).all()
        opens = (inputs[:, 1:] == BOS) | ((inputs[:, 1:] == PAD) & (inputs[:, :-1] != PAD))
        assert np.array_equal(np.diff(seg, axis=1), opens.astype(np.int32))
        if batch.loss_mask is not None:
            assert np.array_equal(batch.loss_mask, (batch.targets != PAD).astype(np.float32))
    # In order, nothing lost or repeated: the stream is whole drawn documents back to back.
    stream = np.concatenate(stream)
    assert data.tokens_delivered == len(stream)
    drawn = [by_tag[int(piece[1])][:2] for _, piece in pieces(stream) if len(piece) > 1]
    expected = np.concatenate([doc_of(by_tag, d) for d in drawn])
    assert np.array_equal(stream[: len(expected)], expected[: len(stream)])
    if len(stream) > len(expected):  # the stream ends on the BOS of a document yet to come
        assert stream[len(expected) :].tolist() == [BOS]
    else:  # or inside (or at the end of) the last document
        assert len(expected) - len(stream) < len(doc_of(by_tag, drawn[-1]))
    # Held-out documents never come; within each epoch every other document of a source comes once.
    held = {(s.key, int(i)) for s in data.sources for i in s.held}
    assert len(held) == sum(min(config.get("hold_out", 0), (len(s.offsets) - 1) // 10) for s in data.sources)
    assert not held & set(drawn)
    for key in {k for k, _ in drawn}:
        order = [i for k, i in drawn if k == key]
        n = next(s.documents for s in data.sources if s.key == key)
        for e in range(0, len(order), n):
            assert len(set(order[e : e + n])) == len(order[e : e + n])


def test_held_out_documents_depend_on_the_source_alone_and_nest(datasets):
    root, _ = datasets
    config = {"sources": [{"dataset": "stage2", "source": "web"}], "replay": [{"dataset": "stage1", "fraction": 0.3}]}
    two = loader(root, {**config, "hold_out": 2}, seed=1)
    four = loader(root, {**config, "hold_out": 4}, seed=2)  # another seed: the same documents
    none = loader(root, config, seed=1)
    for a, b, c in zip(two.sources, four.sources, none.sources):
        assert len(a.held) == min(2, (len(a.offsets) - 1) // 10) and len(c.held) == 0
        assert set(a.held) <= set(b.held) and len(b.held) == min(4, (len(b.offsets) - 1) // 10)
        assert a.documents == len(a.offsets) - 1 - len(a.held)  # the cursor counts training documents
    assert [len(s.held) for s in four.sources] == [2, 4]  # stage1/web: 25 documents, at most 2


def doc_of(by_tag: dict, drawn: tuple[str, int]) -> np.ndarray:
    key, index = drawn
    return np.array(next(doc for k, i, doc in by_tag.values() if (k, i) == (key, index)))


def test_token_shares_converge_to_the_weights(datasets):
    root, by_tag = datasets
    config = {
        "sources": [
            {"dataset": "stage2", "source": "web", "weight": 6},
            {"dataset": "stage2", "source": "code", "weight": 3},
            {"dataset": "stage2", "source": "tiny", "weight": 1},
        ],
        "replay": [{"dataset": "stage1", "fraction": 0.2}],
    }
    data = loader(root, config, seed=11, seq_len=511, rows=8)
    weights = {"stage2/web": 0.48, "stage2/code": 0.24, "stage2/tiny": 0.08, "stage1/web": 0.2}
    assert data.weights == pytest.approx(weights)
    counts = dict.fromkeys(weights, 0)
    stream = np.concatenate([rows_of(data.next_batch()).ravel() for _ in range(100)])  # 410k tokens
    for _, piece in pieces(stream[: np.flatnonzero(stream == BOS)[-1]]):
        counts[by_tag[int(piece[1])][0]] += len(piece)
    total = sum(counts.values())
    # Over 40 seeds the largest deviation is 0.017 (documents of 3 to 200 tokens): about 4 sigma.
    assert {k: c / total for k, c in counts.items()} == pytest.approx(weights, abs=0.025)


def test_draw_probabilities_give_each_source_its_weight_in_expected_tokens(datasets):
    """Exactly, not by sampling: a source drawn with probability p yields p x (its mean training
    document length) tokens a draw, and those are the weights; held-out documents count neither in
    the documents nor in the tokens (its own documents' lengths, not their neighbours')."""
    root, _ = datasets
    data = loader(root, {"sources": [{"dataset": "stage2"}, {"dataset": "stage1"}], "hold_out": 2})
    assert any(len(s.held) for s in data.sources)
    p = np.diff(data._cdf, prepend=0.0)
    expected = []
    for s, share in zip(data.sources, p):
        kept = np.setdiff1d(np.arange(len(s.offsets) - 1), s.held)
        expected.append(share * (s.offsets[kept + 1] - s.offsets[kept]).mean())
    np.testing.assert_allclose(np.array(expected) / sum(expected), [data.weights[s.key] for s in data.sources],
                               rtol=1e-9)  # fmt: skip


def test_star_splits_a_weight_by_tokens(datasets):
    root, _ = datasets
    data = loader(root, {"sources": [{"dataset": "stage2"}]})
    tokens = {s.key: int(s.offsets[-1]) for s in data.sources}
    assert data.weights == pytest.approx({k: t / sum(tokens.values()) for k, t in tokens.items()})


def test_same_seed_same_batches_other_seed_other_order(datasets):
    root, _ = datasets
    config = {
        "sources": [{"dataset": "stage2"}],
        "replay": [{"dataset": "stage1", "fraction": 0.3}],
    }
    a, b, c = (read(loader(root, config, seed), [(64, 4)] * 6) for seed in (5, 5, 6))
    assert_same(a, b)
    assert not all(np.array_equal(x.inputs, y.inputs) for x, y in zip(a, c))


def test_where_the_datasets_live_does_not_change_the_order(datasets, tmp_path):
    root, _ = datasets
    batches = []
    for first, second in (("a", "b"), ("b", "a")):  # the two datasets' paths sort both ways
        shutil.copytree(root / "stage2", tmp_path / first / "stage2")
        shutil.copytree(root / "stage1", tmp_path / second / "stage1")
        replay = [{"dataset": str(tmp_path / second / "stage1"), "fraction": 0.3}]
        config = {"sources": [{"dataset": str(tmp_path / first / "stage2")}], "replay": replay}
        batches.append(read(loader(tmp_path, config, 5), [(64, 4)] * 6))
        shutil.rmtree(tmp_path / first), shutil.rmtree(tmp_path / second)
    assert_same(*batches)


def test_toml_maps_onto_the_config_and_builds_a_loader(datasets):
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    text = """
split_documents = false
[[sources]]
dataset = "stage2"
source = "web"
weight = 3
[[sources]]
dataset = "stage2"
source = "code"
[[replay]]
dataset = "stage1"
fraction = 0.25
"""
    config = MixtureConfig.from_dict(tomllib.loads(text))
    assert MixtureConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    data = MixtureLoader(config, seq_len=32, batch_rows=2, seed=4, root=datasets[0])
    assert data.weights == pytest.approx(
        {"stage2/web": 0.5625, "stage2/code": 0.1875, "stage1/web": 0.25}
    )
    batch = next(iter(data))
    assert batch.inputs.shape == batch.targets.shape == batch.segment_ids.shape == (2, 32)
    assert batch.inputs.dtype == batch.segment_ids.dtype == np.int32
    assert batch.loss_mask.dtype == np.float32


def test_cursor_is_small_and_plain(datasets):
    root, _ = datasets
    data = loader(
        root,
        {"sources": [{"dataset": "stage2"}], "replay": [{"dataset": "stage1", "fraction": 0.1}]},
    )
    read(data, [(100, 4)] * 3)
    state = data.state()
    assert len(json.dumps(state)) < 600
    assert set(state["sources"]) == {"stage2/web", "stage2/code", "stage2/tiny", "stage1/web"}
    assert state["tokens_delivered"] == data.tokens_delivered == 3 * 4 * 101


# ---- errors ------------------------------------------------------------------------------------

BAD = [
    ({}, r"^mixture: missing key\(s\) sources"),
    ({"sources": []}, r"mixture.sources: needs at least one entry"),
    ({"sources": {"dataset": "stage2"}}, r"mixture.sources must be an array"),
    (
        {"sources": [{"dataset": "stage2", "weight": -1}]},
        r"mixture.sources\[0\].weight must be a positive number",
    ),
    (
        {"sources": [{"dataset": "stage2"}, {"dataset": "stage2", "weight": True}]},
        r"mixture.sources\[1\].weight",
    ),
    (
        {"sources": [{"dataset": "stage2", "wieght": 2}]},
        r"mixture.sources\[0\]: unknown key\(s\) wieght",
    ),
    ({"sources": [{"dataset": 3}]}, r"mixture.sources\[0\].dataset must be str, got int 3"),
    ({"sources": [{"dataset": "stage2"}], "shuffle": True}, r"^mixture: unknown key\(s\) shuffle"),
    (
        {"sources": [{"dataset": "stage2"}], "split_documents": "yes"},
        r"mixture.split_documents must be bool, got str",
    ),
    (
        {"sources": [{"dataset": "stage2"}], "replay": [{"dataset": "stage1", "fraction": 1.5}]},
        r"mixture.replay\[0\].fraction",
    ),
    (
        {"sources": [{"dataset": "stage2"}], "replay": [{"dataset": "stage1"}]},
        r"mixture.replay\[0\]: missing key\(s\) fraction",
    ),
    (
        {
            "sources": [{"dataset": "stage2"}],
            "replay": [{"dataset": "stage1", "fraction": 0.6}] * 2,
        },
        r"^mixture.replay: fractions sum to 1.2",
    ),
    (
        {"sources": [{"dataset": "stage2", "source": "wbe"}]},
        r"mixture.sources\[0\].source: no source 'wbe' .* known: code, tiny, web",
    ),
    (
        {"sources": [{"dataset": "nowhere"}]},
        r"mixture.sources\[0\].dataset: no prepared dataset at .*nowhere",
    ),
]


BAD.append(({"sources": [{"dataset": "stage2"}], "hold_out": -1}, r"^mixture.hold_out must be an integer >= 0, got -1"))


@pytest.mark.parametrize("config, message", BAD)
def test_bad_mixture_is_one_clear_config_error(datasets, config, message):
    root, _ = datasets
    with pytest.raises(ConfigError, match=message) as err:
        loader(root, config)
    assert "\n" not in str(err.value)


def test_errors_name_the_callers_key_path():
    with pytest.raises(ConfigError, match=r"^stages\[1\].data.sources\[0\].weight must be"):
        MixtureConfig.from_dict(
            {"sources": [{"dataset": "x", "weight": 0}]}, where="stages[1].data"
        )


@pytest.mark.parametrize("seq_len, rows", [(0, 2), (16, -1), (16.0, 2)])
def test_bad_shapes_are_config_errors(datasets, seq_len, rows):
    with pytest.raises(ConfigError, match="seq_len|batch_rows"):
        loader(datasets[0], {"sources": [{"dataset": "stage2"}]}, seq_len=seq_len, rows=rows)


def test_datasets_of_different_tokenizers_do_not_mix(datasets, tmp_path):
    root, _ = datasets
    write_dataset(
        tmp_path / "other",
        {"web": [[7, 9, 8]]},
        tokenizer={"vocab_size": 100, "bos_id": 7, "eos_id": 8},
    )
    with pytest.raises(ConfigError, match="tokenized differently"):
        loader(root, {"sources": [{"dataset": "stage2"}, {"dataset": str(tmp_path / "other")}]})


def test_broken_shards_are_data_errors(tmp_path):
    write_dataset(tmp_path / "a", {"web": [[BOS, 5, EOS], [5, 6, EOS]]})
    with pytest.raises(DataError, match="does not start with BOS"):
        loader(tmp_path, {"sources": [{"dataset": "a"}]})
    write_dataset(tmp_path / "b", {"web": [[BOS, 5, EOS]]})
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    manifest["sources"]["web"]["shards"][0]["tokens"] = 4
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="the manifest says 1, 4"):
        loader(tmp_path, {"sources": [{"dataset": "b"}]})
    write_dataset(tmp_path / "c", {"web": [[BOS, 5, 6, 7, EOS]] * 3})
    shard = next((tmp_path / "c" / "shards" / "web").glob("*.parquet"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1  # one bit flipped: parquet might still read it, wrongly
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"part-00000.parquet: its sha256 is not the manifest's"):
        loader(tmp_path, {"sources": [{"dataset": "c"}]})


def test_bad_cursors_are_checkpoint_errors(datasets):
    root, _ = datasets
    config = {"sources": [{"dataset": "stage2"}]}
    state = loader(root, config, seed=1).state()
    with pytest.raises(CheckpointError, match="made with seed 1, not 2"):
        loader(root, config, seed=2, state=state)
    with pytest.raises(CheckpointError, match="malformed"):
        loader(root, config, seed=1, state={**state, "sources": None})
    web = state["sources"]["stage2/web"]
    for change, message in [
        ({"documents": 41}, "dataset changed"),
        ({"weight": 0.5}, "changed mix"),
        ({"position": 40}, "outside source"),
    ]:
        changed = {**state, "sources": {**state["sources"], "stage2/web": {**web, **change}}}
        with pytest.raises(CheckpointError, match=message):
            loader(root, config, seed=1, state=changed)
    with pytest.raises(CheckpointError, match="made for sources .* this mixture has stage2/web"):
        loader(root, {"sources": [{"dataset": "stage2", "source": "web"}]}, seed=1, state=state)
    with pytest.raises(CheckpointError, match="not the sources' sum"):
        loader(root, config, seed=1, state={**state, "documents_drawn": 3})


# ---- laws added for mutation testing (benchmarks/mutations.py) ----------------------------------

USER = range(3, 1000)  # in the loss_mask fixtures: user tokens (mask 0); others, assistant ones (mask 1)


def write_masked(directory: Path, docs: list[list[int]], masks: list[list[int]] | None = None,
                 mask_type=pa.int8(), shards: int = 1) -> None:  # fmt: skip
    """A one-source ('chat') dataset whose shards carry a loss_mask column (1 outside USER)."""
    write_dataset(directory, {"chat": docs}, shards=shards)
    if masks is None:
        masks = [[0 if t in USER else 1 for t in doc] for doc in docs]
    manifest = json.loads((directory / "manifest.json").read_text())
    done = 0
    for shard in manifest["sources"]["chat"]["shards"]:
        path = directory / shard["path"]
        table = pq.read_table(path)
        part = masks[done : done + table.num_rows]
        done += table.num_rows
        pq.write_table(table.append_column("loss_mask", pa.array(part, pa.list_(mask_type))), path)
        shard["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (directory / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("split", [True, False])
def test_a_sources_loss_mask_reaches_the_batches_token_by_token(tmp_path, split):
    """Chat tokens carry their shard's loss_mask into Batch.loss_mask; a source without the column
    counts every token; padding never counts."""
    rng = np.random.default_rng(3)
    chat = [[BOS, *rng.integers(3, 2000, rng.integers(2, 30)).tolist(), EOS] for _ in range(30)]
    web = [[BOS, *rng.integers(2000, 4000, rng.integers(1, 40)).tolist(), EOS] for _ in range(20)]
    write_masked(tmp_path / "sft", chat, shards=2)
    write_dataset(tmp_path / "web", {"web": web})
    config = {"sources": [{"dataset": "sft"}, {"dataset": "web"}], "split_documents": split}
    data = loader(tmp_path, config, seed=2, seq_len=24, rows=3)
    assert data.masked and [s.masks is not None for s in data.sources] == [True, False]
    targets = []
    for batch in read(data, [(24, 3)] * 12):
        t = batch.targets
        expected = ~np.isin(t, USER) & (t != PAD)
        assert np.array_equal(batch.loss_mask, expected.astype(np.float32))
        targets.append(t)
    targets = np.concatenate(targets)
    assert np.isin(targets, USER).any() and (targets >= 2000).any()  # both sources came
    assert (targets == PAD).any() != split  # whole documents pad their rows


def test_a_loss_mask_comes_exactly_when_some_target_does_not_count(tmp_path):
    """Chat data alone carries its loss_mask column too; packed data of sources without one has
    loss_mask None (every target counts), so the trainer skips the masking."""
    rng = np.random.default_rng(4)
    chat_docs = [[BOS, *rng.integers(3, 2000, rng.integers(2, 30)).tolist(), EOS] for _ in range(20)]
    write_masked(tmp_path / "sft", chat_docs)
    write_dataset(tmp_path / "web", {"web": [[BOS, 2500, 2600, EOS]] * 5})
    chat = loader(tmp_path, {"sources": [{"dataset": "sft"}]}, seed=1, seq_len=24, rows=3)
    web = loader(tmp_path, {"sources": [{"dataset": "web"}]}, seed=1, seq_len=24, rows=3)
    for a, b in zip(read(chat, [(24, 3)] * 3), read(web, [(24, 3)] * 3)):
        assert np.array_equal(a.loss_mask, (~np.isin(a.targets, USER)).astype(np.float32))
        assert b.loss_mask is None


def test_bad_loss_masks_are_data_errors(tmp_path):
    docs = [[BOS, 5, 1500, EOS], [BOS, 6, EOS]]
    cases = {
        "int32": ({"mask_type": pa.int32()}, "loss_mask must be list<int8>"),
        "null": ({"masks": [[0, 0, 1, 1], None]}, "loss_mask must be list<int8>, no nulls"),
        "short": ({"masks": [[0, 0, 1], [0, 1, 1]]}, "rows differ in length"),
        "long": ({"masks": [[0, 0, 1, 1, 1], [0, 1, 1]]}, "more values than input_ids"),
        "two": ({"masks": [[0, 0, 2, 1], [0, 1, 1]]}, "must be 0 or 1"),
        "negative": ({"masks": [[0, 0, -1, 1], [0, 1, 1]]}, "must be 0 or 1"),
    }
    for name, (kwargs, message) in cases.items():
        write_masked(tmp_path / name, docs, **kwargs)
        with pytest.raises(DataError, match=message):
            loader(tmp_path, {"sources": [{"dataset": name}]})
    # a column in some shards only
    write_masked(tmp_path / "mixed", docs * 4, shards=2)
    shard = tmp_path / "mixed" / "shards" / "chat" / "part-00001.parquet"
    pq.write_table(pq.read_table(shard).drop_columns(["loss_mask"]), shard)
    manifest = json.loads((tmp_path / "mixed" / "manifest.json").read_text())
    manifest["sources"]["chat"]["shards"][1]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (tmp_path / "mixed" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="some shards have a loss_mask column and some do not"):
        loader(tmp_path, {"sources": [{"dataset": "mixed"}]})


def test_smallest_sources_and_documents_load(tmp_path):
    """One document is a source; BOS, EOS alone is a document."""
    write_dataset(tmp_path / "d", {"one": [[BOS, 7, EOS]], "two": [[BOS, EOS], [BOS, 9, EOS]]})
    data = loader(tmp_path, {"sources": [{"dataset": "d"}]}, seq_len=4, rows=2)
    assert {s.key: s.documents for s in data.sources} == {"d/one": 1, "d/two": 2}
    stream = np.concatenate([rows_of(b).ravel() for b in read(data, [(4, 2)] * 4)])
    assert set(stream.tolist()) == {BOS, EOS, 7, 9}


@pytest.mark.parametrize("pad_id", [None, 3])
def test_padding_is_the_tokenizers_pad_id_else_pad(tmp_path, pad_id):
    """[PAD] is id 0 of every hanyeong vocabulary (tokenizer/specials.py) when the manifest names none."""
    from tokenizer.specials import NAMED_SPECIALS

    tokenizer = {"vocab_size": VOCAB, "bos_id": BOS, "eos_id": EOS} | ({} if pad_id is None else {"pad_id": pad_id})
    write_dataset(tmp_path / "d", {"web": [[BOS, 1500, 1501, 1502, EOS]] * 3}, tokenizer=tokenizer)
    batch = loader(tmp_path, {"sources": [{"dataset": "d"}], "split_documents": False}, seq_len=7).next_batch()
    pad = NAMED_SPECIALS.index("[PAD]") if pad_id is None else pad_id
    assert rows_of(batch).tolist() == [[BOS, 1500, 1501, 1502, EOS, pad, pad, pad]] * 2
    assert batch.loss_mask.tolist() == [[1, 1, 1, 1, 0, 0, 0]] * 2


def test_the_cursor_is_in_its_named_versioned_format(datasets):
    """trainer_state.json's data_cursor: 'hanyeong-data-cursor' v1; another version is refused."""
    root, _ = datasets
    config = {"sources": [{"dataset": "stage2"}]}
    state = loader(root, config, seed=1).state()
    assert (state["format"], state["version"]) == ("hanyeong-data-cursor", 1)
    with pytest.raises(CheckpointError, match="'hanyeong-data-cursor' v2, expected 'hanyeong-data-cursor' v1"):
        loader(root, config, seed=1, state={**state, "version": 2})


def test_the_draw_block_is_part_of_the_order():
    """Each block of DRAW_BLOCK draws has its own RNG stream, so the size is part of every run's data
    order: a run resumed after an upgrade must read the same stream. Changing it is a deliberate act."""
    assert DRAW_BLOCK == 1024


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: SourceWeight(dataset="", weight=1.0), "dataset must be a directory path"),
        (lambda: SourceWeight(dataset="d", source=""), "source must be a source name"),
        (lambda: ReplaySource(dataset="", fraction=0.5), "dataset must be a directory path"),
        (lambda: ReplaySource(dataset="d", fraction=0.5, source=""), "source must be a source name"),
        (lambda: SourceWeight(dataset="d", weight=float("inf")), "weight must be a positive number"),
        (lambda: ReplaySource(dataset="d", fraction=0.0), "fraction must be a number in"),
        (lambda: ReplaySource(dataset="d", fraction=1.0), "fraction must be a number in"),
        (lambda: MixtureConfig(sources=(SourceWeight("d"),), replay=(ReplaySource("a", 0.5), ReplaySource("b", 0.5))),
         "fractions sum to 1"),
        (lambda: MixtureConfig(sources=(SourceWeight("d"),), hold_out=True), "hold_out must be an integer"),
        (lambda: MixtureConfig(sources=(SourceWeight("d"),), hold_out=2.5), "hold_out must be an integer"),
    ],
)  # fmt: skip
def test_config_objects_check_themselves(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


def test_config_objects_are_frozen_and_loaded_sources_print_short(datasets):
    import dataclasses

    for frozen in (SourceWeight("d"), ReplaySource("d", 0.5), MixtureConfig(sources=(SourceWeight("d"),))):
        with pytest.raises(dataclasses.FrozenInstanceError):
            frozen.source = "x"
    data = loader(datasets[0], {"sources": [{"dataset": "stage2"}], "hold_out": 4})
    assert all(len(repr(s)) < 200 for s in data.sources)  # no token arrays in logs
    bare = LoadedSource("k", data.sources[0].tokens, data.sources[0].offsets, 1.0)
    assert bare.documents == len(bare.offsets) - 1 and len(bare.held) == 0  # nothing held out by default


def test_a_loaded_source_prints_its_key_and_weight_only(datasets):
    """Logs show a source as its key and share: no token, offset, mask or held-out array."""
    data = loader(datasets[0], {"sources": [{"dataset": "stage2"}, {"dataset": "stage1"}], "hold_out": 2})
    assert all(len(s.held) for s in data.sources if s.key.endswith("web"))
    for s in data.sources:
        assert repr(s) == f"LoadedSource(key={s.key!r}, weight={s.weight!r})"


def test_shards_outside_the_contract_are_data_errors(tmp_path):
    """input_ids list<int32> without nulls, ids inside the vocabulary, every document BOS ... EOS."""
    cases = {
        "int64": (pa.array([[BOS, 5, EOS]], pa.list_(pa.int64())), "input_ids must be list<int32>"),
        "null": (pa.array([[BOS, 5, EOS], None], pa.list_(pa.int32())), "input_ids must be list<int32>, no nulls"),
        "vocab": (pa.array([[BOS, VOCAB, EOS]], pa.list_(pa.int32())), rf"token ids outside \[0, {VOCAB}\)"),
        "negative": (pa.array([[BOS, -1, EOS]], pa.list_(pa.int32())), rf"token ids outside \[0, {VOCAB}\)"),
        "eos": (pa.array([[BOS, 5, EOS], [BOS, 6, 7]], pa.list_(pa.int32())), r"does not end with EOS \(2\)"),
    }  # fmt: skip
    for name, (column, message) in cases.items():
        write_dataset(tmp_path / name, {"web": [[BOS, 5, EOS]]})
        manifest = json.loads((tmp_path / name / "manifest.json").read_text())
        shard = manifest["sources"]["web"]["shards"][0]
        pq.write_table(pa.table({"input_ids": column}), tmp_path / name / shard["path"])
        tokens = sum(len(row) for row in column.to_pylist() if row is not None)
        shard.update(documents=len(column), tokens=tokens, sha256=None)
        manifest["sources"]["web"].update(documents=len(column), tokens=tokens)
        (tmp_path / name / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(DataError, match=message):
            loader(tmp_path, {"sources": [{"dataset": name}]})


def test_draws_name_a_source_even_past_the_last_cumulative_weight():
    """A draw above the cdf's last value (float rounding leaves it a hair under 1) is the last source."""
    from orchestration.data.loader import draw_sources

    draws = draw_sources(0, 0, np.array([0.25, 0.5]))
    assert draws.shape == (DRAW_BLOCK,) and set(draws.tolist()) == {0, 1}
    assert (draws == 1).mean() == pytest.approx(0.75, abs=0.05)


def test_a_loader_without_a_seed_is_seed_0(datasets):
    root, _ = datasets
    config = MixtureConfig.from_dict({"sources": [{"dataset": "stage2"}]})
    bare = MixtureLoader(config, 16, 2, root=root)
    assert bare.state()["seed"] == 0
    assert_same(read(bare, [(16, 2)] * 3), read(loader(root, config.to_dict(), seed=0), [(16, 2)] * 3))


def test_a_sources_tokens_are_read_by_the_slice_never_held(tmp_path):
    """open_source's memory law (issue #20; it replaced the one-shard zero-copy view, which held a
    source's tokens whole): a source's tokens are a TokenFile, and a slice reads exactly its bytes."""
    write_dataset(tmp_path / "d", {"one": [[BOS, 5, EOS]] * 4, "two": [[BOS, 6, EOS]] * 4}, shards=2)
    write_dataset(tmp_path / "e", {"one": [[BOS, 7, 8, EOS]] * 4})
    for root, key, piece in ((tmp_path / "e", "e/one", [7, 8]), (tmp_path / "d", "d/two", [6, EOS])):
        data = loader(tmp_path, {"sources": [{"dataset": root.name, "source": key.split("/")[1]}]})
        (source,) = data.sources
        assert isinstance(source.tokens, TokenFile) and source.tokens.dtype == np.int32
        assert len(source.tokens) == source.offsets[-1] == (16 if root.name == "e" else 12)
        before = source.tokens.bytes_read
        assert source.tokens[1:3].tolist() == piece and source.tokens.bytes_read - before == 8


def test_empty_sources_are_left_out_or_named(tmp_path):
    """Under '*' a source without tokens gets no share (it could not be drawn); named, or alone, it is an error."""
    write_dataset(tmp_path / "d", {"web": [[BOS, 5, EOS]] * 3})
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    manifest["sources"]["empty"] = {"documents": 0, "tokens": 0, "shards": []}
    (tmp_path / "d" / "manifest.json").write_text(json.dumps(manifest))
    data = loader(tmp_path, {"sources": [{"dataset": "d"}]})
    assert data.weights == {"d/web": 1.0}
    with pytest.raises(DataError, match="empty: no tokens"):
        loader(tmp_path, {"sources": [{"dataset": "d", "source": "empty"}]})
    (tmp_path / "n").mkdir()
    (tmp_path / "n" / "manifest.json").write_text(json.dumps({**manifest, "sources": {}}))
    with pytest.raises(ConfigError, match=r"no source 'web' in .*; known: none$"):
        loader(tmp_path, {"sources": [{"dataset": "n", "source": "web"}]})


def test_pad_inside_a_document_is_an_ordinary_id(tmp_path):
    """The contract asks ids in [0, vocab_size): id 0 may appear inside a document."""
    write_dataset(tmp_path / "d", {"web": [[BOS, 0, 5, EOS]] * 3})
    data = loader(tmp_path, {"sources": [{"dataset": "d"}]}, seq_len=7)
    assert rows_of(data.next_batch())[0, :4].tolist() == [BOS, 0, 5, EOS]


def test_a_cursor_offset_must_lie_inside_the_current_document(datasets):
    root, by_tag = datasets
    config = {"sources": [{"dataset": "stage2", "source": "web"}]}
    state = loader(root, config, seed=4).state()
    first = rows_of(loader(root, config, seed=4, seq_len=200).next_batch())[0]
    length = len(by_tag[int(first[1])][2])  # the current (first) document
    inside = loader(root, config, seed=4, state={**state, "offset": length - 1})
    assert rows_of(inside.next_batch())[0, 0] == EOS  # the document's last token comes next
    with pytest.raises(CheckpointError, match=f"offset {length} is outside the current document"):
        loader(root, config, seed=4, state={**state, "offset": length})
    with pytest.raises(CheckpointError, match="offset -1 is outside"):
        loader(root, config, seed=4, state={**state, "offset": -1})


def test_without_a_root_datasets_are_found_from_the_working_directory(datasets, monkeypatch):
    root, _ = datasets
    config = MixtureConfig.from_dict({"sources": [{"dataset": "stage2", "source": "web"}]})
    monkeypatch.chdir(root)
    assert_same(read(MixtureLoader(config, 16, 2), [(16, 2)] * 2), read(loader(root, config.to_dict()), [(16, 2)] * 2))


def test_the_tokenizer_error_lists_each_dataset_with_its_ids(datasets, tmp_path):
    root, _ = datasets
    write_dataset(tmp_path / "other", {"web": [[7, 9, 8]]}, tokenizer={"vocab_size": 100, "bos_id": 7, "eos_id": 8})
    with pytest.raises(ConfigError, match=r"= \(5000, 1, 2\); .*other: vocab_size, bos_id, eos_id = \(100, 7, 8\)\)$"):
        loader(root, {"sources": [{"dataset": "stage2"}, {"dataset": str(tmp_path / "other")}]})


@pytest.mark.parametrize("seq_len, rows, seed, message", [
    (0, 2, 0, "^seq_len must be a positive integer, got 0$"), (16, 0, 0, "^batch_rows must be a positive integer, got 0$"),
    (16, 2, -1, "^seed must be an integer >= 0, got -1$"), (16, 2, True, "^seed must be an integer >= 0, got True$"),
])  # fmt: skip
def test_shape_and_seed_errors_name_their_argument(datasets, seq_len, rows, seed, message):
    with pytest.raises(ConfigError, match=message):
        loader(datasets[0], {"sources": [{"dataset": "stage2"}]}, seed=seed, seq_len=seq_len, rows=rows)
    if seed == 0:  # seed 0 is allowed, a length or row count of 1 too
        assert loader(datasets[0], {"sources": [{"dataset": "stage2"}]}, seed=0, seq_len=1, rows=1).next_batch()


def test_at_most_a_tenth_of_a_source_is_held_out(tmp_path):
    """39 documents: 3 held out at most (a tenth, rounded down), each one of the source's documents."""
    rng, tags = np.random.default_rng(5), iter(range(3000, 3100))
    write_dataset(tmp_path / "d", {"web": make_docs(rng, 39, 3, 20, tags)})
    data = loader(tmp_path, {"sources": [{"dataset": "d"}], "hold_out": 10})
    (source,) = data.sources
    assert len(source.held) == 3 and set(source.held.tolist()) <= set(range(39))
    assert source.documents == 36 and sorted(source.held.tolist()) == source.held.tolist()


def test_a_row_group_arrow_reads_as_several_slices_loads_whole(tmp_path):
    """Arrow reads a large row group as chunks that are slices of one buffer (offsets not from 0)."""
    n = 140_000  # Arrow's read batches are 131,072 rows
    docs = [[BOS, 3 + i % 4000, EOS] for i in range(n)]
    (tmp_path / "d" / "shards" / "web").mkdir(parents=True)
    path = tmp_path / "d" / "shards" / "web" / "part-00000.parquet"
    pq.write_table(pa.table({"input_ids": pa.array(docs, pa.list_(pa.int32()))}), path, row_group_size=n)
    assert len(pq.read_table(path).column("input_ids").chunks) > 1
    shard = {"path": str(path.relative_to(tmp_path / "d")), "documents": n, "tokens": 3 * n,
             "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}  # fmt: skip
    manifest = {"format": "hanyeong-dataset", "version": 1, "tokenizer": {"vocab_size": VOCAB, "bos_id": BOS, "eos_id": EOS},
                "sources": {"web": {"documents": n, "tokens": 3 * n, "shards": [shard]}}}  # fmt: skip
    (tmp_path / "d" / "manifest.json").write_text(json.dumps(manifest))
    (source,) = loader(tmp_path, {"sources": [{"dataset": "d"}]}).sources
    assert np.array_equal(source.offsets, 3 * np.arange(n + 1))
    assert np.array_equal(source.tokens, np.array(docs, np.int32).ravel())


def test_a_shard_of_another_document_count_than_its_manifest_is_refused(tmp_path):
    write_dataset(tmp_path / "d", {"web": [[BOS, 5, EOS], [BOS, 6, EOS]]})
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    manifest["sources"]["web"]["shards"][0]["documents"] = 3
    (tmp_path / "d" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="2 documents, 6 tokens; the manifest says 3, 6"):
        loader(tmp_path, {"sources": [{"dataset": "d"}]})


def test_whole_documents_that_exactly_fill_a_row_share_it(tmp_path):
    """split_documents = false: a document that fits the rest of a row exactly goes on it."""
    write_dataset(tmp_path / "d", {"web": [[BOS, 5, 6, EOS], [BOS, 7, 8, EOS]] * 3})
    batch = loader(tmp_path, {"sources": [{"dataset": "d"}], "split_documents": False}, seq_len=7, rows=3).next_batch()
    assert (rows_of(batch) != PAD).all() and batch.loss_mask.all()
    assert batch.segment_ids.tolist() == [[0, 0, 0, 0, 1, 1, 1]] * 3


@pytest.mark.parametrize("key", ["vocab_size", "bos_id", "eos_id"])
def test_datasets_differing_in_one_tokenizer_id_do_not_mix(datasets, tmp_path, key):
    root, _ = datasets
    tokenizer = {"vocab_size": VOCAB, "bos_id": BOS, "eos_id": EOS, "pad_id": PAD} | {key: 99}
    bos, eos = tokenizer["bos_id"], tokenizer["eos_id"]
    write_dataset(tmp_path / "other", {"web": [[bos, 9, eos]]}, tokenizer=tokenizer)
    with pytest.raises(ConfigError, match="tokenized differently"):
        loader(root, {"sources": [{"dataset": "stage2"}, {"dataset": str(tmp_path / "other")}]})


def test_after_a_document_longer_than_a_row_the_next_starts_a_fresh_row(tmp_path):
    """split_documents = false: the long document's last piece is padded, never followed by a part
    of the next document."""
    write_dataset(tmp_path / "d", {"web": [[BOS, 5, 6, 7, EOS], [BOS, 8, 9, 10, EOS]] * 2})
    batch = loader(tmp_path, {"sources": [{"dataset": "d"}], "split_documents": False}, seq_len=3, rows=4).next_batch()
    rows = rows_of(batch).tolist()
    assert [row[0] for row in rows] == [BOS, EOS, BOS, EOS] and rows[1][1:] == rows[3][1:] == [PAD] * 3


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_an_epochs_order_is_a_permutation_of_its_documents(n):
    from orchestration.data.loader import permutation

    for epoch in range(3):
        order = permutation(5, "d/web", epoch, n)
        assert order.dtype == np.int32 and sorted(order.tolist()) == list(range(n))
