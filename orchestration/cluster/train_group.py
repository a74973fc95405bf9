"""A stage's worker group through Ray Train V2's TorchTrainer, for a backend whose capabilities say
launcher = 'ray_train' (torch): `workers` ranks run data-parallel ('ddp', or 'fsdp'), each training
on its rows of the global batch (orchestration/pipeline/stage.py). The backend is reached only
through the protocol (orchestration/core/backends.py), by the name in the stage config.

    run_train_group(config, workers, parallel, need, retries)   inside the stage's Ray task
                                                                 (num_cpus=0: it coordinates)

1. TorchTrainer starts `workers` Ray Train workers, each with resources_per_worker = `need` (the
   runner's orchestration/cluster/resources.worker_resources: {"CPU": c} or {"CPU": c, "GPU": g}).
2. Each worker notes its attempt in STAGE_DIR/attempts.jsonl ({"pid", "host", "started", "rank"}),
   has the backend bind its device (`bind_device`: the GPU TorchTrainer made current, else the CPU,
   with its CPUs as threads), joins the group (`open_rendezvous` on rank 0, `join_group` on all)
   and runs `run_stage({**config, "workers": workers, "parallel": parallel, "device": device})`.
3. Rank 0's result (the train function's return value, Result.return_value in V2) is the stage's.

Failures. A worker that dies (OOM, preemption, SIGKILL) fails the group; Ray Train starts the whole
group again, up to `retries` times (FailureConfig.max_failures), and every rank resumes from
STAGE_DIR/checkpoint, so the final weights are those of an uninterrupted run. A HanyeongError in
run_stage (bad data, a NaN loss, a config mistake) would fail the same way again: V2's failure policy
retries every worker error alike, so a controller callback (`stage_error` decides) raises it in the
controller, whose errors the policy does not retry, and it is raised here as itself, one line.

Rendezvous. Not TorchConfig's: its TCPStore listens on every interface (0.0.0.0). Rank 0's backend
opens the rendezvous on its Ray node address only, and Ray Train's collective sends it to the others
(cuda_model/parallel.py), so a local Ray on 127.0.0.1 stays on loopback.

Ray Train keeps its run state under STAGE_DIR/ray_train (storage_path must be absolute there). Every
worker must see the run directory, datasets and tokenizer at the same paths (shared storage).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from hanyeong.errors import ConfigError, HanyeongError, TrainingError
from orchestration.core.backends import capabilities, get_backend

STORAGE, RUN_NAME = "ray_train", "workers"  # Ray Train's folder in the stage directory, its run name


# ---- pure: paths, which failure stops the stage ---------------------------------------------------


def absolute(config: dict) -> dict:
    """The run_stage config with its paths absolute: Ray Train workers start in another directory."""
    def resolve(p):
        return p if p is None else str(Path(p).resolve())

    return {**config, "stage_dir": resolve(config["stage_dir"]), "tokenizer": resolve(config["tokenizer"]),
            "init_from": resolve(config.get("init_from")),
            "datasets": {k: resolve(v) for k, v in config["datasets"].items()}}  # fmt: skip


def stage_error(errors: dict[int, BaseException]) -> HanyeongError | None:
    """The error that ends a stage instead of a retry: a rank's HanyeongError, when no worker died
    (an error from Ray itself: a killed worker's ranks fail in all sorts of ways, and are retried)."""
    if any(type(e).__module__.startswith("ray.") for e in errors.values()):
        return None
    return next((errors[r] for r in sorted(errors) if isinstance(errors[r], HanyeongError)), None)


def first_line(err: BaseException, limit: int = 200) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def group_failure(errors: dict[int, BaseException], workers: int, retries: int, backend: str) -> str:
    """One line for a group that kept failing: the ranks that died (Ray's errors; the others' are
    the fallout, a collective cut short), else each rank's error."""
    died = {r: e for r, e in errors.items() if type(e).__module__.startswith("ray.")}
    shown = died or errors
    what = "; ".join(
        f"rank {r} died ({first_line(getattr(e, 'health_check_failure', None) or e)})" if r in died
        else f"rank {r}: {first_line(e)}" for r, e in sorted(shown.items())[:2])  # fmt: skip
    times = "once" if retries == 0 else f"{retries + 1} times"
    return (f"the {workers} {backend} workers failed {times} (Ray Train retries: {retries}); "
            f"the last time {what or 'no rank said why'}")  # fmt: skip


# ---- one rank -----------------------------------------------------------------------------------


def note_attempt(stage_dir: Path, rank: int) -> None:
    """One line per rank start in STAGE_DIR/attempts.jsonl (the runner counts rank 0's)."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    line = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "rank": rank}
    with open(stage_dir / "attempts.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


def train_loop(args: dict) -> dict | None:
    """The function every Ray Train worker runs: one rank of the stage; rank 0 returns the result."""
    import ray
    import ray.train
    import ray.train.collective

    from orchestration.pipeline.stage import run_stage

    context = ray.train.get_context()
    rank, size = context.get_world_rank(), context.get_world_size()
    config = args["config"]
    note_attempt(Path(config["stage_dir"]), rank)
    device = get_backend(config["backend"]).bind_device(args["accelerator"], args["cpus"])
    backend = get_backend(config["backend"], device=device)
    rendezvous = backend.open_rendezvous(ray.util.get_node_ip_address()) if rank == 0 else None
    backend.join_group(rank, size, ray.train.collective.broadcast_from_rank_zero(rendezvous))
    result = run_stage({**config, "workers": size, "parallel": args["parallel"], "device": device})
    backend.leave_group()
    return result if rank == 0 else None


# ---- the group ------------------------------------------------------------------------------------


def ray_train_parts():
    """Ray Train classes, built here so that importing this module does not import Ray: a
    TorchConfig that leaves the process group to the backend's `join_group`, and the callback that
    stops a stage on a HanyeongError instead of retrying it."""
    from ray.train import UserCallback
    from ray.train.backend import Backend
    from ray.train.torch import TorchConfig

    class OwnRendezvous(TorchConfig):
        @property
        def backend_cls(self):
            return Backend  # no on_start: the workers join the group themselves

    class StopOnStageError(UserCallback):
        def after_exception(self, run_context, worker_exceptions):
            error = stage_error(worker_exceptions)
            if error is not None:
                raise error  # in the controller: a ControllerError, which is not retried

    return OwnRendezvous, StopOnStageError


def run_train_group(config: dict, workers: int, parallel: str, need: dict, retries: int) -> dict:
    """Run stage config['index'] on `workers` data-parallel ranks, each holding `need` (Ray's
    resources of one worker); rank 0's run_stage result."""
    from ray.train import ControllerError, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    if workers < 2:
        raise ConfigError(f"a worker group needs workers >= 2, got {workers}; one worker is a "
                          "plain stage task")  # fmt: skip
    name, caps = config["backend"], capabilities(config["backend"])
    if parallel not in caps.parallelisms:
        raise ConfigError(f"parallel must be one of {', '.join(caps.parallelisms)} on backend "
                          f"{name}, got {parallel!r}")  # fmt: skip
    config = absolute(config)
    stage_dir = Path(config["stage_dir"])
    OwnRendezvous, StopOnStageError = ray_train_parts()
    loop_config = {"config": config, "parallel": parallel, "cpus": need.get("CPU", 1),
                   "accelerator": caps.device_resource in need}  # fmt: skip
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        torch_config=OwnRendezvous(),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu="GPU" in need, resources_per_worker=need),
        run_config=RunConfig(name=RUN_NAME, storage_path=str(stage_dir / STORAGE),
                             failure_config=FailureConfig(max_failures=retries),
                             callbacks=[StopOnStageError()]),
    )  # fmt: skip
    try:
        return trainer.fit().return_value
    except ControllerError as err:
        cause = err.controller_failure
        if isinstance(cause, HanyeongError):
            raise cause from None
        raise TrainingError(f"Ray Train could not run the {workers} workers: {first_line(cause)}") from None
    except TrainingFailedError as err:
        failures = getattr(err, "worker_failures", None) or {}
        raise TrainingError(group_failure(failures, workers, retries, name)) from None
