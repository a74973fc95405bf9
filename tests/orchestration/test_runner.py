"""The Ray runner on a real local Ray (2 CPUs, 127.0.0.1, started once for the module): a tiny
three-stage recipe run, rerun, changed, killed mid-stage and broken, and its CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, cli, quickstart_english, quickstart_korean

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

VOCAB = 1024
STEP_TOKENS = 128  # 4 rows of 32
STAGE1_STEPS = 200  # ~1 s on a warm worker: time for the test to kill it mid-way
CHECKPOINT_EVERY = 16 * STEP_TOKENS


def recipe_text(root: Path, tokenizer: str | None = None, dataset: str | None = None, stage2_lr: float = 1e-3,
                stage2_dataset: str = "text", stages: int = 3, extra_datasets: str = "",
                stage1_steps: int = STAGE1_STEPS) -> str:  # fmt: skip
    """A tiny recipe: tokenizer and dataset trained/prepared from `root/corpus` unless paths are given."""
    tok = f'path = "{tokenizer}"' if tokenizer else f'train_inputs = ["{root / "corpus"}"]\nvocab_size = {VOCAB}'
    data = f'path = "{dataset}"' if dataset else f'inputs = ["{root / "corpus"}"]'
    text = f"""
[run]
name = "tiny-run"
seed = 0
backend = "auto"
preset = "tiny"
vocab_size = {VOCAB}

[run.tokenizer]
{tok}

[[run.datasets]]
name = "text"
{data}
{extra_datasets}
"""
    budgets = [stage1_steps * STEP_TOKENS, 6 * STEP_TOKENS, 6 * STEP_TOKENS]
    for i in range(stages):
        text += f"""
[[stage]]
name = "s{i + 1}"
start = "{"init" if i == 0 else "previous"}"
token_budget = {budgets[i]}
seq_len = 32
batch_tokens = {STEP_TOKENS}
checkpoint_every_tokens = {CHECKPOINT_EVERY}
[stage.data]
sources = [{{ dataset = "{stage2_dataset if i == 1 else "text"}" }}]
[stage.optim]
lr = {stage2_lr if i == 1 else 1e-3}
warmup_steps = 2
"""
    return text


def write_recipe(path: Path, root: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(recipe_text(root, **kwargs))
    return path


def weights(checkpoint: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(checkpoint / "model.safetensors"))


# ---- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray for the module; run_pipeline (and prepare inside it) reuse it. Its workers
    run torch on one thread: two OpenMP threads on two cores shared with other jobs can stall a
    tiny step from 6 ms to 700 ms (the workers inherit the variable; Ray only sets it when unset)."""
    from orchestration.pipeline.runner import ray_session

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        with ray_session(num_cpus=2) as session:
            yield session


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runner")
    corpus = root / "corpus"
    corpus.mkdir()
    (corpus / "ko.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n"
                                             for t in quickstart_korean(800)), encoding="utf-8")  # fmt: skip
    (corpus / "en.txt").write_text("\n".join(quickstart_english()[:800]) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def finished(root, ray_local, tmp_path_factory):
    """The three-stage recipe run once from nothing: tokenizer trained, dataset prepared, stages run."""
    from orchestration.pipeline.driver import run_pipeline

    recipe = write_recipe(root / "base" / "recipe.toml", root)
    run_dir = root / "base" / "run"
    lines: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))  # the Kiwi cache stays in tmp
        summary = run_pipeline(recipe, run_dir, echo=lines.append)
    return {"recipe": recipe, "run_dir": run_dir, "summary": summary, "lines": lines}


# ---- a whole run -----------------------------------------------------------------------------------


