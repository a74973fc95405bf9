"""Helpers and fixtures shared by the data-preparation tests (imported by name, not a conftest)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import quickstart_english, quickstart_korean

# Benchmark items long enough to have 50-character windows, Korean and English.
ITEMS = [
    "제니는 사과 12개를 샀고, 그중 절반을 친구에게 주었습니다. 남은 사과로 파이를 3개 만들려면 파이 하나에 사과가 몇 개 들어가나요?",
    "조선 영조 때 균역법을 시행하여 군포 부담을 1필로 줄였으며, 이로 인해 부족해진 재정은 결작과 선무군관포 등으로 보충하였다.",
    (
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips did Natalia sell altogether in April and May?"
    ),
    "What happens to you if you eat watermelon seeds? The watermelon seeds pass through your digestive system.",
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8"
    )
    return path


def write_benchmark(folder: Path, items: list[str] = ITEMS, name: str = "toy") -> dict:
    """A benchmark file of `items` (field `question`); returns its [decontaminate] table."""
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / f"{name}.jsonl", [{"question": item, "answer": "42"} for item in items])
    return {
        "root": str(folder),
        "benchmarks": [{"name": name, "files": [f"{name}.jsonl"], "fields": ["question"]}],
    }


def make_corpus(root: Path, korean: int = 1500, english: str = "sherlock") -> Path:
    """A small real corpus: Korean reviews (jsonl) and an English book (txt)."""
    root.mkdir(parents=True, exist_ok=True)
    write_jsonl(root / "reviews.jsonl", [{"text": t} for t in quickstart_korean(korean)])
    (root / "book.txt").write_text(
        "\n".join(quickstart_english(english)[:1500]) + "\n", encoding="utf-8"
    )
    return root


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray (2 CPUs, 127.0.0.1) per test module; `prepare` reuses it."""
    from orchestration.data.shards import ray_session

    with ray_session(num_cpus=2) as ray:
        yield ray
