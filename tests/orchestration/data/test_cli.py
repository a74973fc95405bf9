"""`hanyeong data ...` as a user runs it: summaries, tables, and one-line errors."""

from __future__ import annotations

import json

import pytest

from tests.orchestration.data.support import ITEMS, make_corpus, write_benchmark, write_jsonl
from tests.tokenizer.test_cli import assert_one_line_error, hanyeong


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    corpus = make_corpus(root / "corpus", korean=800)
    write_jsonl(corpus / "planted.jsonl", [{"text": f"뉴스 본문입니다. {item}"} for item in ITEMS])
    table = write_benchmark(root / "bench")
    (root / "prepare.toml").write_text(
        '[decontaminate]\nroot = "bench"\n[[decontaminate.benchmarks]]\nname = "toy"\nfiles = ["toy.jsonl"]\n'
        'fields = ["question"]\n[shards]\ntext_bytes_per_shard = 100000\n',
        encoding="utf-8",
    )
    assert table["root"] == str(root / "bench")
    return root, corpus


@pytest.mark.parametrize(
    "args", [["data"], ["data", "prepare"], ["data", "decontaminate"], ["data", "inspect"]]
)
def test_help(args):
    assert b"Usage" in hanyeong(*args, "--help").stdout


def test_prepare_inspect_and_rerun(setup, small_tokenizer_dir):
    root, corpus = setup
    out = root / "ds"
    args = (
        "data",
        "prepare",
        corpus,
        "-t",
        small_tokenizer_dir,
        "--out",
        out,
        "--config",
        root / "prepare.toml",
        "--num-cpus",
        2,
        "-q",
    )
    summary = hanyeong(*args).stdout.decode()
    assert (
        f"wrote {out}" in summary
        and "decontaminate 4 (toy 4)" in summary
        and "3 sources" in summary
    )
    assert "up to date" in hanyeong(*args).stdout.decode()  # no Ray, no work

    tables = hanyeong("data", "inspect", out).stdout.decode()
    assert "reviews" in tables and "decontaminate:toy" in tables and "languages" in tables
    counts = json.loads(hanyeong("data", "inspect", out, "--json").stdout)
    assert counts["drops"]["decontaminate:toy"] == {"planted": 4}
    assert counts["totals"]["read"] == counts["totals"]["documents"] + counts["totals"]["dropped"]


def test_decontaminate_alone(setup):
    root, corpus = setup
    out = root / "clean"
    summary = hanyeong(
        "data", "decontaminate", corpus, "--config", root / "prepare.toml", "--out", out, "-q"
    ).stdout
    assert b"removed 4 (toy 4)" in summary
    report = json.loads((out / "report.json").read_text())
    assert (
        report["documents"]["removed"] == {"toy": 4} and report["sources"]["planted"]["kept"] == 0
    )
    assert len((out / "removed.jsonl").read_text().splitlines()) == 4
    kept = [
        json.loads(line) for line in (out / "documents" / "reviews.jsonl").read_text().splitlines()
    ]
    assert len(kept) == 800 and set(kept[0]) == {"id", "language", "text"}


def test_dry_run_prints_the_resolved_config(setup):
    root, _ = setup
    printed = json.loads(
        hanyeong(
            "data",
            "prepare",
            "-t",
            "x",
            "--out",
            "y",
            "--config",
            root / "prepare.toml",
            "--dry-run",
        ).stdout
    )
    assert (
        printed["decontaminate"]["benchmarks"][0]["name"] == "toy"
        and printed["filters"]["length"]["min_chars"] == 16
    )


def test_errors_are_one_line(setup, tmp_path, small_tokenizer_dir):
    _, corpus = setup
    bad = tmp_path / "bad.toml"
    bad.write_text("[filters.length]\nmin_char = 3\n")

    def run(*args):
        return hanyeong("data", *args, check=False)

    assert_one_line_error(
        run("prepare", tmp_path / "nope", "-t", small_tokenizer_dir, "--out", tmp_path / "o"),
        "no such file or folder",
    )
    assert_one_line_error(
        run("prepare", corpus, "-t", small_tokenizer_dir, "--out", tmp_path / "o", "--config", bad),
        "filters.length: unknown key(s) min_char",
    )
    assert_one_line_error(
        run("prepare", corpus, "-t", tmp_path, "--out", tmp_path / "o"), "no tokenizer.json"
    )
    (tmp_path / "empty.txt").write_bytes(b"")
    assert_one_line_error(
        run("prepare", tmp_path / "empty.txt", "-t", small_tokenizer_dir, "--out", tmp_path / "o"),
        "no readable documents in the inputs: empty.txt (empty)",
    )
    assert_one_line_error(run("inspect", tmp_path), "not a hanyeong dataset")
    assert_one_line_error(
        run("decontaminate", corpus, "--config", bad, "--out", tmp_path / "d"), "unknown key(s)"
    )
    nobench = tmp_path / "nobench.toml"
    nobench.write_text("[dedup]\nnear = false\n")
    assert_one_line_error(
        run("decontaminate", corpus, "--config", nobench, "--out", tmp_path / "d"),
        "names no benchmark",
    )


def test_the_cli_and_the_pipeline_import_no_ray():
    from tests.test_imports import loaded_after

    loaded = loaded_after("import orchestration.data.cli, orchestration.data.prepare")
    assert not loaded & {"ray", "pyarrow", "tokenizers", "kiwipiepy"}