def test_run_writes_manifest_checkpoints_metrics_and_plot(finished):
    from orchestration.core import checkpoint
    from orchestration.pipeline.run_manifest import load_manifest

    run_dir = finished["run_dir"]
    assert finished["summary"]["ran"] == ["s1", "s2", "s3"]
    manifest = load_manifest(run_dir)
    assert [s.status for s in manifest.stages] == ["done"] * 3
    assert manifest.backend == "torch" and manifest.tokenizer["trained"]  # auto, on a machine without GPUs
    assert any(line.startswith("training the tokenizer") for line in finished["lines"])
    for stage in manifest.stages:
        assert stage.tokens == stage.token_budget and stage.attempts == 1 and stage.error is None
        checkpoint.verify(run_dir / stage.checkpoint, checksums=True)
        lines = [json.loads(x) for x in (run_dir / stage.dir / "metrics.jsonl").read_text().splitlines()]
        assert lines[-1]["tokens"] == stage.token_budget and lines[-1]["loss"] == stage.last_loss
    assert (run_dir / "tokenizer" / "tokenizer.json").is_file()
    assert (run_dir / "datasets" / "text" / "manifest.json").is_file()
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (run_dir / ".lock").exists()  # a finished run leaves no lock behind
    t = manifest.timings
    assert {"ray_start", "tokenizer", "datasets", "stages", "dispatch", "total"} <= set(t)
    assert manifest.stages[0].last_loss < manifest.stages[0].first_loss  # it learns


def test_rerun_of_a_finished_recipe_runs_nothing(finished, monkeypatch, capsys):
    run_dir = finished["run_dir"]
    before = {p: p.stat().st_mtime_ns for p in run_dir.glob("stages/*/**/*") if p.is_file()}
    code, out, err = cli(monkeypatch, capsys, "pipeline", "run", str(finished["recipe"]), "--run-dir", str(run_dir), "-q")
    assert code == 0
    assert out.count("\n") == 1 and "up to date, no stage ran (all 3 done" in out and err == ""  # one line
    assert {p: p.stat().st_mtime_ns for p in run_dir.glob("stages/*/**/*") if p.is_file()} == before


def test_a_changed_stage_reruns_from_there_and_keeps_the_stages_before(finished, root, tmp_path):
    from orchestration.pipeline.driver import run_pipeline
    from orchestration.pipeline.run_manifest import load_manifest

    run_dir = tmp_path / "run"
    shutil.copytree(finished["run_dir"], run_dir)
    old = load_manifest(run_dir)
    stage1 = weights(run_dir / old.stages[0].checkpoint)
    old_s2 = weights(run_dir / old.stages[1].checkpoint)
    recipe = write_recipe(tmp_path / "recipe.toml", root, stage2_lr=2e-3)
    summary = run_pipeline(recipe, run_dir)
    assert summary["ran"] == ["s2", "s3"] and summary["skipped"] == ["s1"]
    new = load_manifest(run_dir)
    assert [s.identity for s in new.stages][0] == old.stages[0].identity
    assert all(a.identity != b.identity for a, b in zip(new.stages[1:], old.stages[1:]))
    assert all(s.status == "done" and s.attempts == 1 for s in new.stages)
    assert all(np.array_equal(v, weights(run_dir / new.stages[0].checkpoint)[k]) for k, v in stage1.items())
    assert not all(np.array_equal(v, weights(run_dir / new.stages[1].checkpoint)[k]) for k, v in old_s2.items())
    assert (run_dir / "stages" / "02-s2.stale" / "checkpoint").is_dir()  # moved aside, not resumed


