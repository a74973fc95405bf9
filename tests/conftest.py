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
settings.register_profile("ci", derandomize=True, deadline=None, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "data" / "quickstart"
SHARED = Path(os.environ.get("HANYEONG_SHARED", REPO.parent / "shared"))
SHARED_DATA = SHARED / "data"
PEERS = SHARED / "peers"


def _needs(folder: Path):
    """Mark a test `shared_data` (`-m "not shared_data"` deselects it) and skip it without `folder`."""
    reason = f"needs ../shared/{folder.name} beside the checkout"
    skip = pytest.mark.skipif(not folder.is_dir(), reason=reason)

    def mark(test):
        return pytest.mark.shared_data(skip(test))

    return mark


needs_shared_data = _needs(SHARED_DATA)
needs_peers = _needs(PEERS)


def shrink_recipe(recipe: Path, factor: int, first_checkpoint_tokens: int | None = None) -> None:
    """Divide every token count of a copied quickstart recipe (budgets, ramp points, checkpoint
    spacing) by `factor`: the default run's short versions of the full-budget (`slow`) tests. The DPO
    stage keeps its 24 steps (about 11 s here): in 6 its held-back pairs' accuracy only drifts.
    `first_checkpoint_tokens` replaces the first stage's checkpoint spacing."""
    import re

    stages = recipe.read_text().split("\n[[stage]]\n")
    n = 0
    for i, stage in enumerate(stages[1:], 1):
        if 'kind = "dpo"' not in stage:
            stages[i], count = re.subn(r"^(token_budget|after_tokens|checkpoint_every_tokens) = ([\d_]+)",
                                       lambda m: f"{m[1]} = {int(m[2]) // factor}", stage, flags=re.M)  # fmt: skip
            n += count
    assert n == 8, f"{recipe}: {n} token counts (4 budgets, 2 ramp points, 2 checkpoint spacings expected)"
    text = "\n[[stage]]\n".join(stages)
    if first_checkpoint_tokens is not None:
        text = re.sub(r"^checkpoint_every_tokens = \d+", f"checkpoint_every_tokens = {first_checkpoint_tokens}",
                      text, count=1, flags=re.M)  # fmt: skip
    recipe.write_text(text)


def quickstart_korean(n: int) -> list[str]:
    with gzip.open(QUICKSTART / "nsmc_reviews.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for _, line in zip(range(n), f)]


def quickstart_english(book: str = "sherlock") -> list[str]:
    with gzip.open(QUICKSTART / f"{book}.txt.gz", "rt", encoding="utf-8") as f:
        return [line for line in f.read().splitlines() if line.strip()]


def write_small_corpus(root: Path) -> Path:
    """~1 MB of the quickstart corpus in `root`: Korean reviews and an English book."""
    (root / "ko.jsonl").write_text(
        "\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in quickstart_korean(8000)) + "\n", encoding="utf-8"
    )
    (root / "en.txt").write_text("\n".join(quickstart_english()) + "\n", encoding="utf-8")
    return root


def train_small_tokenizer(corpus: Path, out: Path, cache: Path) -> Path:
    """The 3,000-id morpheme-aware tokenizer the tests share (mostly Korean, as the quickstart's)."""
    from tokenizer.sampling import SampleConfig
    from tokenizer.train import TrainConfig, train_tokenizer

    config = TrainConfig(vocab_size=3000, morphemes=("E",), sample=SampleConfig(ko_share=0.8))
    train_tokenizer([str(corpus)], out, config, workers=2, cache_dir=cache)
    return out


# A directory holding that tokenizer, trained before (benchmarks/mutations.py trains it once for its
# hundreds of test sessions); unset, each session trains its own.
REUSED_TOKENIZER = os.environ.get("HANYEONG_TEST_TOKENIZER")


@pytest.fixture(autouse=True, scope="session")
def loader_cache(tmp_path_factory):
    """The training loader's token cache (orchestration/data/token_cache.py) of this session only,
    never the user's ~/.cache; subprocesses and a local Ray's workers inherit it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HANYEONG_LOADER_CACHE", str(tmp_path_factory.mktemp("loader-cache")))
        yield


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    return write_small_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def small_tokenizer_dir(small_corpus, tmp_path_factory) -> Path:
    """A 3,000-id morpheme-aware tokenizer trained once per test session."""
    if REUSED_TOKENIZER:
        return Path(REUSED_TOKENIZER)
    out, cache = tmp_path_factory.mktemp("tok"), tmp_path_factory.mktemp("cache")
    return train_small_tokenizer(small_corpus, out, cache)


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
