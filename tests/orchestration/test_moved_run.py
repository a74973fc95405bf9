"""Identity by content: a finished run whose repository (recipe and inputs) was moved elsewhere, and
then whose run directory was moved too, reruns nothing: no tokenizer training, no data preparation,
no stage; an input whose bytes change reruns what reads it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from orchestration.pipeline.driver import run_pipeline

pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[2]

RECIPE = """
[run]
name = "moved"
seed = 0
backend = "torch"
preset = "tiny"
vocab_size = 1000

[run.tokenizer]
train_inputs = ["data/alice.txt.gz"]
vocab_size = 1000

[[run.datasets]]
name = "traces"
inputs = ["data/traces.jsonl"]
format = "chat"

[[stage]]
name = "sft"
kind = "sft"
start = "init"
token_budget = 576
seq_len = 48
batch_tokens = 192
[stage.data]
sources = [{ dataset = "traces", weight = 1.0 }]
"""


def make_repo(root: Path) -> Path:
    (root / "data").mkdir(parents=True)
    shutil.copy(ROOT / "data" / "quickstart" / "alice_in_wonderland.txt.gz", root / "data" / "alice.txt.gz")
    shutil.copy(ROOT / "data" / "reasoning" / "arithmetic-traces.jsonl", root / "data" / "traces.jsonl")
    (root / "recipes").mkdir()
    (root / "recipes" / "tiny.toml").write_text(RECIPE.replace('"data/', '"../data/'), encoding="utf-8")
    return root / "recipes" / "tiny.toml"


def written(run_dir: Path) -> dict[str, int]:
    """When the tokenizer, the dataset and the stage's checkpoint were last written."""
    files = (run_dir / "tokenizer" / "tokenizer.json", run_dir / "datasets" / "traces" / "manifest.json",
             run_dir / "stages" / "01-sft" / "checkpoint" / "checkpoint.json")  # fmt: skip
    return {f.parent.name: f.stat().st_mtime_ns for f in files}


@pytest.mark.ray
def test_a_moved_repository_and_run_directory_rerun_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the input-hash cache of this test only
    recipe = make_repo(tmp_path / "repo")
    first = run_pipeline(recipe, tmp_path / "run", num_cpus=2)
    assert first["ran"] == ["sft"]
    before = written(tmp_path / "run")

    shutil.copytree(tmp_path / "repo", tmp_path / "elsewhere" / "repo")  # copied: new inodes, same bytes
    shutil.rmtree(tmp_path / "repo")
    lines = []
    moved = run_pipeline(tmp_path / "elsewhere" / "repo" / "recipes" / "tiny.toml", tmp_path / "run", num_cpus=2,
                         echo=lines.append)  # fmt: skip
    assert moved["ran"] == [] and written(tmp_path / "run") == before, lines

    shutil.move(tmp_path / "run", tmp_path / "run-moved")
    again = run_pipeline(tmp_path / "elsewhere" / "repo" / "recipes" / "tiny.toml", tmp_path / "run-moved", num_cpus=2)
    assert again["ran"] == [] and written(tmp_path / "run-moved") == before

    traces = tmp_path / "elsewhere" / "repo" / "data" / "traces.jsonl"
    traces.write_text(traces.read_text(encoding="utf-8").replace("The answer is", "It is"), encoding="utf-8")
    changed = run_pipeline(tmp_path / "elsewhere" / "repo" / "recipes" / "tiny.toml", tmp_path / "run-moved", num_cpus=2)
    assert changed["ran"] == ["sft"]  # new bytes: the data is prepared again and the stage reruns
