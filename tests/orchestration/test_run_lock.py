"""A run's driver, seen from another process: running while it holds RUN_DIR/.lock, interrupted once
it is gone (its pid on this host, a stale heartbeat elsewhere); a finished run leaves no lock."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from orchestration.core import checkpoint
from orchestration.pipeline import run_lock as rl
from orchestration.pipeline.run_manifest import RunManifest, StageRecord
from tests.conftest import REPO

INTERRUPTED = "interrupted — rerun the same command to resume"


@pytest.fixture
def run_dir(tmp_path):
    """A run whose stage 1 was running, with a checkpoint of step 40 and metrics up to step 45."""
    run_dir = tmp_path / "run"
    stage = StageRecord("stage1-general", "pretrain", "id", "stages/01-stage1-general", 4096, status="running")
    RunManifest({"path": "recipe.toml", "sha256": "x"}, "demo", "torch", [stage]).save(run_dir)
    folder = run_dir / stage.dir
    (folder / "checkpoint").mkdir(parents=True)
    checkpoint.write_trainer_state(folder / "checkpoint", {"step": 40, "tokens_seen": 2560})
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 45, "tokens": 2880, "loss": 5.5}) + "\n")
    (folder / "attempts.jsonl").write_text(json.dumps({"pid": 1, "host": "h", "started": 0}) + "\n")
    return run_dir


def status(run_dir) -> str:
    """`hanyeong pipeline status` in a process of its own, as a user in another terminal runs it."""
    out = subprocess.run([sys.executable, "-m", "orchestration.cli", "pipeline", "status", "--run-dir", str(run_dir)],
                         capture_output=True, text=True, cwd=REPO, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_status_of_a_killed_run_says_interrupted_with_the_checkpoint_step(run_dir):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom orchestration.pipeline.run_lock import run_lock\n"
         f"with run_lock({str(run_dir)!r}):\n    print('locked', flush=True)\n    time.sleep(300)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        alive = status(run_dir)
        assert INTERRUPTED not in alive and f"running: `hanyeong pipeline run` pid {holder.pid}" in alive
        assert "│ running │" in alive and "2,880 / 4,096" in alive  # the running stage's latest metrics
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert (run_dir / ".lock").is_file()  # a kill -9 runs no cleanup
    dead = status(run_dir)
    assert "│ interrupted │" in dead and "stages/01-stage1-general/checkpoint (step 40)" in dead
    assert f"{INTERRUPTED}: stage 1 'stage1-general' resumes from its checkpoint of step 40" in dead
    assert "running" not in dead
    assert json.loads(subprocess.run(
        [sys.executable, "-m", "orchestration.cli", "pipeline", "status", "--run-dir", str(run_dir), "--json"],
        capture_output=True, text=True, cwd=REPO, check=True,
    ).stdout)["driver"]["alive"] is False  # fmt: skip


def test_a_driver_on_another_host_is_judged_by_its_heartbeat(run_dir):
    lock = run_dir / rl.LOCK_FILE
    lock.write_text(json.dumps({"pid": 123, "host": f"not-{socket.gethostname()}", "started": 0}))
    assert rl.read_driver(run_dir).alive  # just refreshed
    old = time.time() - rl.HEARTBEAT_STALE - 5
    os.utime(lock, (old, old))
    driver = rl.read_driver(run_dir)
    assert not driver.alive and driver.pid == 123
    assert f"{INTERRUPTED}: stage 1 'stage1-general' resumes from its checkpoint of step 40" in status(run_dir)


def test_the_lock_is_refreshed_while_held_and_removed_after(tmp_path, monkeypatch):
    monkeypatch.setattr(rl, "HEARTBEAT_SECONDS", 0.05)
    with rl.run_lock(tmp_path):
        lock = tmp_path / rl.LOCK_FILE
        info = json.loads(lock.read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        os.utime(lock, (0, 0))
        deadline = time.monotonic() + 10
        while lock.stat().st_mtime == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert lock.stat().st_mtime > 0  # the heartbeat
        assert rl.read_driver(tmp_path).alive
    assert not (tmp_path / rl.LOCK_FILE).exists() and rl.read_driver(tmp_path) is None
    with pytest.raises(RuntimeError), rl.run_lock(tmp_path):
        raise RuntimeError("a stage failed")
    assert not (tmp_path / rl.LOCK_FILE).exists()  # an error ends the run too: no lock left
