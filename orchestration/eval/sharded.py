"""`hanyeong eval --workers N`: the tasks' items scored in Ray tasks, merged in item order and
summed up as in one process.

Each task's inputs are built once, in the driver (plan.py: prompts, few-shot draws and documents
exactly as an unsharded run builds them), and cut into at most N contiguous shards. A shard is a
Ray task (`score_shard`) that loads the checkpoint (get_backend(name).load), scores its slice and
returns one result per item; at most N run at once, and a bar counts them as they finish. The
driver puts the slices back in item order and calls the task's `finish`, so metrics, items,
answer files and judging come from the same per-item results as in one process. Chat tasks'
answers are generated in shards; their judge runs here, in the driver. Only the batches differ
(which items share a forward pass): on the CPU that gives the same numbers to the bit; a GPU's
kernels may round differently by batch shape.

A shard asks for one worker's resources (orchestration/cluster/resources.worker_resources, as the
pipeline's stages do): a GPU where the cluster has them (torch), `apple_silicon` (MLX), else its
share of a node's CPUs. Every shard loads the checkpoint, so the workers need it and the tokenizer
at the same paths (on a cluster: a shared filesystem); the benchmark files are read in the driver.
Ray is imported only inside the functions here.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hanyeong.errors import ConfigError, HanyeongError
from orchestration.eval.plan import Plan

WHERE = "hanyeong eval --workers"


@dataclass(frozen=True)
class Shard:
    """Items [lo, hi) of one task."""

    task: str
    lo: int
    hi: int


def cut(n: int, parts: int) -> list[tuple[int, int]]:
    """[lo, hi) of at most `parts` contiguous, near-equal, non-empty slices of n items."""
    k = min(parts, n)
    return [(n * i // k, n * (i + 1) // k) for i in range(k)]


def shards_of(plans: dict[str, Plan], workers: int) -> list[Shard]:
    """Every task's items in at most `workers` shards, task by task."""
    return [Shard(name, lo, hi) for name, plan in plans.items() for lo, hi in cut(len(plan.inputs), workers)]


def score_shard(job: dict) -> dict:
    """Runs in a Ray task: load the checkpoint and the tokenizer, score the slice job["inputs"].
    {"results": one per input, "seconds": loading and scoring}."""
    from orchestration.core.backends import get_backend
    from tokenizer.bbpe import BBPETokenizer

    started = time.perf_counter()
    device = get_backend(job["backend"]).bind_device(job["accelerator"], job["cpus"])
    backend = get_backend(job["backend"], device=device)  # None: the backend's default device
    model = backend.load(job["ckpt"])
    tokenizer = BBPETokenizer.load(job["tokenizer"])
    results = job["work"](backend, model, tokenizer, job["spec"], job["config"], job["inputs"])
    return {"results": results, "seconds": time.perf_counter() - started}


def shard_resources(ray, backend: str, workers: int) -> dict:
    """One shard's Ray resources ({"CPU": c} or with "GPU" / "apple_silicon"); ConfigError when the
    cluster has none of the device the backend requires."""
    from orchestration.cluster.resources import worker_resources

    cluster = ray.cluster_resources()
    node_cpus = max((int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=1)
    need = worker_resources(backend, {}, cluster, node_cpus, workers, where=WHERE)
    missing = [k for k, v in need.items() if k != "CPU" and cluster.get(k, 0) < v]
    if missing:
        hint = f"`ray start --resources='{{\"{missing[0]}\": 1}}'`"
        raise ConfigError(f"{WHERE}: backend {backend} needs {missing[0]} for each shard and the Ray cluster has "
                          f"none (a node declares it with {hint})")  # fmt: skip
    return need


def evaluate_sharded(ckpt: str | Path, tokenizer_dir: str | Path, spec, config, plans: dict[str, Plan]) -> dict:
    """{task: result}: every task's items scored in shards over `config.workers` Ray tasks at once
    (config.address's cluster, else a local Ray), each task's result from its merged items.
    `seconds` of a task: its shards' own (each loading the checkpoint) and its finish in the driver."""
    from orchestration.cluster.ray_session import ray_session
    from orchestration.cluster.resources import ray_options
    from orchestration.pipeline.runner import local_resources

    shards = shards_of(plans, config.workers)
    with ray_session(address=config.address, resources=local_resources()) as ray:
        need = shard_resources(ray, config.backend, config.workers)
        task = ray.remote(retry_exceptions=False)(score_shard).options(**ray_options(need))
        base = {"ckpt": str(Path(ckpt).resolve()), "tokenizer": str(Path(tokenizer_dir).resolve()), "spec": spec,
                "backend": config.backend, "config": config, "accelerator": any(k != "CPU" for k in need),
                "cpus": need["CPU"]}  # fmt: skip
        jobs = ({**base, "work": plans[s.task].work, "inputs": plans[s.task].inputs[s.lo : s.hi]} for s in shards)
        done = dict(zip(shards, run_shards(ray, task, list(jobs), config.workers)))
    return {name: finish(plan, [done[s] for s in shards if s.task == name]) for name, plan in plans.items()}


def finish(plan: Plan, parts: list[dict]) -> dict:
    """A task's result from its shards' outputs, in item order (no shard: no items)."""
    started = time.perf_counter()
    result = plan.finish([r for part in parts for r in part["results"]])
    seconds = sum(part["seconds"] for part in parts) + time.perf_counter() - started
    return result | {"seconds": round(seconds, 3), "shards": len(parts)}


def run_shards(ray, task, jobs: list[dict], workers: int) -> list[dict]:
    """Each job's output, in job order: at most `workers` in flight, a bar counting the finished
    ones. A shard's HanyeongError is raised as itself (the CLI's one line); the rest are cancelled."""
    from tqdm import tqdm

    out: list[dict | None] = [None] * len(jobs)
    running: dict = {}  # ObjectRef -> job index
    # disable=None: a bar on a terminal only, so logs and captured stderr stay clean
    bar = tqdm(total=len(jobs), desc="eval", unit="shard", disable=None, file=sys.stderr, dynamic_ncols=True)
    try:
        for i, job in enumerate(jobs):  # fill the workers, then one more each time one finishes
            running[task.remote(job)] = i
            if len(running) == workers:
                collect(ray, running, out, bar)
        while running:
            collect(ray, running, out, bar)
    except BaseException:
        for ref in running:
            ray.cancel(ref)
        raise
    finally:
        bar.close()
    return out


def collect(ray, running: dict, out: list, bar) -> None:
    """Wait for one running shard and keep its output."""
    [ref], _ = ray.wait(list(running), num_returns=1)
    i = running.pop(ref)
    try:
        out[i] = ray.get(ref)
    except Exception as err:
        cause = getattr(err, "cause", None)  # RayTaskError: the shard's own exception
        if isinstance(cause, HanyeongError):
            raise cause from None
        raise
    bar.update(1)