def test_a_killed_worker_is_retried_and_the_stage_resumes_to_the_same_weights(finished, root, tmp_path):
    """SIGKILL the stage's worker after its first checkpoint: Ray retries the task, run_stage
    resumes from the checkpoint and data cursor, and the result equals the uninterrupted run."""
    from orchestration.pipeline.driver import run_pipeline
    from orchestration.pipeline.run_manifest import load_manifest

    base = finished["run_dir"]
    recipe = write_recipe(tmp_path / "recipe.toml", root, tokenizer=str(base / "tokenizer"),
                          dataset=str(base / "datasets" / "text"), stages=1)  # fmt: skip
    run_dir = tmp_path / "run"
    stage_dir = run_dir / "stages" / "01-s1"
    killed = []

    def kill_after_first_checkpoint():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            if (stage_dir / "checkpoint" / "checkpoint.json").is_file() and (stage_dir / "attempts.jsonl").is_file():
                pid = json.loads((stage_dir / "attempts.jsonl").read_text().splitlines()[0])["pid"]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.005)

    watcher = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    watcher.start()
    summary = run_pipeline(recipe, run_dir)
    watcher.join()
    assert killed and summary["ran"] == ["s1"]
    stage = load_manifest(run_dir).stages[0]
    attempts = [json.loads(x) for x in (stage_dir / "attempts.jsonl").read_text().splitlines()]
    assert stage.attempts == 2 and attempts[0]["pid"] == killed[0] != attempts[1]["pid"]
    assert stage.status == "done" and stage.tokens == stage.token_budget == STAGE1_STEPS * STEP_TOKENS
    assert stage.resumed_from_step and stage.resumed_from_step % (CHECKPOINT_EVERY // STEP_TOKENS) == 0
    steps = [json.loads(x)["step"] for x in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STAGE1_STEPS + 1))  # the lines after the checkpoint were redone once
    reference = weights(base / load_manifest(base).stages[0].checkpoint)
    resumed = weights(run_dir / stage.checkpoint)
    assert reference.keys() == resumed.keys()
    assert all(np.array_equal(reference[k], resumed[k]) for k in reference)


