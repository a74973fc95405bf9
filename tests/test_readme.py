"""The README's commands work as written, CI runs its test command, and the notebook executes."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")


def section_command(heading: str) -> str:
    """The first line of the first bash block under a README heading."""
    section = README.split(f"## {heading}", 1)[1]
    return re.search(r"```bash\n(.+?)\n", section).group(1).strip()


def test_ci_runs_the_readme_test_command():
    assert section_command("Tests") in (REPO / ".ci" / "run").read_text()


def run_as_written(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """A README command run where its relative paths hold (a copy of data/ and recipes/)."""
    for folder in ("data", "recipes"):
        shutil.copytree(REPO / folder, cwd / folder)
    env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(cwd / "cache")}
    return subprocess.run([sys.executable, "-m", "orchestration.cli", *command[1:]], cwd=cwd,
                          capture_output=True, text=True, env=env)  # fmt: skip


def test_main_job_as_written(tmp_path):
    """The quickstart pipeline: every stage done, its loss falls, and SFT teaches the chat template."""
    command = shlex.split(section_command("Quickstart"))
    assert command[:3] == ["hanyeong", "pipeline", "run"]
    result = run_as_written([*command, "--quiet"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "quickstart"
    manifest = json.loads((run / "manifest.json").read_text())
    stages = manifest["stages"]
    assert [s["status"] for s in stages] == ["done"] * 4
    for stage_dir in sorted((run / "stages").iterdir()):
        losses = [json.loads(line)["loss"] for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
        tenth = max(1, len(losses) // 10)
        assert sum(losses[-tenth:]) / tenth < sum(losses[:tenth]) / tenth, stage_dir.name
    assert (run / "loss.png").stat().st_size > 0
    assert_sft_learned_the_template(run)


def assert_sft_learned_the_template(run: Path) -> None:
    """After an answer the SFT model closes the turn with [|endofturn|] far more often than before SFT."""
    import numpy as np

    from orchestration.core.backends import get_backend
    from orchestration.core.batch import Batch
    from tokenizer.bbpe import BBPETokenizer

    backend, tok = get_backend("torch"), BBPETokenizer.load(run / "tokenizer")
    end_of_turn = tok.hf.token_to_id("[|endofturn|]")
    prompt = "[|system|][|endofturn|]\n[|user|]오늘 뭐 먹을까?\n[|assistant|]맛있는 거 드세요."
    ids = np.array([[tok.hf.token_to_id("[BOS]"), *tok.encode(prompt), end_of_turn]])
    before, after = (backend.load(run / "stages" / name / "checkpoint") for name in ("03-stage3-long-context", "04-stage4-sft"))
    batch = Batch.from_tokens(ids)
    gain = backend.logprobs(after, batch)[0, -1] - backend.logprobs(before, batch)[0, -1]
    assert gain > np.log(10), f"SFT raised p([|endofturn|]) only {np.exp(gain):.1f}x"


def test_tokenizer_command_as_written(tmp_path):
    command = shlex.split(README.split("The tokenizer alone", 1)[1].split("```bash\n", 1)[1].split("\n", 1)[0])
    assert command[:3] == ["hanyeong", "tokenizer", "train"]
    result = run_as_written([*command, "--quiet", "--cache-dir", str(tmp_path / "cache")], tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "runs" / "quickstart-tokenizer" / "report.json").read_text())
    assert report["vocab_size"] == 16000 and "held-out ko" in result.stdout


def test_notebook_executes(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(REPO / "notebooks" / "tokenizer_compression.ipynb", as_version=4)
    if not list((REPO / "benchmarks" / "results").glob("tokenizer-*.json")):
        pytest.skip("no benchmark results committed yet")
    nbclient.NotebookClient(notebook, timeout=300, resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {}) for o in outputs)
