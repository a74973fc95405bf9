"""benchmarks/mutations.py's record keeping, on a module of two lines and its one test: a mutant's
first result is kept through reruns, and a resumed run that stops keeps every result recorded
before it (a stop once turned the mutants it had not reached back into "not run")."""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import time
from dataclasses import asdict

import pytest

from tests.conftest import REPO

SOURCE = "def inc(x, step=1):\n    return x + step\n"
TEST = "from tiny import inc\n\n\ndef test_inc():\n    assert inc(1, 1) == 2\n"  # the default is never used


@pytest.fixture(scope="module")
def mutations():
    sys.path.insert(0, str(REPO / "benchmarks"))  # it imports its neighbour hardware.py
    try:
        spec = importlib.util.spec_from_file_location("mutations", REPO / "benchmarks" / "mutations.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclass looks its module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return module


@pytest.fixture(scope="module")
def run(mutations, tmp_path_factory):
    """run(before, resume, minutes) -> the tiny module's mutants as run_module returns them, as dicts."""
    work = tmp_path_factory.mktemp("tiny")
    (work / "tiny.py").write_text(SOURCE)
    (work / "test_tiny.py").write_text(TEST)
    mutations.MODULES["tiny.py"] = ["test_tiny.py"]
    env = {**os.environ, "PYTHONPATH": str(work), "PYTHONDONTWRITEBYTECODE": "1", "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}

    def run_module(before=None, resume=False, minutes=10.0):
        deadline = time.monotonic() + 60 * minutes
        found, _ = mutations.run_module("tiny.py", work, env, deadline, lambda line: None, before, resume)
        assert (work / "tiny.py").read_text() == SOURCE  # the pristine file is back
        return [asdict(m) for m in found]

    return run_module


@pytest.fixture(scope="module")
def recorded(run):
    return run()


@pytest.fixture
def stopped(recorded):
    """The record of a run stopped before it reached `return None`."""
    return [m | ({"status": "not run", "first": ""} if m["change"] == "return None" else {}) for m in recorded]


def by_change(found):
    return {m["change"]: m for m in found}


def test_a_first_run_records_each_result_as_its_first(recorded, mutations):
    found = by_change(recorded)
    assert {c: (m["status"], m["first"]) for c, m in found.items()} == {
        "return None": ("killed", "killed"), "+ -> -": ("killed", "killed"), "1 -> 2": ("survived", "survived")}  # fmt: skip
    assert found["+ -> -"]["killer"] == "test_tiny.py::test_inc"
    first = mutations.first_run([mutations.Mutant(**m) for m in recorded])
    assert (first["ran"], first["caught"], first["survived"]) == (3, 2, 1)


def test_a_resumed_run_stopped_at_once_keeps_every_recorded_result(run, stopped):
    for resume in (False, True):
        assert run(before=stopped, resume=resume, minutes=0) == stopped


def test_resume_runs_the_mutants_not_reached_and_keeps_first_results(run, stopped, mutations):
    survivors = by_change(run(before=stopped))
    assert survivors["return None"]["status"] == "not run"  # --survivors leaves it
    assert survivors["1 -> 2"]["first"] == "survived"  # run again: its first result stays
    mutations.EQUIVALENT[("tiny.py", "def inc(x, step=1):", "1 -> 2")] = "every caller passes step"
    try:  # judged equivalent: no test can kill it, so it is not run again
        judged = by_change(run(before=stopped))["1 -> 2"]
    finally:
        del mutations.EQUIVALENT[("tiny.py", "def inc(x, step=1):", "1 -> 2")]
    assert judged["seconds"] == by_change(stopped)["1 -> 2"]["seconds"] and judged["equivalent"]
    resumed = by_change(run(before=stopped, resume=True))
    assert (resumed["return None"]["status"], resumed["return None"]["first"]) == ("killed", "killed")
    assert resumed["+ -> -"]["seconds"] == by_change(stopped)["+ -> -"]["seconds"]  # caught: not run again


@pytest.mark.parametrize("content", [None, b"", b"\xff\xfe", b'{"machine": "x"}'], ids=["missing", "empty", "not-utf8", "no-modules"])
def test_a_results_file_that_is_not_one_is_one_error_line(mutations, tmp_path, content):
    path = tmp_path / "results.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SystemExit, match=rf"^{re.escape(str(path))}: not a mutation results file \("):
        mutations.read_results(path)
