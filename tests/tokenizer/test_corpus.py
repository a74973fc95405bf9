"""Reading corpora: every format, every skip counted with its reason."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenizer.corpus import TextFields, expand_paths, read_corpus, read_file, source_namer
from hanyeong.errors import DataError


def read(path, *fields):
    return read_file(path, TextFields.parse(fields))


def test_txt_lines_are_documents_and_gz_is_transparent(tmp_path):
    (tmp_path / "a.txt").write_text("첫 줄\n\nsecond line\r\n", encoding="utf-8")
    with gzip.open(tmp_path / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write("압축된 줄\n")
    docs, report = read(tmp_path / "a.txt")
    assert docs == ["첫 줄", "second line"] and report.error is None
    assert read(tmp_path / "b.txt.gz")[0] == ["압축된 줄"]


def test_bom_is_not_text(tmp_path):
    (tmp_path / "bom.txt").write_bytes("\ufeff안녕\n".encode("utf-8"))
    assert read(tmp_path / "bom.txt")[0] == ["안녕"]


def test_jsonl_bad_lines_are_counted_not_fatal(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "좋다"}\nnot json\n{"other": 1}\n{"text": ""}\n{"text": "good"}\n', encoding="utf-8")
    docs, report = read(path)
    assert docs == ["좋다", "good"]
    assert report.records == 5
    assert dict(report.skipped) == {"invalid JSON line": 1, "no text field": 1, "empty text": 1}
    # Accounting: every record is either a document or counted with a reason.
    assert report.records == report.documents + report.skipped_records


def test_file_without_the_field_is_reported_by_name_with_its_fields(tmp_path):
    path = tmp_path / "reviews.jsonl"
    path.write_text('{"review": "a", "rating": 5}\n', encoding="utf-8")
    docs, report = read(path)
    assert docs == [] and "no field 'text'" in report.error and "review" in report.error


def test_several_fields_dotted_paths_lists_and_star(tmp_path):
    squad = {"data": [{"paragraphs": [{"context": "문단 하나"}, {"context": "문단 둘"}]}]}
    (tmp_path / "squad.json").write_text(json.dumps(squad, ensure_ascii=False), encoding="utf-8")
    assert read(tmp_path / "squad.json", "data.paragraphs.context")[0] == ["문단 하나", "문단 둘"]
    (tmp_path / "pairs.json").write_text(json.dumps([{"q": "질문", "a": "답"}]), encoding="utf-8")
    assert read(tmp_path / "pairs.json", "q", "a")[0] == ["질문", "답"]
    (tmp_path / "by_id.json").write_text(json.dumps({"1": "하나", "2": "둘"}), encoding="utf-8")
    assert read(tmp_path / "by_id.json", "*")[0] == ["하나", "둘"]


def test_json_array_saved_as_jsonl_is_read(tmp_path):
    path = tmp_path / "array.jsonl"
    path.write_text('[{"prompt": "하나"},\n {"prompt": "둘"}]\n', encoding="utf-8")
    assert read(path, "prompt")[0] == ["하나", "둘"]


def test_csv_and_tsv_columns(tmp_path):
    (tmp_path / "q.csv").write_text('Q,A\n"안녕, 친구",반가워\n', encoding="utf-8")
    assert read(tmp_path / "q.csv", "Q", "A")[0] == ["안녕, 친구", "반가워"]
    (tmp_path / "s.tsv").write_text('id\tsentence\n1\t그는 "그래" 했다\n', encoding="utf-8")
    assert read(tmp_path / "s.tsv", "sentence")[0] == ['그는 "그래" 했다']
    docs, report = read(tmp_path / "q.csv", "text")
    assert docs == [] and "no column 'text'" in report.error and "Q, A" in report.error


def test_parquet_column(tmp_path):
    pq.write_table(pa.table({"body": ["파케이", "parquet"], "n": [1, 2]}), tmp_path / "t.parquet")
    assert read(tmp_path / "t.parquet", "body")[0] == ["파케이", "parquet"]
    assert "no column" in read(tmp_path / "t.parquet")[1].error


@pytest.mark.parametrize(
    "name, data, reason",
    [
        ("empty.txt", b"", "empty"),
        ("blank.txt", b"\n \n", "empty"),
        ("euckr.txt", "한국어 텍스트".encode("euc-kr") * 10, "not valid UTF-8"),
        ("utf16.txt", "텍스트".encode("utf-16"), "UTF-8"),
        ("image.png", bytes(range(256)) * 4, "UTF-8"),
        ("tree.conllu", b"# text = x\n1\tx\n", "unsupported format (CoNLL-U)"),
        ("broken.json", b'{"text": ', "not valid JSON"),
        ("conversation.jsonl", "<사람>: 안녕\n<챗봇>: 네\n".encode(), "not JSON Lines"),
    ],
)
def test_unusable_files_get_one_clear_reason(tmp_path, name, data, reason):
    path = tmp_path / name
    path.write_bytes(data)
    docs, report = read(path)
    assert docs == [] and reason in report.error


def test_bad_line_in_a_good_text_file_is_skipped_and_counted(tmp_path):
    path = tmp_path / "mixed.txt"
    path.write_bytes("좋은 줄\n".encode() * 30000 + b"bad \xff line\n" + "마지막\n".encode())
    docs, report = read(path)
    assert len(docs) == 30001 and report.skipped["invalid UTF-8 line"] == 1


def test_truncated_gzip_keeps_what_was_read_and_says_why(tmp_path):
    blob = gzip.compress(("줄 하나\n" * 50000).encode())
    (tmp_path / "cut.txt.gz").write_bytes(blob[: len(blob) // 2])
    docs, report = read(tmp_path / "cut.txt.gz")
    assert docs and report.error.startswith("unreadable")


def test_unknown_suffix_is_sniffed_as_text(tmp_path):
    (tmp_path / "news.ko").write_text("한국어 문장\n", encoding="utf-8")
    docs, report = read(tmp_path / "news.ko")
    assert docs == ["한국어 문장"] and report.format == "txt (by content)"


def test_folders_expand_sorted_without_hidden_files(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text("x\n")
    (tmp_path / "1.txt").write_text("y\n")
    (tmp_path / ".hidden").write_text("z\n")
    assert [p.name for p in expand_paths([tmp_path])] == ["1.txt", "2.txt"]
    with pytest.raises(DataError, match="no such file"):
        expand_paths([tmp_path / "missing"])


def test_exclude_leaves_out_matching_files_and_refuses_to_leave_nothing(tmp_path):
    for rel in ("ko/law/a.jsonl", "ko/news/b.jsonl", "en/c.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x\n")
    kept = expand_paths([tmp_path / "ko", tmp_path / "en"], exclude=["*/ko/law/*"])
    assert [p.name for p in kept] == ["b.jsonl", "c.txt"]
    with pytest.raises(DataError, match="left after --exclude"):
        expand_paths([tmp_path / "ko"], exclude=["*.jsonl"])


def test_sources_are_folders_written_from_the_folder_holding_the_inputs(tmp_path):
    for rel in ("data/ko/law/a.jsonl", "data/ko/nsmc/x/b.jsonl", "data/en/top.txt.gz", "solo.jsonl"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x\n")
    name = source_namer([tmp_path / "data/ko", tmp_path / "data/en"])
    assert name(tmp_path / "data/ko/law/a.jsonl") == "ko/law"
    assert name(tmp_path / "data/ko/nsmc/x/b.jsonl") == "ko/nsmc/x"
    assert name(tmp_path / "data/en/top.txt.gz") == "en"
    assert source_namer([tmp_path / "solo.jsonl"])(tmp_path / "solo.jsonl") == "solo"


def test_parallel_reading_gives_the_same_documents_in_the_same_order(tmp_path):
    for i in range(6):
        (tmp_path / f"{i}.txt").write_text("".join(f"문서 {i}-{j}\n" for j in range(50)), encoding="utf-8")
    serial = [d for docs, _ in read_corpus([tmp_path], workers=1) for d in docs]
    parallel = [d for docs, _ in read_corpus([tmp_path], workers=2) for d in docs]
    assert serial == parallel and len(serial) == 300


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(min_size=1).filter(lambda s: s.strip()), max_size=20))
def test_jsonl_round_trip_keeps_every_document_exactly(tmp_path_factory, texts):
    path = tmp_path_factory.mktemp("rt") / "docs.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    docs, report = read(path)
    encodable = [t for t in texts if t.encode("utf-8", "surrogatepass")]
    assert docs == encodable
    assert report.records == report.documents + report.skipped_records