def test_a_stage_with_two_workers_runs_through_ray_train_to_the_single_worker_result(finished, root, tmp_path):
    """workers = 2 in the recipe: the runner hands the stage to Ray Train (2 gloo ranks, each on
    half of every step's rows); the loss curve and final weights are the one-worker run's."""
    from orchestration.pipeline.driver import run_pipeline
    from orchestration.pipeline.run_manifest import load_manifest

    base = finished["run_dir"]
    text = recipe_text(root, tokenizer=str(base / "tokenizer"), dataset=str(base / "datasets" / "text"), stages=1)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(text.replace("checkpoint_every_tokens", "workers = 2\nparallelism = \"ddp\"\ncheckpoint_every_tokens", 1))
    lines: list[str] = []
    summary = run_pipeline(recipe, tmp_path / "run", echo=lines.append)
    assert summary["ran"] == ["s1"] and any("on 2 torch workers (ddp" in line for line in lines), lines
    stage = load_manifest(tmp_path / "run").stages[0]
    assert stage.status == "done" and stage.attempts == 1 and stage.tokens == stage.token_budget
    one = [json.loads(x) for x in (base / "stages" / "01-s1" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (tmp_path / "run" / "stages" / "01-s1" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in two] == [r["step"] for r in one]
    # the same steps up to the order of fp32 sums (gloo adds the two halves): equal at first, and
    # within a few 1e-3 after 200 steps of drift
    losses_one, losses_two = np.array([r["loss"] for r in one]), np.array([r["loss"] for r in two])
    np.testing.assert_allclose(losses_two[:20], losses_one[:20], atol=1e-5)
    np.testing.assert_allclose(losses_two, losses_one, atol=5e-3)
    reference, parallel = weights(base / load_manifest(base).stages[0].checkpoint), weights(tmp_path / "run" / stage.checkpoint)
    assert reference.keys() == parallel.keys()
    for k in reference:
        np.testing.assert_allclose(parallel[k], reference[k], atol=5e-3)


# ---- failures ---------------------------------------------------------------------------------------


def broken_dataset(finished, tmp_path) -> Path:
    """A prepared dataset whose manifest is there but whose shards are gone."""
    broken = tmp_path / "broken"
    shutil.copytree(finished["run_dir"] / "datasets" / "text", broken)
    shutil.rmtree(broken / "shards")
    return broken


def test_a_stage_reading_missing_data_stops_the_run_with_one_line(finished, root, tmp_path, monkeypatch, capsys):
    from orchestration.pipeline.run_manifest import load_manifest

    base = finished["run_dir"]
    extra = f'\n[[run.datasets]]\nname = "broken"\npath = "{broken_dataset(finished, tmp_path)}"\n'
    recipe = write_recipe(tmp_path / "recipe.toml", root, tokenizer=str(base / "tokenizer"),
                          dataset=str(base / "datasets" / "text"), stage2_dataset="broken", extra_datasets=extra,
                          stage1_steps=4)  # fmt: skip
    run_dir = tmp_path / "run"
    code, out, err = cli(monkeypatch, capsys, "pipeline", "run", str(recipe), "--run-dir", str(run_dir), "-q")
    message = err.strip().splitlines()[-1]
    assert code == 1 and message.startswith("error: stage 2 's2' failed: ") and "broken" in message
    assert "Traceback" not in err
    manifest = load_manifest(run_dir)
    assert [s.status for s in manifest.stages] == ["done", "failed", "pending"]
    assert manifest.stages[1].error and manifest.stages[1].attempts == 1  # an exception is not retried
    from orchestration.core import checkpoint

    checkpoint.verify(run_dir / manifest.stages[0].checkpoint, checksums=True)
    assert (run_dir / "stages" / "02-s2" / "error.txt").is_file()

    code, out, _ = cli(monkeypatch, capsys, "pipeline", "status", "--run-dir", str(run_dir))
    assert code == 0
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 5}
    assert "done" in rows["1. s1"] and "512 / 512" in rows["1. s1"]
    assert "failed" in rows["2. s2"] and "pending" in rows["3. s3"]


def test_a_nan_loss_stops_the_run_through_the_cli_joining_the_cluster(finished, root, tmp_path):
    """`hanyeong pipeline run --address` in its own process, joining this module's Ray: an absurd
    learning rate makes the loss NaN in stage 2, which is not retried."""
    base = finished["run_dir"]
    recipe = write_recipe(tmp_path / "recipe.toml", root, tokenizer=str(base / "tokenizer"),
                          dataset=str(base / "datasets" / "text"), stage2_lr=1e9, stages=2, stage1_steps=4)  # fmt: skip
    run_dir = tmp_path / "run"
    address = ray.get_runtime_context().gcs_address
    done = subprocess.run([sys.executable, "-m", "orchestration.cli", "pipeline", "run", str(recipe), "--run-dir",
                           str(run_dir), "--address", address, "-q"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 1, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: stage 2 's2' failed: loss is nan")
    assert "Traceback" not in done.stderr
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [s["status"] for s in manifest["stages"]] == ["done", "failed"]
    assert manifest["stages"][1]["attempts"] == 1


# ---- CLI and pieces without Ray ------------------------------------------------------------------------


def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys):
    code, _, err = cli(monkeypatch, capsys, "pipeline", "run", str(tmp_path / "nope.toml"), "--run-dir", str(tmp_path / "r"))
    assert code == 1 and err.count("\n") == 1 and "nope.toml: no such recipe file" in err
    code, _, err = cli(monkeypatch, capsys, "pipeline", "status", "--run-dir", str(tmp_path))
    assert code == 1 and err.count("\n") == 1 and "no manifest.json" in err
    (tmp_path / "stuff.txt").write_text("x")
    recipe = write_recipe(tmp_path / "r.toml", tmp_path, tokenizer=str(tmp_path), dataset=str(tmp_path))
    code, _, err = cli(monkeypatch, capsys, "pipeline", "run", str(recipe), "--run-dir", str(tmp_path))
    assert code == 1 and err.count("\n") == 1 and "missing recipe inputs" in err


def test_plan_skips_done_stages_and_reruns_from_the_first_change():
    from orchestration.pipeline.run_manifest import RunManifest, StageRecord, plan_stages

    def records(identities, status="done"):
        return [StageRecord(f"s{i}", "pretrain", x, f"stages/0{i}-s{i}", 10, status) for i, x in enumerate(identities)]

    old = RunManifest({"path": "r", "sha256": "x"}, "run", stages=records("abc"))
    assert plan_stages(old, records("abc", "pending"))[1] == 3
    kept, first = plan_stages(old, records("aXc", "pending"))
    assert first == 1 and kept[0] is old.stages[0] and kept[1].status == "pending"
    old.stages[1].status = "running"
    assert plan_stages(old, records("abc", "pending"))[1] == 1
    assert plan_stages(None, records("abc", "pending"))[1] == 0


def test_task_resources_follow_the_backend_and_refuse_what_the_cluster_lacks():
    from hanyeong.errors import ConfigError
    from orchestration.cluster.resources import worker_resources
    from orchestration.pipeline.runner import resolve_backend, task_options

    cpu, gpu, mac = {"CPU": 16.0}, {"CPU": 16.0, "GPU": 8.0}, {"CPU": 10.0, "apple_silicon": 1.0}
    assert resolve_backend("auto", cpu) == "torch" and resolve_backend("auto", mac) == "mlx"
    assert task_options("torch", {}, cpu, 16, "s") == {"num_cpus": 16}
    assert task_options("torch", {}, gpu, 16, "s") == {"num_cpus": 1, "num_gpus": 1}
    assert task_options("torch", {"gpus": 4}, gpu, 16, "s")["num_gpus"] == 4
    assert task_options("mlx", {}, mac, 10, "s")["resources"] == {"apple_silicon": 1}
    with pytest.raises(ConfigError, match="stage 1 's': needs {'GPU': 2}"):
        task_options("torch", {"gpus": 2}, cpu, 16, "stage 1 's'")
    with pytest.raises(ConfigError, match="apple_silicon"):
        task_options("mlx", {}, cpu, 16, "s")
    # several workers: the task only coordinates; each worker asks for its share, all must fit
    assert task_options("torch", {}, gpu, 16, "s", workers=8) == {"num_cpus": 0}
    assert worker_resources("torch", {}, gpu, 16, workers=8) == {"CPU": 1, "GPU": 1}
    assert worker_resources("torch", {}, cpu, 16, workers=2) == {"CPU": 8}
    assert worker_resources("mlx", {}, {"CPU": 20, "apple_silicon": 2}, 10, workers=2) == {"CPU": 1, "apple_silicon": 1}
    with pytest.raises(ConfigError, match="needs {'GPU': 16}"):
        task_options("torch", {}, gpu, 16, "s", workers=16)
    with pytest.raises(ConfigError, match="needs {'apple_silicon': 2}"):
        task_options("mlx", {}, mac, 10, "s", workers=2)
    # [stage.resources]: cpus for every backend, gpus where the backend takes GPUs (0: stay on CPUs)
    assert worker_resources("torch", {"cpus": 4}, gpu, 16) == {"CPU": 4, "GPU": 1}
    assert worker_resources("torch", {"gpus": 0}, gpu, 16) == {"CPU": 16}
    assert worker_resources("torch", {"gpus": 2, "cpus": 8}, cpu, 16) == {"CPU": 8, "GPU": 2}
    assert worker_resources("mlx", {"cpus": 2}, mac, 10) == {"CPU": 2, "apple_silicon": 1}
    with pytest.raises(ConfigError, match="^s: resources.cpus must be a positive number"):
        worker_resources("torch", {"cpus": 0}, cpu, 16, where="s")
    with pytest.raises(ConfigError, match="^s: resources.gpus is not for backend mlx"):
        worker_resources("mlx", {"gpus": 1}, mac, 10, where="s")


def test_ray_options_ask_for_one_workers_resources():
    from orchestration.cluster.resources import ray_options

    assert ray_options({"CPU": 3}) == {"num_cpus": 3}
    assert ray_options({"CPU": 1, "GPU": 2}) == {"num_cpus": 1, "num_gpus": 2}
    assert ray_options({"CPU": 1, "apple_silicon": 1}) == {"num_cpus": 1, "resources": {"apple_silicon": 1}}


def test_a_run_directory_takes_one_run_at_a_time(tmp_path):
    from hanyeong.errors import ConfigError
    from orchestration.pipeline.driver import run_lock

    with run_lock(tmp_path):
        with pytest.raises(ConfigError, match=f"in use by another `hanyeong pipeline run` \\(pid {os.getpid()}\\)"):
            with run_lock(tmp_path):
                pass
    with run_lock(tmp_path):  # released
        pass
