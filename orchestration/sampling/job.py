"""Generation as a job: N sampled answers per prompt from a checkpoint, written as a Parquet dataset.

    OUT/job.json              what is being generated: checkpoint, tokenizer and prompts (sha256),
                              the sampling settings; a resumed job must match it
    OUT/part-00000.parquet    the samples of prompts [0, prompts_per_part), one row per (prompt, sample)
    OUT/manifest.json         written last: counts, finish reasons, tokens, throughput

Columns: prompt_index, prompt (text, or the chat turns as JSON), chat (which of the two), reference
(the record's own answer or null), sample (0..n-1), answer (decoded, special tokens left out),
prompt_ids (what the model saw: [BOS] + the rendering), answer_ids, prompt_tokens, answer_tokens,
finish_reason ("stop": a stop id ended it, kept in answer_ids; "length": max_new_tokens).

SAMPLING KEYS. Sample j of prompt i draws its tokens from its own random stream, keyed by (seed, i,
j) (core/generation.py `sample_key`), so its answer does not depend on which rows share its batch, on
the batch size or on the number of workers; a killed job continues from the parts not yet written
and gives what an uninterrupted one would. Workers are a pool of Ray actors, one model each (torch
actors take a GPU where the cluster has them, MLX actors the `apple_silicon` resource); one worker
on a local machine runs in this process without Ray.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from hanyeong.errors import ConfigError, DataError
from hanyeong.files import write_atomic
from orchestration.sampling.prompts import Prompt, prompt_ids, read_prompts

JOB_FILE, MANIFEST_FILE = "job.json", "manifest.json"
FORMAT = "hanyeong-generations"


@dataclass(frozen=True)
class GenerateConfig:
    """How answers are sampled and how the work is cut; the CLI options map onto these fields."""

    n: int = 1
    """Samples per prompt."""
    temperature: float = 1.0
    """0: greedy (every sample the same); above: sampling at this temperature."""
    top_p: float = 1.0
    """Nucleus: keep the smallest set of tokens holding this much probability."""
    top_k: int = 0
    """Keep the k most likely tokens (0: all)."""
    max_new_tokens: int = 256
    """Most tokens of an answer."""
    stop: tuple[str, ...] = ("[|endofturn|]", "[EOS]")
    """Tokens that end an answer (kept in answer_ids, left out of the text)."""
    seed: int = 0
    """With the prompt's index and the sample's number, keys each sample's random stream."""
    chat: bool = False
    """Ask plain `prompt` fields as a user turn of the chat template (conversations always are)."""
    reasoning: bool = False
    """Ask chat prompts as EXAONE Deep's REASONING_TEMPLATE does (the answer opened with
    `<thought>`); `<thought>` / `</thought>` may be sampled and stay in the answer's text."""
    batch_rows: int = 32
    """Rows (prompt x sample) per generate call, prompts of similar length together."""
    prompts_per_part: int = 64
    """Prompts per Parquet part: the unit of work and of resume."""
    workers: int = 1
    """Ray actors, one model each; 1 on a local machine: this process."""
    backend: str = "torch"
    """'torch' or 'mlx'."""
    limit: int | None = None
    """The first N prompts only."""

    def __post_init__(self) -> None:
        for name in ("n", "max_new_tokens", "batch_rows", "prompts_per_part", "workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be 0 or more, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be 0 or more, got {self.top_k}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be at least 1, got {self.limit}")
        if not self.stop:
            raise ConfigError("stop: at least one token must end an answer")

    def sampling(self) -> dict:
        """The settings that decide the answers (the job's identity, with its inputs)."""
        keys = ("n", "temperature", "top_p", "top_k", "max_new_tokens", "stop", "seed", "chat")
        settings = {k: v for k, v in asdict(self).items() if k in keys}
        return settings | ({"reasoning": True} if self.reasoning else {})  # off: older jobs keep their identity


