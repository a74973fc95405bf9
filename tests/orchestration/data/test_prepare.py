"""`prepare` end to end on a local Ray: the shard contract, accounting, reruns, bad inputs, crashes."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestration.data import prepare as prepare_module
from orchestration.data.clean import clean_text
from orchestration.data.config import PrepareConfig, ShardConfig
from orchestration.data.documents import Document
from orchestration.data.prepare import Steps, prepare
from orchestration.data.prepare_tasks import ChunkRunner
from orchestration.data.shards import ShardWriter, file_sha256, tokenize_shard, tokenizer_info
from hanyeong.errors import DataError
from tests.conftest import quickstart_korean
from tests.orchestration.data.support import (  # noqa: F401
    ITEMS,
    make_corpus,
    ray_local,
    write_benchmark,
    write_jsonl,
)

SCHEMA = pa.schema(
    [("id", pa.string()), ("language", pa.string()), ("input_ids", pa.list_(pa.int32()))]
)


def messy_corpus(root: Path) -> Path:
    make_corpus(root / "corpus")
    (root / "corpus" / "news").mkdir()
    news = [
        {"text": f"{quickstart_korean(3000)[2000 + i]} 그리고 {item}"}
        for i, item in enumerate(ITEMS)
    ]
    news += [{"text": "똑같은 기사가 여러 번 실렸습니다. 복사된 기사는 한 번만 남아야 합니다."}] * 3
    write_jsonl(root / "corpus" / "news" / "part1.jsonl", news)
    (root / "corpus" / "news" / "broken.jsonl").write_text(
        '{"text": "좋은 줄입니다 그리고 조금 더 길게 씁니다"}\n{not json\n', encoding="utf-8"
    )
    (root / "corpus" / "news" / "latin1.txt").write_bytes(
        "caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1")
    )
    (root / "corpus" / "news" / "empty.txt").write_bytes(b"")
    return root / "corpus"


def config_for(root: Path, **shards) -> PrepareConfig:
    return PrepareConfig.from_dict(
        {
            "decontaminate": write_benchmark(root / "bench"),
            "shards": {"text_bytes_per_shard": 60_000, **shards},
        }
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory, small_tokenizer_dir, ray_local):  # noqa: F811
    root = tmp_path_factory.mktemp("prep")
    corpus, config = messy_corpus(root), config_for(root)
    manifest = prepare([str(corpus)], small_tokenizer_dir, root / "ds", config)
    return root, corpus, config, manifest


def test_shard_contract(built, small_tokenizer):
    root, _, _, manifest = built
    tok = manifest["tokenizer"]
    assert manifest["format"] == "hanyeong-dataset" and manifest["version"] == 1
    assert (
        (tok["bos_id"], tok["eos_id"]) == (1, 2)
        and tok["vocab_size"] == 3000
        and len(tok["sha256"]) == 64
    )
    assert set(manifest["sources"]) == {"book", "reviews", "news"}
    assert len(manifest["sources"]["reviews"]["shards"]) > 1  # cut by text_bytes_per_shard
    for name, source in manifest["sources"].items():
        documents = tokens = 0
        for i, shard in enumerate(source["shards"]):
            assert shard["path"] == f"shards/{name}/part-{i:05d}.parquet"
            path = root / "ds" / shard["path"]
            assert file_sha256(path) == shard["sha256"] and path.stat().st_size == shard["bytes"]
            table = pq.read_table(path)
            assert table.schema.remove_metadata() == SCHEMA
            ids = table.column("input_ids").to_pylist()
            assert all(x[0] == 1 and x[-1] == 2 and 1 not in x[1:-1] for x in ids)
            assert shard["documents"] == table.num_rows and shard["tokens"] == sum(map(len, ids))
            documents, tokens = documents + shard["documents"], tokens + shard["tokens"]
        assert (source["documents"], source["tokens"]) == (documents, tokens)
    first = (
        pq.read_table(root / "ds" / manifest["sources"]["reviews"]["shards"][0]["path"])
        .slice(0, 20)
        .to_pylist()
    )
    raw = {f"reviews.jsonl#{i}": t for i, t in enumerate(quickstart_korean(1500))}
    for row in first:
        assert small_tokenizer.decode(row["input_ids"][1:-1]) == clean_text(raw[row["id"]])
        assert row["language"] == "ko"


def test_every_document_is_accounted_for(built):
    _, _, _, manifest = built
    steps = {s["step"]: s for s in manifest["steps"]}
    for source in manifest["sources"].values():
        assert source["read"] == source["documents"] + sum(source["dropped"].values())
        assert source["read"] == sum(lang["read"] for lang in source["languages"].values())
    assert steps["ingest"]["documents"] == sum(s["read"] for s in manifest["sources"].values())
    chain = ["clean", "filter", "dedup", "decontaminate"]
    assert steps["clean"]["documents_in"] == steps["ingest"]["documents"]
    for before, after in itertools.pairwise(chain):
        assert steps[before]["documents_out"] == steps[after]["documents_in"]
    for name in chain:
        assert (
            steps[name]["documents_in"] - sum(steps[name]["dropped"].values())
            == steps[name]["documents_out"]
        )
    assert steps["tokenize"]["documents"] == steps["decontaminate"]["documents_out"]


def test_bad_files_and_records_are_counted_by_name(built):
    _, _, _, manifest = built
    ingest = manifest["steps"][0]
    skipped = {Path(f["path"]).name: f["reason"] for f in ingest["files_skipped"]}
    assert skipped == {"latin1.txt": skipped["latin1.txt"], "empty.txt": "empty"}
    assert "UTF-8" in skipped["latin1.txt"]
    assert ingest["records_skipped"] == {"invalid JSON line": 1}


def test_planted_benchmark_items_and_duplicates_are_dropped(built):
    _, _, _, manifest = built
    steps = {s["step"]: s for s in manifest["steps"]}
    assert steps["decontaminate"]["dropped"] == {"toy": len(ITEMS)}
    assert manifest["sources"]["news"]["dropped"]["decontaminate:toy"] == len(ITEMS)
    assert {e["id"] for e in steps["decontaminate"]["examples"]} == {
        f"news/part1.jsonl#{i}" for i in range(len(ITEMS))
    }
    assert manifest["sources"]["news"]["dropped"]["dedup:exact"] == 2


@pytest.mark.parametrize(
    "chunk_tasks, chunk_documents, driver_reads",
    [(0, None, True), (1, 97, False), (3, 97, False), (2, 50, True)],
)
def test_the_dataset_is_the_same_on_any_number_of_workers(
    built, small_tokenizer_dir, tmp_path, monkeypatch, chunk_tasks, chunk_documents, driver_reads
):
    """The steps in this process (0), or in Ray tasks one (1) or several at a time over chunks of
    any size, files read by Ray tasks or (as on a cluster of several nodes) by the driver: the same
    manifest but for timings, and the same shard bytes."""
    root, corpus, config, manifest = built
    if chunk_documents:
        monkeypatch.setattr(prepare_module, "BATCH_DOCUMENTS", chunk_documents)
    if driver_reads:
        monkeypatch.setattr(ChunkRunner, "reads_files", lambda self: False)
    other = prepare([str(corpus)], small_tokenizer_dir, tmp_path / "ds", config, chunk_tasks=chunk_tasks)
    assert {**other, "seconds": None} == {**manifest, "seconds": None}
    for source in other["sources"].values():
        for shard in source["shards"]:
            assert file_sha256(tmp_path / "ds" / shard["path"]) == shard["sha256"]
    assert set(other["seconds"]) >= {"clean", "filter", "dedup", "decontaminate", "waiting_for_ray"}


def test_shards_of_texts_left_in_the_object_store_are_the_same(
    tmp_path, small_tokenizer_dir, ray_local  # noqa: F811
):
    """ShardWriter given references into Ray's object store writes the bytes it writes from texts."""
    tok, texts = tokenizer_info(small_tokenizer_dir), quickstart_korean(300)[:200]
    config = ShardConfig(text_bytes_per_shard=4000)
    direct = ShardWriter(tmp_path / "a", tok, config, lambda: ray_local)
    for i, text in enumerate(texts):
        direct.add(Document(f"r#{i}", "reviews", "ko", text))
    stored = ShardWriter(tmp_path / "b", tok, config, lambda: ray_local)
    refs = [ray_local.put(texts[:120]), ray_local.put(texts[120:])]
    for i, text in enumerate(texts):
        where = (refs[0], i) if i < 120 else (refs[1], i - 120)
        stored.add_text("reviews", f"r#{i}", "ko", where, len(text.encode("utf-8")))
    shards = direct.close()
    assert len(shards["reviews"]) > 2 and stored.close() == shards


