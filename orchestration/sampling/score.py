"""`hanyeong model score RM --data DIR`: a reward model's score of every answer of a generation job.

    DIR/scores/<name>.parquet   prompt_index, sample, score (float32): one row per answer
    DIR/scores/<name>.json      the reward model (path, sha256 of its checkpoint.json), rows, seconds

Each answer is scored as the reward stage trained it (orchestration/pipeline/reward_stage.py): the
prompt's ids as the policy saw them, then the answer's, read at the answer's last token (an answer
that stopped ends on [|endofturn|], as the reward model's rows do). A sequence longer than the
reward model's context keeps its last max_seq_len tokens, so the answer is always whole at the end.
The reward model must share the job's tokenizer (the same ids mean the same text).

With workers > 1 (or a cluster address) the rows are cut into contiguous chunks, one Ray task each
(the reward model loaded per task, on a GPU where the cluster has them); the scores are the same
as in one process (a row's score depends on its own tokens only).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from hanyeong.errors import ConfigError, DataError
from hanyeong.files import write_atomic

SCORES = "scores"


def sequences(prompt_ids: list, answer_ids: list, max_len: int) -> list[np.ndarray]:
    """prompt + answer per row, each cut to its last max_len tokens."""
    return [np.asarray([*p, *a], np.int64)[-max_len:] for p, a in zip(prompt_ids, answer_ids)]


def score_rows(backend, model, rows: list[np.ndarray], batch_rows: int) -> np.ndarray:
    """float32 [N]: the reward of each sequence, longest first in batches (less padding)."""
    out = np.zeros(len(rows), np.float32)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    for lo in range(0, len(order), batch_rows):
        chunk = order[lo : lo + batch_rows]
        lengths = np.array([len(rows[i]) for i in chunk])
        tokens = np.zeros((len(chunk), lengths.max()), np.int64)
        for r, i in enumerate(chunk):
            tokens[r, : lengths[r]] = rows[i]
        out[chunk] = backend.rewards(model, tokens, lengths)
    return out


def score_chunk(job: dict) -> np.ndarray:
    """A Ray task's (or this process's) share: load the reward model, score its rows."""
    from orchestration.core.backends import get_backend

    backend = get_backend(job["backend"])
    model = backend.load(job["ckpt"])
    return score_rows(backend, model, job["rows"], job["batch_rows"])


def check_reward_model(ckpt: str | Path, tokenizer_sha: str) -> int:
    """The reward model's max_seq_len; ConfigError for a language model, DataError for another
    tokenizer than the job's."""
    from orchestration.core.checkpoint import load_spec
    from orchestration.pipeline.run_manifest import run_tokenizer

    spec = load_spec(ckpt)
    if spec.head != "score":
        raise ConfigError(f"{ckpt}: a language model, not a reward model (train one with a 'reward' stage)")
    found = run_tokenizer(ckpt)
    if found is not None:
        sha = hashlib.sha256((Path(found) / "tokenizer.json").read_bytes()).hexdigest()
        if sha != tokenizer_sha:
            raise DataError(f"{ckpt}: its run's tokenizer is not the one the answers were generated with")
    return spec.max_seq_len


def score_generations(ckpt: str | Path, data: str | Path, name: str | None = None, backend: str = "torch",
                      batch_rows: int = 16, workers: int = 1, address: str | None = None) -> dict:  # fmt: skip
    """Write DATA/scores/<name>.parquet and .json (name: the reward model's folder); returns the .json."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from orchestration.core.checkpoint import INDEX_FILE
    from orchestration.sampling.job import read_generations, read_job

    if workers < 1 or batch_rows < 1:
        raise ConfigError(f"workers and batch_rows must be at least 1, got {workers} and {batch_rows}")
    started, job = time.perf_counter(), read_job(data)
    max_len = check_reward_model(ckpt, job["tokenizer_sha256"])
    table = read_generations(data, ["prompt_index", "sample", "prompt_ids", "answer_ids"])
    rows = sequences(table.column("prompt_ids").to_pylist(), table.column("answer_ids").to_pylist(), max_len)
    base = {"ckpt": str(Path(ckpt).resolve()), "backend": backend, "batch_rows": batch_rows}
    if workers == 1 and address is None:
        scores = score_chunk({**base, "rows": rows})
    else:
        scores = score_on_ray(base, rows, workers, address)
    name = name or Path(ckpt).resolve().name
    out = Path(data) / SCORES
    columns = {"prompt_index": table.column("prompt_index"), "sample": table.column("sample"),
               "score": pa.array(scores, pa.float32())}  # fmt: skip
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(columns), sink)
    write_atomic(out / f"{name}.parquet", sink.getvalue().to_pybytes())
    info = {"reward_model": str(ckpt), "reward_model_sha256": hashlib.sha256((Path(ckpt) / INDEX_FILE).read_bytes()).hexdigest(),
            "rows": len(rows), "mean": float(scores.mean()) if len(scores) else None,
            "seconds": round(time.perf_counter() - started, 3)}  # fmt: skip
    write_atomic(out / f"{name}.json", json.dumps(info, indent=2) + "\n")
    return info


def score_on_ray(base: dict, rows: list[np.ndarray], workers: int, address: str | None) -> np.ndarray:
    """The rows in `workers` contiguous chunks, a Ray task each, their scores put back in order."""
    from orchestration.cluster.ray_session import ray_session
    from orchestration.cluster.resources import ray_options, worker_resources

    bounds = [(len(rows) * i // workers, len(rows) * (i + 1) // workers) for i in range(workers)]
    with ray_session(num_cpus=None if address else workers, address=address) as ray:
        need = worker_resources(base["backend"], {}, ray.cluster_resources(), 1, workers, where="model score")
        task = ray.remote(score_chunk).options(**ray_options(need))
        refs = [task.remote({**base, "rows": rows[lo:hi]}) for lo, hi in bounds if hi > lo]
        return np.concatenate([ray.get(r) for r in refs]) if refs else np.zeros(0, np.float32)


def read_scores(data: str | Path, name: str) -> np.ndarray:
    """float32 [rows]: DATA/scores/<name>.parquet's scores in the job's (prompt_index, sample) order."""
    import pyarrow.parquet as pq

    path = Path(data) / SCORES / f"{name}.parquet"
    if not path.is_file():
        known = sorted(p.stem for p in (Path(data) / SCORES).glob("*.parquet"))
        raise DataError(f"{data}: no scores named {name!r} (has: {', '.join(known) or 'none'}; "
                        "make them with hanyeong model score)")  # fmt: skip
    table = pq.read_table(path).sort_by([("prompt_index", "ascending"), ("sample", "ascending")])
    return table.column("score").to_numpy().astype(np.float32)
