"""A distillation teacher's top-k next-token log-probs: computed per batch (`teacher_topk`), or once
for every batch a stage will draw and stored (`build_cache`, read back by `TeacherCache`).

EXACT BY CONSTRUCTION. A stage's batches are a pure function of its loader's mixture and seed and of
its step plan (orchestration/data/loader.py: the order depends on the seed and two counters;
stage_config.py `plan`: the shape of every step). So the cache walks a fresh loader through the
plan, step by step, and stores the teacher's top-k for exactly those rows, with the same segment
ids, computed by the same function (`teacher_topk`, the same rows per forward) a live teacher calls.
Each entry is found again by a fingerprint of its batch (blake2b of inputs and segment ids), not by
a step counter: a resumed stage's loader, back at its cursor, draws the next batch and finds it; a
batch the cache does not hold (the data or plan changed under it) is a DataError, never a wrong
teacher. Cached and live give the same numbers to the bit on the same device and thread count
(BLAS kernels may round differently across thread counts: then to float rounding).

LAYOUT. STAGE_DIR/teacher/<key>/: index.json {format, key, top_k, entries: [{fingerprint, shard,
offset, rows, seq_len}]} written last (a cache without it is incomplete and computed again), and per
shard `NNNNN.ids.npy` int32 [positions, k] and `NNNNN.logprobs.npy` float32 [positions, k], the
positions of its batches back to back. <key> hashes the teacher (its checkpoint's recorded sha256 of
spec.json and model.safetensors), the datasets (their manifests), the mixture, the seed, the plan,
k, the rows per forward and the backend: a changed teacher or data is another key, computed afresh,
and the old one removed.

RAY. Inside a Ray worker that holds no GPU (a CPU stage of `pipeline run`), the shards are computed
by `tasks` Ray tasks of one CPU each (a task blocked in ray.get gives its CPUs back, so the stage's
own CPUs run them); on a GPU, on MLX or outside Ray, the stage's process computes them in turn.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np

from hanyeong.errors import CheckpointError, DataError
from orchestration.core.batch import Batch

CACHE_DIR, INDEX = "teacher", "index.json"
CACHE_FORMAT, CACHE_VERSION = "hanyeong-teacher-cache", 1
FORWARD_ROWS = 4  # rows per teacher forward: bounds the [rows, T, vocab] logits held at once


# ---- the teacher's top-k ----------------------------------------------------------------------


def teacher_topk(backend, model, batch: Batch, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's k most likely next tokens at every position, most likely first: ids int32
    [B, T, k] and their log-probs float32 [B, T, k] (log-softmax over the vocabulary, in float64).
    k < vocab: sorted; k = vocab: every id, the most likely first, the rest in id order."""
    B, T = batch.inputs.shape
    ids, logprobs = np.zeros((B, T, k), np.int32), np.zeros((B, T, k), np.float32)
    for lo in range(0, B, FORWARD_ROWS):
        hi = min(B, lo + FORWARD_ROWS)
        segments = None if batch.segment_ids is None else batch.segment_ids[lo:hi]
        x = backend.logits(model, batch.inputs[lo:hi], segments).astype(np.float64)  # (b, T, V)
        m = x.max(-1, keepdims=True)
        logp = x - (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))
        top = top_ids(logp, k)
        ids[lo:hi], logprobs[lo:hi] = top, np.take_along_axis(logp, top, -1).astype(np.float32)
    return ids, logprobs


def top_ids(x: np.ndarray, k: int) -> np.ndarray:
    """int64 [..., k]: the k largest entries' ids along the last axis, the largest first (a full
    sort costs more than the teacher's forward, so only what the contract needs is ordered)."""
    V, best = x.shape[-1], np.argmax(x, axis=-1)[..., None]
    if k == 1:
        return best
    if k == V:  # every id: the top-1 swapped to the front
        ids = np.broadcast_to(np.arange(V), x.shape).copy()
        np.put_along_axis(ids, best, 0, -1)
        ids[..., :1] = best
        return ids
    top = np.argpartition(x, V - k, axis=-1)[..., V - k :]
    order = np.argsort(-np.take_along_axis(x, top, -1), axis=-1, kind="stable")
    return np.take_along_axis(top, order, -1)


