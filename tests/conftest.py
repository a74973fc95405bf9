"""Shared fixtures: the shipped quickstart corpus, ../shared/data when present, a small trained tokenizer."""

from __future__ import annotations

import gzip
import json
import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

# CI runs the same examples every time (a failure there is reproducible, never a fluke of the draw);
# developers' runs keep exploring new ones.
settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "data" / "quickstart"
SHARED = Path(os.environ.get("HANYEONG_SHARED", REPO.parent / "shared"))
SHARED_DATA = SHARED / "data"
PEERS = SHARED / "peers"

needs_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data beside the checkout")
needs_peers = pytest.mark.skipif(not PEERS.is_dir(), reason="needs ../shared/peers beside the checkout")


def quickstart_korean(n: int) -> list[str]:
    with gzip.open(QUICKSTART / "nsmc_reviews.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for _, line in zip(range(n), f)]


def quickstart_english(book: str = "sherlock") -> list[str]:
    with gzip.open(QUICKSTART / f"{book}.txt.gz", "rt", encoding="utf-8") as f:
        return [line for line in f.read().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """~1 MB of the quickstart corpus: Korean reviews and an English book."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "ko.jsonl").write_text(
        "\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in quickstart_korean(8000)) + "\n", encoding="utf-8"
    )
    (root / "en.txt").write_text("\n".join(quickstart_english()) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def small_tokenizer_dir(small_corpus, tmp_path_factory) -> Path:
    """A 3,000-id morpheme-aware tokenizer trained once per test session."""
    from tokenizer.train import TrainConfig, train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    train_tokenizer([str(small_corpus)], out, TrainConfig(vocab_size=3000), workers=2,
                    cache_dir=tmp_path_factory.mktemp("cache"))
    return out


@pytest.fixture(scope="session")
def small_tokenizer(small_tokenizer_dir):
    from tokenizer.bbpe import BBPETokenizer

    return BBPETokenizer.load(small_tokenizer_dir)


def cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """`hanyeong ARGS` in-process through the console entry point: (exit code, stdout, stderr)."""
    from orchestration.cli import main

    monkeypatch.setattr(sys, "argv", ["hanyeong", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out = capsys.readouterr()
    return exit_info.value.code or 0, out.out, out.err
