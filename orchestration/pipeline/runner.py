"""`hanyeong pipeline run`: a recipe's stages, one Ray task each, in a run directory.

The driver trains or finds the tokenizer, prepares the datasets, then submits `run_stage`
(orchestration/pipeline/stage.py, a function that runs alone) as a Ray task per stage and follows its
metrics.jsonl with a progress bar. A worker killed mid-stage is retried (Ray's `max_retries` for a
single worker; the group's own restarts for a multi-worker stage, at most STAGE_RETRIES either way) and
the stage resumes from its last checkpoint; a Python exception is not retried (`retry_exceptions`
off): it stops the run, the stage is marked failed, earlier stages keep their checkpoints.

Ray is imported only inside functions here (and in orchestration/data/shards.py).
"""

from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path

from orchestration.pipeline import run_manifest as rm
from hanyeong.errors import ConfigError, HanyeongError
from orchestration.cluster.ray_session import ray_session  # noqa: F401  (callers import it from here too)
from orchestration.cluster.resources import ray_options, worker_resources
from orchestration.core.backends import BACKENDS, capabilities
from orchestration.core.checkpoint import recover
from orchestration.core.parallel import resolve_parallelism
from orchestration.pipeline.stage_config import stage_label

STAGE_RETRIES = 3  # a killed worker (OOM, preemption, SIGKILL) is retried this many times
POLL_SECONDS = 0.5  # how often the driver looks at the task and its metrics


class StageFailed(HanyeongError):
    """A stage raised, or its worker died more often than Ray retries."""


# ---- Ray --------------------------------------------------------------------------------------


def local_resources() -> dict:
    """Custom resources the embedded Ray declares: the default backend's device where it requires
    one (`apple_silicon` on a Mac that can run MLX; a Mac joining a cluster declares it with
    `ray start --resources='{"apple_silicon": 1}'`). Ray finds GPUs itself."""
    caps = capabilities("auto")
    return {caps.device_resource: 1} if caps.device_required else {}


def resolve_backend(name: str, cluster: dict) -> str:
    """auto: a backend whose required device the cluster has (MLX where it has Apple silicon), else
    PyTorch (on its GPUs when it has some)."""
    if name != "auto":
        return name
    for backend in BACKENDS:
        caps = capabilities(backend)
        if caps.device_required and cluster.get(caps.device_resource, 0) > 0:
            return backend
    return "torch"


def task_options(backend: str, resources: dict, cluster: dict, node_cpus: int, where: str, workers: int = 1) -> dict:
    """Ray options of a stage's task: the worker's resources for one worker; for several, the task
    only coordinates them (orchestration/cluster/train_group.py, ring_group.py) and asks for nothing
    itself. ConfigError when the cluster lacks what the workers need in all."""
    need = worker_resources(backend, resources, cluster, node_cpus, workers, where)
    missing = {k: v * workers for k, v in need.items() if k != "CPU" and cluster.get(k, 0) < v * workers}
    if missing:
        have = ", ".join(f"{k} {cluster.get(k, 0):g}" for k in missing)
        custom = [k for k in missing if k != "GPU"]
        hint = f" (a node declares it with `ray start --resources='{{\"{custom[0]}\": 1}}'`)" if custom else ""
        raise ConfigError(f"{where}: needs {missing} on backend {backend}, the Ray cluster has {have}{hint}")
    return {"num_cpus": 0} if workers > 1 else ray_options(need)