def sha256_of(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class Sampler:
    """One model and its tokenizer, sampling the answers of a part's prompts (a Ray actor's body)."""

    def __init__(self, ckpt: str, backend: str, tokenizer_dir: str, config: GenerateConfig):
        from orchestration.core.backends import get_backend
        from orchestration.core.generation import suppressed_ids
        from tokenizer.bbpe import BBPETokenizer

        self.config, self.backend = config, get_backend(backend)
        self.model = self.backend.load(ckpt)
        self.tokenizer = BBPETokenizer.load(tokenizer_dir)
        self.stop_ids = stop_ids(self.tokenizer, config.stop)
        spec = self.model.spec
        thoughts = [self.tokenizer.hf.token_to_id(t) for t in ("<thought>", "</thought>")] if config.reasoning else []
        self.suppress = suppressed_ids(spec.vocab_size, self.stop_ids, allow_ids=thoughts,
                                       tokenizer_size=self.tokenizer.vocab_size)  # fmt: skip

    def run(self, prompts: list[Prompt]) -> list[dict]:
        """Every (prompt, sample) row of the part, in prompt then sample order."""
        from orchestration.core.generation import sample_key

        c = self.config
        ids = prompt_ids(self.tokenizer, prompts, reasoning=c.reasoning)
        rows = [(p, j, ids[k]) for k, p in enumerate(prompts) for j in range(c.n)]
        order = sorted(range(len(rows)), key=lambda r: len(rows[r][2]))  # similar lengths share a batch
        answers: dict[int, list[int]] = {}
        for lo in range(0, len(order), c.batch_rows):
            batch = order[lo : lo + c.batch_rows]
            keys = [sample_key(c.seed, rows[r][0].index, rows[r][1]) for r in batch]
            out = self.backend.generate(self.model, [rows[r][2] for r in batch], c.max_new_tokens, c.temperature,
                                        c.top_p, stop_ids=self.stop_ids, suppress_ids=self.suppress,
                                        row_seeds=keys, top_k=c.top_k)  # fmt: skip
            answers.update(zip(batch, out))
        return [{"prompt_index": p.index, "prompt": p.shown(), "chat": p.messages is not None,
                 "reference": p.reference, "sample": j, "answer": self.text(answers[r]),
                 "prompt_ids": prompt, "answer_ids": answers[r],
                 "prompt_tokens": len(prompt), "answer_tokens": len(answers[r]),
                 "finish_reason": "stop" if answers[r] and answers[r][-1] in self.stop_ids else "length"}
                for r, (p, j, prompt) in enumerate(rows)]  # fmt: skip


    def text(self, answer: list[int]) -> str:
        """An answer's text: special tokens left out, but a reasoning answer's thought tags kept
        (the prompt opened the thought; the text starts inside it)."""
        if not self.config.reasoning:
            return self.tokenizer.stream_decoder(skip_special_tokens=True).decode(answer)
        return self.tokenizer.decode([i for i in answer if i not in self.stop_ids])


def stop_ids(tokenizer, names: tuple[str, ...]) -> list[int]:
    """The ids of the stop tokens; ConfigError naming one the tokenizer does not have."""
    ids = []
    for name in names:
        i = tokenizer.hf.token_to_id(name)
        if i is None:
            raise ConfigError(f"stop: {name!r} is not a token of the tokenizer")
        ids.append(i)
    return ids


def part_path(out: Path, part: int) -> Path:
    return out / f"part-{part:05d}.parquet"


def write_part(path: Path, rows: list[dict], sampling: dict) -> None:
    """One part, atomically (a part that exists is whole: the unit of resume)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("prompt_index", pa.int64()), ("prompt", pa.string()), ("chat", pa.bool_()),
                        ("reference", pa.string()), ("sample", pa.int32()), ("answer", pa.string()),
                        ("prompt_ids", pa.list_(pa.int32())), ("answer_ids", pa.list_(pa.int32())),
                        ("prompt_tokens", pa.int32()), ("answer_tokens", pa.int32()),
                        ("finish_reason", pa.string())],
                       metadata={"hanyeong.sampling": json.dumps(sampling)})  # fmt: skip
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink, compression="zstd")
    write_atomic(path, sink.getvalue().to_pybytes())


def start_job(out: Path, job: dict) -> set[int]:
    """Write OUT/job.json, or check a resumed job matches it; the parts already written."""
    file, job = out / JOB_FILE, json.loads(json.dumps(job))  # as it reads back (tuples are lists)
    if file.is_file():
        before = json.loads(file.read_text(encoding="utf-8"))
        if before != job:
            changed = sorted(k for k in set(job) | set(before) if job.get(k) != before.get(k))
            raise ConfigError(f"{out}: holds another generation job (its {', '.join(changed)} differ); "
                              "give another --out, or remove it")  # fmt: skip
    else:
        if out.exists() and any(out.iterdir()):
            raise ConfigError(f"{out}: not empty and not a generation job's folder")
        write_atomic(file, json.dumps(job, indent=2) + "\n")
    return {int(p.stem.split("-")[1]) for p in out.glob("part-*.parquet")}


def generate_dataset(ckpt: str | Path, prompts: list[str | Path], out: str | Path, config: GenerateConfig,
                     tokenizer_dir: str | Path | None = None, address: str | None = None,
                     progress: bool = True) -> dict:  # fmt: skip
    """Sample the answers of every prompt not yet written into OUT; returns OUT/manifest.json."""
    from orchestration.core.checkpoint import INDEX_FILE, verify
    from orchestration.eval.evaluate import load_tokenizer
    from tokenizer.corpus import expand_paths

    out, started = Path(out), time.perf_counter()
    verify(ckpt)
    tokenizer, tokenizer_dir = load_tokenizer(ckpt, tokenizer_dir)
    stop_ids(tokenizer, config.stop)  # a bad stop token is one line before any work
    files = expand_paths(prompts)
    if not files:
        raise DataError(f"{', '.join(map(str, prompts))}: no prompt files there")
    items, skipped = read_prompts(files, config.chat, limit=config.limit)
    job = {"format": FORMAT, "checkpoint": str(ckpt),
           "checkpoint_sha256": hashlib.sha256((Path(ckpt) / INDEX_FILE).read_bytes()).hexdigest(),
           "tokenizer_sha256": sha256_of([Path(tokenizer_dir) / "tokenizer.json"]),
           "prompts": [str(f) for f in files], "prompts_sha256": sha256_of(files), "limit": config.limit,
           "prompts_per_part": config.prompts_per_part, "sampling": config.sampling()}  # fmt: skip
    done = start_job(out, job)
    size = config.prompts_per_part
    parts = {k: items[k * size : (k + 1) * size] for k in range(-(-len(items) // size)) if k not in done}
    run_parts(ckpt, tokenizer_dir, config, parts, out, address, progress)
    return write_manifest(out, job, len(items), skipped, time.perf_counter() - started)


def run_parts(ckpt, tokenizer_dir, config: GenerateConfig, parts: dict[int, list[Prompt]], out: Path,
              address: str | None, progress: bool) -> None:  # fmt: skip
    """Each part's rows written as it finishes: in this process, or on a pool of Ray actors."""
    from tqdm import tqdm

    bar = tqdm(total=len(parts), unit="part", desc="generate", disable=not progress or not parts)
    sampling = config.sampling()
    if not parts:
        return
    if config.workers == 1 and address is None:
        sampler = Sampler(str(ckpt), config.backend, str(tokenizer_dir), config)
        for k, prompts in parts.items():
            write_part(part_path(out, k), sampler.run(prompts), sampling)
            bar.update()
        bar.close()
        return
    from orchestration.cluster.ray_session import ray_session

    with ray_session(num_cpus=None if address else config.workers, address=address) as ray:
        actor = ray.remote(Sampler).options(**actor_options(ray, config))
        pool = [actor.remote(str(ckpt), config.backend, str(tokenizer_dir), config) for _ in range(config.workers)]
        idle, queue, running = list(pool), list(parts.items()), {}
        while queue or running:
            while idle and queue:  # every actor busy; parts in order, written as each finishes
                sampler, (k, prompts) = idle.pop(), queue.pop(0)
                running[sampler.run.remote(prompts)] = (k, sampler)
            ready, _ = ray.wait(list(running), num_returns=1)
            k, sampler = running.pop(ready[0])
            write_part(part_path(out, k), ray.get(ready[0]), sampling)
            idle.append(sampler)
            bar.update()
    bar.close()


def actor_options(ray, config: GenerateConfig) -> dict:
    """One sampler's Ray resources: the backend's device where the cluster has it, else a CPU."""
    from orchestration.cluster.resources import ray_options, worker_resources

    need = worker_resources(config.backend, {}, ray.cluster_resources(), node_cpus=1, workers=config.workers,
                            where="generate")  # fmt: skip
    return ray_options(need)


def write_manifest(out: Path, job: dict, prompts: int, skipped: Counter, seconds: float) -> dict:
    """OUT/manifest.json from the parts: rows, finish reasons, tokens (written last: the job is done)."""
    import pyarrow.parquet as pq

    rows, reasons, tokens = 0, Counter(), 0
    for path in sorted(out.glob("part-*.parquet")):
        table = pq.read_table(path, columns=["finish_reason", "answer_tokens"])
        rows += table.num_rows
        reasons.update(table.column("finish_reason").to_pylist())
        tokens += sum(table.column("answer_tokens").to_pylist())
    manifest = {**job, "prompts_read": prompts, "skipped": dict(skipped), "rows": rows,
                "finish_reasons": dict(reasons), "answer_tokens": tokens,
                "seconds_this_run": round(seconds, 3)}  # fmt: skip
    write_atomic(out / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    return manifest


def finished(out: str | Path) -> Path:
    """OUT, when it holds a finished generation job; DataError saying what it is otherwise."""
    out = Path(out)
    if not (out / MANIFEST_FILE).is_file():
        unfinished = (out / JOB_FILE).is_file()
        raise DataError(f"{out}: " + ("an unfinished generation job (run it again to finish it)" if unfinished
                                      else "not a generation job's folder"))  # fmt: skip
    return out


def read_generations(out: str | Path, columns: list[str] | None = None):
    """A finished job's rows as one Arrow table, ordered by (prompt_index, sample)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = sorted(finished(out).glob("part-*.parquet"))
    table = pa.concat_tables([pq.read_table(p, columns=columns) for p in parts])
    return table.sort_by([("prompt_index", "ascending"), ("sample", "ascending")])


def read_job(out: str | Path) -> dict:
    """OUT/manifest.json of a finished job (its provenance: checkpoint, prompts, sampling, counts)."""
    return json.loads((finished(out) / MANIFEST_FILE).read_text(encoding="utf-8"))
