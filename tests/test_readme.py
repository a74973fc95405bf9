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


def test_quickstart_command_as_written(tmp_path):
    command = shlex.split(section_command("Quickstart"))
    assert command[:3] == ["hanyeong", "tokenizer", "train"]
    shutil.copytree(REPO / "data", tmp_path / "data")  # run where the README's relative paths hold
    result = subprocess.run(
        [sys.executable, "-m", "orchestration.cli", *command[1:], "--quiet", "--cache-dir", str(tmp_path / "cache")],
        cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr
    out = tmp_path / "runs" / "quickstart-tokenizer"
    report = json.loads((out / "report.json").read_text())
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