def test_rerun_is_a_noop_and_a_forced_rebuild_is_identical(built, small_tokenizer_dir):
    root, corpus, config, manifest = built
    again = prepare([str(corpus)], small_tokenizer_dir, root / "ds", config)
    assert again.get("up_to_date") and again["content_hash"] == manifest["content_hash"]
    rebuilt = prepare([str(corpus)], small_tokenizer_dir, root / "ds2", config, force=True)
    assert rebuilt["content_hash"] == manifest["content_hash"]
    assert [s["sha256"] for s in rebuilt["sources"]["reviews"]["shards"]] == [
        s["sha256"] for s in manifest["sources"]["reviews"]["shards"]
    ]
    changed = prepare(
        [str(corpus)],
        small_tokenizer_dir,
        root / "ds",
        config_for(root, text_bytes_per_shard=90_000),
    )
    assert not changed.get("up_to_date") and changed["inputs_hash"] != manifest["inputs_hash"]


def test_a_crash_leaves_the_previous_dataset(built, small_tokenizer_dir, monkeypatch):
    root, corpus, config, _ = built
    before = json.loads((root / "ds" / "manifest.json").read_text())

    def boom(self, docs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Steps, "decontaminate", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        prepare([str(corpus)], small_tokenizer_dir, root / "ds", config, force=True)
    assert json.loads((root / "ds" / "manifest.json").read_text()) == before
    assert not [p for p in root.iterdir() if p.name.startswith(".ds")]  # no temporary folders left


def test_nothing_readable_is_one_error(tmp_path, small_tokenizer_dir, ray_local):  # noqa: F811
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_bytes(b"\xff\xfe\x00b\x00a\x00d\x00")
    (tmp_path / "in" / "b.txt").write_bytes(b"")
    with pytest.raises(DataError, match=r"no readable documents.*a\.txt.*b\.txt \(empty\)"):
        prepare([str(tmp_path / "in")], small_tokenizer_dir, tmp_path / "ds", PrepareConfig())
    assert not (tmp_path / "ds").exists()


def test_refuses_to_replace_a_folder_that_is_not_a_dataset(tmp_path, small_tokenizer_dir):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    (tmp_path / "in.txt").write_text("한 줄의 문서입니다. 조금 더 길게 씁니다.\n")
    with pytest.raises(DataError, match="not a hanyeong dataset"):
        prepare([str(tmp_path / "in.txt")], small_tokenizer_dir, tmp_path / "mine", PrepareConfig())


def test_tokenize_shard_runs_alone(tmp_path, small_tokenizer_dir, small_tokenizer):
    tok = tokenizer_info(small_tokenizer_dir)
    stats = tokenize_shard(
        tok, str(tmp_path / "p.parquet"), ["a#0", "b#1"], ["ko", "en"], ["안녕하세요", "Hello"]
    )
    rows = pq.read_table(tmp_path / "p.parquet").to_pylist()
    assert rows[0]["input_ids"] == [1, *small_tokenizer.encode("안녕하세요"), 2]
    assert stats["documents"] == 2 and stats["tokens"] == sum(len(r["input_ids"]) for r in rows)
    assert stats["languages"]["en"]["documents"] == 1


def test_local_ray_listens_on_loopback_only(ray_local):  # noqa: F811
    assert {node["NodeManagerAddress"] for node in ray_local.nodes()} == {"127.0.0.1"}
    assert ray_local.get_runtime_context().gcs_address.startswith("127.0.0.1:")


def test_ray_tasks_read_the_files_on_a_one_machine_ray(ray_local):  # noqa: F811
    assert ChunkRunner(PrepareConfig(), None, lambda: ray_local).reads_files()
    assert not ChunkRunner(PrepareConfig(), None, None, in_flight=0).reads_files()
