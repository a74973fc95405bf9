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

from orchestration.data.loader import DRAW_BLOCK, MixtureConfig, MixtureLoader
from hanyeong.errors import CheckpointError, ConfigError, DataError
from tests.conftest import REPO

PAD, BOS, EOS, VOCAB = 0, 1, 2, 5000
FAST = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


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