def _stage_task(config: dict) -> dict:
    """Runs in the Ray worker: note the attempt (pid, host, start) in the stage folder, run the stage."""
    import socket

    started = time.time()
    stage_dir = Path(config["stage_dir"])
    with open(stage_dir / "attempts.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}) + "\n")
    from orchestration.pipeline.stage import run_stage

    result = run_stage(config)
    return {**result, "worker": {"started": started, "finished": time.time()}}


def _workers_task(config: dict, workers: int, parallel: str, need: dict) -> dict:
    """Runs in the Ray worker that coordinates a multi-worker stage, through the launcher the
    backend's capabilities name: Ray Train's TorchTrainer ('ray_train') or a placement group joined
    as a ring ('ring'). The ranks note their attempts in attempts.jsonl themselves."""
    started = time.time()
    if capabilities(config["backend"]).launcher == "ring":
        from orchestration.cluster.ring_group import run_ring_group as run_group
    else:
        from orchestration.cluster.train_group import run_train_group as run_group
    result = run_group(config, workers, parallel, need, retries=STAGE_RETRIES)
    return {**result, "worker": {"started": started, "finished": time.time()}}


# ---- following a stage ------------------------------------------------------------------------


class MetricsTail:
    """Reads the lines appended to a metrics.jsonl since the last call."""

    def __init__(self, path: Path):
        self.path, self.offset, self.last = path, 0, None

    def read(self) -> dict | None:
        try:
            with open(self.path, "rb") as f:
                if os.fstat(f.fileno()).st_size < self.offset:  # cut back to a checkpoint on resume
                    self.offset = 0
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return self.last
        end = chunk.rfind(b"\n") + 1  # a line still being written waits for the next call
        self.offset += end
        for line in chunk[:end].splitlines():
            try:
                self.last = json.loads(line)
            except json.JSONDecodeError:
                continue
        return self.last


def follow(ray, ref, record: rm.StageRecord, metrics: Path, progress: bool, label: str):
    """Wait for a stage task, showing tokens done and the time left from its metrics; returns ray.get(ref)."""
    from orchestration.pipeline.stage_callbacks import StageBar

    tail = MetricsTail(metrics)
    bar = StageBar(label, record.token_budget, enabled=progress)
    try:
        while True:
            ready, _ = ray.wait([ref], timeout=POLL_SECONDS)
            last = tail.read()
            if last is not None:
                bar.show(last)
            if ready:
                return ray.get(ref)
    finally:
        bar.close()


def failure_message(err: BaseException) -> str:
    """One line for what stopped a stage: the stage's own exception, else Ray's reason."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        err = cause
    text = str(err).strip()
    if not isinstance(err, HanyeongError):
        name = type(err).__name__
        if "worker died" in text.lower() or name in ("WorkerCrashedError", "OutOfMemoryError"):
            text = text.splitlines()[0] if text else "the worker died"
            return f"{name}: {text} (after up to {STAGE_RETRIES} retries)"
        text = f"{name}: {text}" if text else name
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


# ---- the stages -------------------------------------------------------------------------------


def run_stages(recipe, manifest: rm.RunManifest, run_dir: Path, first: int, ray, progress: bool, echo,
               ran: list[str], timings: dict) -> None:  # fmt: skip
    """Run stages `first`.. in order, a Ray task each; StageFailed at the first that fails."""
    records = manifest.stages
    for i in range(first, len(records)):
        moved = rm.reset_stage(run_dir, records[i], keep=i == first and records[i].status in ("running", "failed"))
        if moved:
            echo(f"{stage_label(i, records[i].name)}: its definition or input changed; the old folder is now {moved}")
    cluster = ray.cluster_resources()
    manifest.backend = resolve_backend(recipe.run.backend, cluster)
    manifest.save(run_dir)
    node_cpus = max((int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=1)
    task = ray.remote(max_retries=STAGE_RETRIES, retry_exceptions=False)(_stage_task)
    # A group's coordinator is not retried: the group restarts its own workers STAGE_RETRIES times
    # (train_group / ring_group), and Ray retrying the coordinator too would multiply the starts
    # ((3 + 1) x (3 + 1) = 16). A lost coordinator fails the stage; running again resumes it.
    workers_task = ray.remote(max_retries=0, retry_exceptions=False)(_workers_task)
    specs = recipe.stage_specs()
    recipe_dict = recipe.to_dict()
    datasets = {name: d["path"] for name, d in manifest.datasets.items()}
    for i in range(first, len(records)):
        record, stage = records[i], recipe.stages[i]
        where = stage_label(i, record.name)
        resources = stage.resources.to_dict()
        options = task_options(manifest.backend, resources, cluster, node_cpus, where, stage.workers)
        stage_dir = run_dir / record.dir
        # a worker killed inside checkpoint.writing may have left the last checkpoint renamed away:
        # put it back before any worker looks for it (here no writer of this stage is running)
        if recover(stage_dir / "checkpoint"):
            echo(f"{where}: restored the checkpoint a killed writer left renamed")
        start = i - 1 if stage.start == "previous" else recipe.start_stage(i)  # a stage before this one
        init_from = str(run_dir / records[start].checkpoint) if start is not None else None
        config = {"recipe": recipe_dict, "index": i, "stage_dir": str(stage_dir), "init_from": init_from,
                  "tokenizer": manifest.tokenizer["path"], "datasets": datasets, "backend": manifest.backend,
                  "progress": False}  # fmt: skip
        on = manifest.backend
        if stage.workers > 1:
            caps = capabilities(manifest.backend)
            parallel = resolve_parallelism(stage.parallelism, caps, specs[i].parameter_count(), where)
            need = worker_resources(manifest.backend, resources, cluster, node_cpus, stage.workers, where)
            on = f"{stage.workers} {manifest.backend} workers ({parallel}, {need} each)"
            submit = _Submit(workers_task.options(**options), stage.workers, parallel, need)
        else:
            submit = _Submit(task.options(**options))
        echo(f"{where}: {'resuming' if record.status != 'pending' else 'starting'} on {on} "
             f"({record.token_budget:,} tokens)")  # fmt: skip
        record.status, record.error = "running", None
        manifest.save(run_dir)
        result = _run_one(ray, submit, config, record, stage_dir, progress, where, manifest, run_dir)
        timings["dispatch"] = timings.get("dispatch", 0.0) + _dispatch_seconds(result, stage_dir)
        timings["stages"] = timings.get("stages", 0.0) + result["driver_seconds"]
        record.status, record.checkpoint = "done", _relative(result["checkpoint"], run_dir)
        record.tokens, record.steps, record.run_seconds = result["tokens"], result["steps"], result["seconds"]
        record.first_loss, record.last_loss = result["first_loss"], result["last_loss"]
        record.resumed_from_step = result["resumed_from_step"]
        manifest.save(run_dir)
        ran.append(record.name)
        resumed = f", resumed from step {record.resumed_from_step}" if record.resumed_from_step else ""
        echo(f"{where}: done, {record.tokens:,} tokens in {result['driver_seconds']:.1f} s, loss "
             f"{_loss(record.first_loss)} -> {_loss(record.last_loss)}{resumed}; {record.checkpoint}")  # fmt: skip
        for note in result.get("notes", ()):  # what the stage's kind reports (held-back accuracy)
            echo(f"{where}: {note}")


class _Submit:
    """A stage's Ray task and the launch arguments that follow its config."""

    def __init__(self, task, *args):
        self.task, self.args = task, args

    def remote(self, config: dict):
        return self.task.remote(config, *self.args)


def _run_one(ray, task, config: dict, record: rm.StageRecord, stage_dir: Path, progress: bool, where: str,
             manifest: rm.RunManifest, run_dir: Path) -> dict:  # fmt: skip
    """Submit one stage and wait for it; on failure mark it failed and raise StageFailed."""
    submitted = time.time()
    before = _attempts(stage_dir)
    ref = task.remote(config)
    failure = None
    try:
        result = follow(ray, ref, record, stage_dir / "metrics.jsonl", progress, where)
    except KeyboardInterrupt:
        ray.cancel(ref, force=True)
        failure = "interrupted (Ctrl-C); rerun to resume from the last checkpoint"
        raise
    except ray.exceptions.RayError as err:
        failure = failure_message(err).removeprefix(f"{where}: ")  # the stage's own error names it too
        (stage_dir / "error.txt").write_text("".join(traceback.format_exception(err)), encoding="utf-8")
        raise StageFailed(f"{where} failed: {failure} (earlier stages are kept; details in "
                          f"{stage_dir / 'error.txt'})") from None  # fmt: skip
    finally:
        record.seconds = round(record.seconds + time.time() - submitted, 3)
        attempts = _attempts(stage_dir)
        record.attempts = len(attempts)  # every start of the stage, earlier runs and jobs included
        if failure is not None:
            record.status, record.error = "failed", failure
            last = MetricsTail(stage_dir / "metrics.jsonl").read()
            if last:
                record.tokens, record.steps, record.last_loss = last["tokens"], last["step"], last["loss"]
            manifest.save(run_dir)
    result["driver_seconds"] = time.time() - submitted
    result["submitted"] = submitted
    result["attempt_starts"] = [a["started"] for a in attempts[len(before):]]
    return result


def _attempts(stage_dir: Path) -> list[dict]:
    """The stage's attempts: one line per start of a single worker, or of rank 0 of a group."""
    try:
        lines = (stage_dir / "attempts.jsonl").read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    return [a for a in map(json.loads, filter(str.strip, lines)) if a.get("rank", 0) == 0]


def _dispatch_seconds(result: dict, stage_dir: Path) -> float:
    """Driver-side cost of a task beyond run_stage: submit -> worker start, worker end -> result.
    (Time lost to retried attempts is fault recovery, not dispatch.)"""
    starts = result["attempt_starts"] or [result["worker"]["started"]]
    received = result["submitted"] + result["driver_seconds"]
    return max(0.0, starts[0] - result["submitted"]) + max(0.0, received - result["worker"]["finished"])


def _relative(path: str, run_dir: Path) -> str:
    """A path inside the run directory relative to it, so the directory can move (or be copied)."""
    try:
        return str(Path(path).resolve().relative_to(run_dir))
    except ValueError:
        return path


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
