"""Checkpoint publication under a kill at every step: a writer process is killed (os._exit, no
cleanup, as a lost machine leaves it) at each line `checkpoint.writing` and the writer inside it
execute in turn; after `recover` (what the next start runs) the checkpoint is whole and is either
the old one or the new one, and nothing a dead writer left remains beside it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from orchestration.core import checkpoint
from orchestration.core.presets import PRESETS

ROOT = Path(__file__).resolve().parents[2]
SPEC = PRESETS["tiny"].replace(vocab_size=300)

# The child: publish version "old" whole, then version "new" with a kill at the KILL_AT-th line
# executed inside checkpoint.writing or the writer's own block (-1: never). Exit 9 when killed.
CHILD = r"""
import os, sys
from pathlib import Path
from orchestration.core import checkpoint
from orchestration.core.presets import PRESETS

path, kill_at = Path(sys.argv[1]), int(sys.argv[2])
spec = PRESETS["tiny"].replace(vocab_size=300)


def publish(version):
    with checkpoint.writing(path, spec) as tmp:
        (tmp / checkpoint.MODEL_FILE).write_bytes(version.encode() * 1000)
        (tmp / "trainer_state.json").write_text('{"version": "%s"}' % version)


publish("old")
lines = 0
watched = {checkpoint.writing.__wrapped__.__code__, publish.__code__}


def tracer(frame, event, arg):
    global lines
    if frame.f_code not in watched:
        return None
    if event == "line":
        if lines == kill_at:
            os._exit(9)
        lines += 1
    return tracer


sys.settrace(tracer)
publish("new")
sys.settrace(None)
print(lines)
"""


def run_child(path: Path, kill_at: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, str(path), str(kill_at)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip


def version(path: Path) -> str:
    checkpoint.verify(path, checksums=True)  # whole: every indexed file at its size and hash
    return json.loads((path / "trainer_state.json").read_text())["version"]


def test_a_kill_at_every_line_of_publication_leaves_the_old_or_the_new_checkpoint(tmp_path):
    done = run_child(tmp_path / "whole" / "checkpoint", -1)
    assert done.returncode == 0, done.stderr[-2000:]
    steps = int(done.stdout.split()[-1])
    assert steps > 15  # every line of writing and of the writer's block is a kill point
    seen = []
    for kill_at in range(steps):
        path = tmp_path / f"kill-{kill_at}" / "checkpoint"
        killed = run_child(path, kill_at)
        assert killed.returncode == 9, (kill_at, killed.stderr[-2000:])
        checkpoint.recover(path)  # the next start's first move
        seen.append(version(path))
        assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint"], kill_at  # no tmp, no old
    assert set(seen) == {"old", "new"} and seen == sorted(seen, key=["old", "new"].index)  # old until it flips
