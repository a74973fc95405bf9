"""The README's commands work as written, CI runs its test command, and the notebook executes."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, shrink_recipe

README = (REPO / "README.md").read_text(encoding="utf-8")


def section_command(heading: str) -> str:
    """The first line of the first bash block under a README heading."""
    section = README.split(f"## {heading}", 1)[1]
    return re.search(r"```bash\n(.+?)\n", section).group(1).strip()


def test_ci_runs_the_readme_test_command():
    assert section_command("Tests") in (REPO / ".ci" / "run").read_text()


def run_as_written(command: list[str], cwd: Path, shrink: int = 1) -> subprocess.CompletedProcess:
    """A README command run where its relative paths hold (a copy of data/ and recipes/); `shrink`
    divides every token count of the copied quickstart recipe."""
    for folder in ("data", "recipes"):
        shutil.copytree(REPO / folder, cwd / folder)
    if shrink > 1:
        shrink_recipe(cwd / "recipes" / "quickstart.toml", shrink)
    env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(cwd / "cache")}
    return subprocess.run([sys.executable, "-m", "orchestration.cli", *command[1:]], cwd=cwd,
                          capture_output=True, text=True, env=env)  # fmt: skip


@pytest.mark.slow
def test_main_job_as_written(tmp_path):
    """The quickstart pipeline: every stage done, its loss falls, and SFT teaches the chat template."""
    run = run_main_command(tmp_path)
    assert_stages_done_and_learning(run)
    assert_sft_learned_the_template(run)
    assert_dpo_raised_held_back_accuracy(run, by=0.05)  # measured: 50% -> 60.0% and 64.4%


# The default run's version: the same command as written, on the quickstart recipe with every token
# count (budgets, ramp points, checkpoint spacing) cut by this factor: 1/4 of the steps (~1 min).
SHORT = 4


def test_main_command_as_written_on_a_quarter_budget(tmp_path):
    """The README's main command as written, through every stage of the quickstart recipe (tokenizer,
    data, ramps, long context, SFT) on a quarter of its tokens, to the same laws (measured: losses
    8.98 -> 7.38, 7.24 -> 6.78, 6.67 -> 6.59, 7.17 -> 6.88; SFT raises p([|endofturn|]) 26x)."""
    run = run_main_command(tmp_path, shrink=SHORT)
    stages = assert_stages_done_and_learning(run)
    assert [s["tokens"] for s in stages] == [76_800, 51_200, 32_768, 51_200, 49_152]
    assert_sft_learned_the_template(run)
    assert_dpo_raised_held_back_accuracy(run)
    assert_run_notebook_plots(run)  # on this run: the notebook needs one, and CI has time for one


def run_main_command(tmp_path: Path, shrink: int = 1) -> Path:
    command = shlex.split(section_command("Quickstart"))
    assert command[:3] == ["hanyeong", "pipeline", "run"]
    result = run_as_written([*command, "--quiet"], tmp_path, shrink)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path / "runs" / "quickstart"


def assert_stages_done_and_learning(run: Path) -> list[dict]:
    """Every stage done, and the mean loss of its last tenth of steps below its first tenth's."""
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    assert [s["status"] for s in stages] == ["done"] * 5
    for stage_dir in sorted((run / "stages").iterdir()):
        losses = [json.loads(line)["loss"] for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
        tenth = max(1, len(losses) // 10)
        assert sum(losses[-tenth:]) / tenth < sum(losses[:tenth]) / tenth, stage_dir.name
    assert (run / "loss.png").stat().st_size > 0
    report = (run / "report.md").read_text()  # every stage's [stage.eval]: the run's eval table
    assert "## Evaluation" in report and "| 4. stage4-sft |" in report.split("## Evaluation")[1]
    assert (run / "eval.png").stat().st_size > 0
    # The document stages score held-out documents; general pretraining generalises to them (a
    # fresh model's loss is ln 8000 = 8.99 nats per token).
    evals = [json.loads(path.read_text().splitlines()[-1]) for path in sorted((run / "stages").glob("*/eval.jsonl"))]
    assert [line.get("val_held_out") for line in evals[:4]] == [True] * 4
    assert max(evals[0]["val_loss"].values()) < 8.5, evals[0]["val_loss"]
    return stages


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
    pytest.importorskip("nbclient")
    if not list((REPO / "benchmarks" / "results").glob("tokenizer-*.json")):
        pytest.skip("no benchmark results committed yet")
    assert execute_notebook("tokenizer_compression.ipynb") >= 1


def assert_run_notebook_plots(run: Path) -> None:
    """notebooks/training_run.ipynb executes on the run directory (HANYEONG_RUN) and draws its
    three plots: the loss, the [stage.eval] curves and the DPO stage's rewards."""
    if importlib.util.find_spec("nbclient") is None:
        return  # the notebook extras are not installed; the run's own laws were checked
    assert execute_notebook("training_run.ipynb", HANYEONG_RUN=str(run)) >= 3


def execute_notebook(name: str, **env: str) -> int:
    """Run notebooks/NAME from notebooks/ with `env` set for its kernel; the PNG images it drew."""
    import nbclient
    import nbformat

    notebook = nbformat.read(REPO / "notebooks" / name, as_version=4)
    with pytest.MonkeyPatch.context() as patch:  # the kernel inherits this process's environment
        for key, value in env.items():
            patch.setenv(key, value)
        nbclient.NotebookClient(notebook, timeout=300, resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    return sum(o.get("output_type") == "display_data" and "image/png" in o.get("data", {}) for o in outputs)


def assert_dpo_raised_held_back_accuracy(run: Path, by: float = 0.0) -> None:
    """The DPO stage's held-back pairs (never trained on) prefer the chosen answer more at its end
    than at its start (50%: the start model is the reference)."""
    held = json.loads((run / "stages" / "05-stage5-dpo" / "preference.json").read_text())
    assert held["held_out"] == 45 and held["start"]["accuracy"] == 0.5
    assert held["end"]["accuracy"] > held["start"]["accuracy"] + by, held