def fingerprint(batch: Batch) -> str:
    """blake2b of a batch's shape, inputs and segment ids: which rows the teacher saw."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(np.asarray(batch.inputs.shape, np.int64).tobytes())
    digest.update(np.ascontiguousarray(batch.inputs, np.int32).tobytes())
    if batch.segment_ids is not None:
        digest.update(np.ascontiguousarray(batch.segment_ids, np.int32).tobytes())
    return digest.hexdigest()


def teacher_hash(path: str | Path) -> str:
    """sha256 of a checkpoint's spec.json and model.safetensors, as its index recorded them."""
    from orchestration.core.checkpoint import MODEL_FILE, SPEC_FILE, verify, weights_file

    files = verify(path)["files"]
    weights_file(path)  # a sharded teacher without its weights consolidated: one clear error
    recorded = [files[SPEC_FILE]["sha256"], files[MODEL_FILE]["sha256"]]
    return hashlib.sha256(json.dumps(recorded).encode()).hexdigest()


def cache_key(teacher: str, mixture, seed: int, steps: list[tuple[int, int]], k: int,
              backend: str) -> str:  # fmt: skip
    """The cache's name: teacher, datasets (manifests), mixture, seed, step shapes, k, backend."""
    from dataclasses import asdict

    def manifest(entry) -> str:
        return hashlib.sha256((Path(entry.dataset) / "manifest.json").read_bytes()).hexdigest()

    entries = [{**asdict(e), "dataset": manifest(e)} for e in (*mixture.sources, *mixture.replay)]
    body = {"format": [CACHE_FORMAT, CACHE_VERSION], "teacher": teacher, "datasets": entries,
            "split_documents": mixture.split_documents, "hold_out": mixture.hold_out or 0,
            "seed": seed, "steps": steps, "k": k, "forward_rows": FORWARD_ROWS, "backend": backend}  # fmt: skip
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


# ---- computing it -----------------------------------------------------------------------------


def compute_shard(job: dict) -> list[dict]:
    """One shard of the cache, a function that runs alone (a Ray task, or in the stage's process):
    a loader at `job['cursor']` draws `job['steps']` batches; their top-k goes to two .npy files.
    Returns the shard's index entries."""
    from orchestration.core.backends import get_backend
    from orchestration.data.loader import MixtureLoader

    backend = job.get("backend_object") or get_backend(job["backend"], device=job.get("device"))
    model = job.get("model") or backend.load(job["teacher"])
    seq_len, rows = job["steps"][0]
    loader = MixtureLoader(job["mixture"], seq_len, rows, job["seed"], state=job["cursor"])
    entries, ids, logprobs, offset = [], [], [], 0
    for seq_len, rows in job["steps"]:
        loader.seq_len, loader.batch_rows = seq_len, rows
        batch = loader.next_batch()
        top_ids, top_logprobs = teacher_topk(backend, model, batch, job["k"])
        entries.append({"fingerprint": fingerprint(batch), "shard": job["shard"], "offset": offset,
                        "rows": rows, "seq_len": seq_len})  # fmt: skip
        ids.append(top_ids.reshape(rows * seq_len, -1))
        logprobs.append(top_logprobs.reshape(rows * seq_len, -1))
        offset += rows * seq_len
    directory = Path(job["directory"])
    save_npy(directory / f"{job['shard']:05d}.ids.npy", np.concatenate(ids))
    save_npy(directory / f"{job['shard']:05d}.logprobs.npy", np.concatenate(logprobs))
    return entries


def save_npy(path: Path, array: np.ndarray) -> None:
    from hanyeong.files import write_atomic

    buffer = io.BytesIO()
    np.save(buffer, array)
    write_atomic(path, buffer.getvalue())


