"""The rooms of `orchestration` and what each may import (orchestration/__init__.py says why).

Read from the source, not by importing: an import inside a function counts too, since it is the
code's dependency all the same; only what it may reach differs (a worker runs a stage, a CLI drives
everything).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

ROOMS = ("core", "data", "pipeline", "cluster", "eval", "sampling")
# room -> the rooms its modules import at module level (besides itself)
AT_IMPORT = {"core": set(), "cluster": {"core"}, "data": {"core", "cluster"},
             "pipeline": {"core", "data", "cluster"},
             # eval scores checkpoints of runs: the chat template (data), a run's tokenizer (pipeline)
             "eval": {"core", "data", "pipeline"},
             # sampling renders prompts (data) and checks answers as eval's GSM8K does (eval)
             "sampling": {"core", "data", "eval"}}  # fmt: skip
# ... and may also reach from inside a function: a cluster worker runs the pipeline's stage, a job
# submits its recipe, a recipe's [stage.eval] scores its model with eval's tasks, eval and sampling
# shard their work over Ray (cluster), an online stage samples and scores (sampling)
IN_FUNCTIONS = {"core": set(), "cluster": {"pipeline"}, "data": set(), "pipeline": {"eval", "sampling"},
                "eval": {"cluster"}, "sampling": {"cluster", "pipeline"}}  # fmt: skip
BACKENDS = ("cuda_model", "mlx_model")
BASE = {"hanyeong": set(), "tokenizer": {"hanyeong"}}  # the packages under orchestration


def imports(path: Path) -> list[tuple[str, bool, int]]:
    """(module, at module level, line) of every import in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out.extend((name, id(node) in top, node.lineno) for name in names)
    return out


def modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def room_of(path: Path) -> str | None:
    parts = path.relative_to(REPO / "orchestration").parts
    return parts[0] if len(parts) > 1 and parts[0] in ROOMS else None


@pytest.mark.parametrize("path", modules("orchestration"), ids=lambda p: str(p.relative_to(REPO)))
def test_orchestration_rooms_import_only_what_they_may(path):
    room, wrong = room_of(path), []
    for name, at_import, line in imports(path):
        parts = name.split(".")
        if parts[0] in BACKENDS:
            wrong.append(f"line {line}: {name} (a backend is loaded by name: orchestration.core.backends)")
        if room is None or path.name == "cli.py" or parts[0] != "orchestration" or len(parts) < 2:
            continue  # the CLI modules drive every room
        target = parts[1]
        if target in ROOMS and target != room:
            allowed = AT_IMPORT[room] | (set() if at_import else IN_FUNCTIONS[room])
            if target not in allowed:
                wrong.append(f"line {line}: {name} ({room} may import {sorted(allowed) or 'no other room'})")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("package", ["hanyeong", "tokenizer", "cuda_model", "mlx_model"])
def test_lower_packages_never_import_upward(package):
    """hanyeong imports nothing of the project; tokenizer only hanyeong; a backend only the model
    core (never the pipeline, data or cluster, never the other backend)."""
    project = {"hanyeong", "tokenizer", "orchestration", *BACKENDS}
    wrong = []
    for path in modules(package):
        for name, _, line in imports(path):
            parts = name.split(".")
            if parts[0] not in project or parts[0] == package:
                continue
            if package in BASE:
                ok = parts[0] in BASE[package]
            else:
                ok = parts[0] in ("hanyeong", "tokenizer") or parts[:2] == ["orchestration", "core"]
            if not ok:
                wrong.append(f"{path.relative_to(REPO)}:{line}: {name}")
    assert not wrong, "\n".join(wrong)


def test_every_room_says_what_it_owns_and_may_import():
    for room in ROOMS:
        doc = ast.get_docstring(ast.parse((REPO / "orchestration" / room / "__init__.py").read_text()))
        assert doc and "May import" in doc, f"orchestration/{room}/__init__.py needs its docstring"