def shard_jobs(mixture, seed: int, steps: list[tuple[int, int]], shards: int,
               common: dict) -> list[dict]:  # fmt: skip
    """The shards' jobs: consecutive runs of steps, each with the loader cursor it starts at (found
    by walking one loader through the steps: packing rows costs little beside a teacher forward)."""
    from orchestration.data.loader import MixtureLoader

    size = -(-len(steps) // max(1, shards))
    loader = MixtureLoader(mixture, *steps[0], seed)
    jobs = []
    for start in range(0, len(steps), size):
        part = steps[start : start + size]
        jobs.append({**common, "shard": len(jobs), "steps": part, "cursor": loader.state()})
        for seq_len, rows in part:
            loader.seq_len, loader.batch_rows = seq_len, rows
            loader.next_batch()
    return jobs


def build_cache(directory: Path, key: str, jobs: list[dict], use_ray: bool) -> Path:
    """Compute every shard (Ray tasks or in turn), then write index.json; removes other keys'
    caches beside it. Returns the cache's directory."""
    out = directory / key[:32]
    shutil.rmtree(out, ignore_errors=True)  # an incomplete one: no index.json
    out.mkdir(parents=True)
    jobs = [{**job, "directory": str(out)} for job in jobs]
    if use_ray:
        import ray

        task = ray.remote(num_cpus=1, max_retries=3)(compute_shard)
        local = ("model", "backend_object")  # this process's objects: a task loads its own
        parts = ray.get([task.remote({k: v for k, v in job.items() if k not in local}) for job in jobs])
    else:
        parts = [compute_shard(job) for job in jobs]
    from hanyeong.files import write_atomic

    k = jobs[0]["k"]
    body = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "key": key, "top_k": k,
            "entries": [entry for part in parts for entry in part]}  # fmt: skip
    write_atomic(out / INDEX, json.dumps(body) + "\n")
    for stale in directory.iterdir():
        if stale != out and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    return out


def ray_can_run_it() -> bool:
    """Inside a Ray worker that holds no GPU: the shards can be Ray tasks of one CPU each."""
    try:
        import ray
    except ImportError:
        return False
    if not ray.is_initialized():
        return False
    return not ray.get_runtime_context().get_accelerator_ids().get("GPU")


# ---- reading it -------------------------------------------------------------------------------


class TeacherCache:
    """A computed cache: the teacher's top-k of a batch found by the batch's fingerprint."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        try:
            body = json.loads((self.directory / INDEX).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{self.directory}: no readable teacher cache index ({err})") from None
        if (body.get("format"), body.get("version")) != (CACHE_FORMAT, CACHE_VERSION):
            raise CheckpointError(f"{self.directory}: teacher cache format {body.get('format')} "
                                  f"v{body.get('version')}, expected {CACHE_FORMAT} v{CACHE_VERSION}")  # fmt: skip
        self.top_k = int(body["top_k"])
        self.entries = {entry["fingerprint"]: entry for entry in body["entries"]}
        self.shards: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __call__(self, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        """ids int32 [B, T, k] and log-probs float32 [B, T, k] of the batch; DataError when the
        cache does not hold its rows."""
        entry = self.entries.get(fingerprint(batch))
        if entry is None:
            B, T = batch.inputs.shape
            raise DataError(f"{self.directory}: the teacher cache holds no batch of these rows "
                            f"({B} x {T}); the data or the stage changed under it: remove the "
                            "folder to compute it again")  # fmt: skip
        ids, logprobs = self.shard(entry["shard"])
        B, T = entry["rows"], entry["seq_len"]
        span = slice(entry["offset"], entry["offset"] + B * T)
        return np.array(ids[span]).reshape(B, T, -1), np.array(logprobs[span]).reshape(B, T, -1)

    def shard(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if n not in self.shards:
            name = self.directory / f"{n:05d}"
            self.shards[n] = (np.load(f"{name}.ids.npy", mmap_mode="r"),
                              np.load(f"{name}.logprobs.npy", mmap_mode="r"))  # fmt: skip
        return self.shards[n]
