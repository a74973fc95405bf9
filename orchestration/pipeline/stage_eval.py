"""`[stage.eval]`: evaluation inside a recipe, every N tokens and at the stage's end.

    [stage.eval]
    every_tokens = 100_000      # and at the end; leave out: only at the end
    documents = 16              # per source of the stage's [stage.data]
    tasks = "kobest_copa,bpb_ko"
    limit = 20                  # items per task

Each evaluation appends one line to STAGE_DIR/eval.jsonl: the stage, step and tokens, `val_loss`
{source: mean loss per token} and `tasks` {task: metrics} (orchestration/eval, the same scoring as
`hanyeong eval`). `pipeline status` shows the latest line, RUN_DIR/eval.png plots the lines against
the run's tokens, RUN_DIR/report.md ends with each stage's last line (run_report.py).

VALIDATION DOCUMENTS: `documents` per source, held out of training: the stage's loader keeps them
out of every row (data.hold_out defaults to `documents` when a stage has [stage.eval]; the same
documents in every stage and run reading the source: orchestration/data/loader.py, HELD-OUT
DOCUMENTS). A source too small to hold any out (under 10 documents), or a stage that sets
data.hold_out = 0, is scored on a fixed sample of its training documents instead, and the line
says so (`val_held_out`). Each document is cut to the row length of the step; every token counts
(SFT's loss mask is not applied).

A data-parallel stage (workers > 1) does not evaluate while training (each rank holds a shard or a
replica inside a group); evaluate its checkpoint with `hanyeong eval`.
"""

from __future__ import annotations

import json
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hanyeong.errors import ConfigError
from hanyeong.files import read_jsonl
from orchestration.core.batch import Batch
from orchestration.core.config import positive_int
from orchestration.pipeline.stage_callbacks import Callback

EVAL_FILE = "eval.jsonl"


@dataclass(frozen=True)
class StageEvalConfig:
    """`[stage.eval]`: what a stage evaluates and when."""

    every_tokens: int | None = None
    """Evaluate after the first step at or past every multiple of this many tokens; None: only at
    the end (always evaluated at the end)."""
    documents: int = 16
    """Documents per source for the validation loss (a fixed sample; 0: no validation loss)."""
    tasks: str = ""
    """Benchmark tasks, as `hanyeong eval --tasks` takes them ('' : none)."""
    limit: int = 20
    """Items (documents, for bits-per-byte tasks) per task."""
    batch_rows: int = 8
    """Sequences per forward pass."""
    max_new_tokens: int = 64
    """Generation tasks (gsm8k, humaneval): most tokens of an answer."""

    def __post_init__(self) -> None:
        for name in ("limit", "batch_rows", "max_new_tokens"):
            positive_int(getattr(self, name), name)
        if self.every_tokens is not None:
            positive_int(self.every_tokens, "every_tokens")
        if not isinstance(self.documents, int) or isinstance(self.documents, bool) or self.documents < 0:
            raise ConfigError(f"documents must be 0 or more, got {self.documents!r}")
        if not isinstance(self.tasks, str):
            raise ConfigError(f"tasks must be a string of comma-separated task names, got {self.tasks!r}")


read_evals = read_jsonl  # the lines of an eval.jsonl


class Evaluator(Callback):
    """Runs [stage.eval] and appends its lines to STAGE_DIR/eval.jsonl (rank 0 of one worker)."""

    def __init__(self, config: StageEvalConfig, tokenizer_dir: str, path: Path):
        self.config, self.tokenizer_dir, self.path = config, tokenizer_dir, path
        self.started = self.noted = False
        self.tokenizer = self.selected = None

    def before_step(self, run) -> None:
        self.start(run)

    def start(self, run) -> None:
        """Keep the lines up to the checkpoint's step (a resumed stage runs the rest again)."""
        if self.started or not run.main:
            return
        from hanyeong.files import write_atomic

        self.started = True
        kept = [line for line in read_evals(self.path) if line.get("step", 0) <= run.state.step]
        write_atomic(self.path, "".join(json.dumps(line) + "\n" for line in kept))

    def after_step(self, run, record: dict) -> None:
        every, tokens = self.config.every_tokens, run.state.tokens_seen
        step_tokens = record["seq_len"] * record["batch_rows"]
        if every and tokens // every > (tokens - step_tokens) // every and tokens < run.stage.token_budget:
            self.evaluate(run)

    def at_end(self, run) -> None:
        self.start(run)
        lines = read_evals(self.path)
        if not lines or lines[-1].get("step") != run.state.step:  # a stage found finished keeps its line
            self.evaluate(run)

    def evaluate(self, run) -> None:
        if not run.main or run.world > 1:
            return
        started = time.perf_counter()
        model = run.state.model
        line = {"stage": run.name, "step": int(run.state.step), "tokens": int(run.state.tokens_seen)}
        sources = [s for s in run.loader.sources if getattr(s, "offsets", None) is not None]  # not pairs
        if self.config.documents and sources:
            line["val_loss"] = {s.key: validation_loss(run.backend, model, s, self.config.documents,
                                                       run.loader.seq_len, self.config.batch_rows) for s in sources}  # fmt: skip
            line["val_held_out"] = all(len(s.held) for s in sources)
            self.note_unheld(run, [s.key for s in sources if not len(s.held)])
        if self.config.tasks:
            line["tasks"] = {name: result["metrics"] for name, result in self.run_tasks(run, model).items()}
        line["seconds"] = round(time.perf_counter() - started, 3)
        line["time"] = round(time.time(), 3)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")

    def note_unheld(self, run, keys: list[str]) -> None:
        """Say once which sources' validation documents are training documents."""
        if keys and not self.noted:
            self.noted = True
            run.notes.append(f"{run.name}: [stage.eval] validation loss of {', '.join(keys)} is on training documents "
                             "(data.hold_out is 0, or the source has under 10 documents)")  # fmt: skip

    def run_tasks(self, run, model) -> dict:
        from orchestration.eval.evaluate import EvalConfig, evaluate_model
        from orchestration.eval.tasks import benchmarks_dir, select
        from tokenizer.bbpe import BBPETokenizer

        c = self.config
        config = EvalConfig(tasks=c.tasks, limit=c.limit, backend=run.backend.name, batch_rows=c.batch_rows,
                            max_new_tokens=c.max_new_tokens)  # fmt: skip
        if self.tokenizer is None:
            self.tokenizer = BBPETokenizer.load(self.tokenizer_dir)
            self.selected = [s for s in select(c.tasks, benchmarks_dir()) if s.path.exists()]
            missing = [s.task.name for s in select(c.tasks, benchmarks_dir()) if not s.path.exists()]
            if missing:  # a machine without the benchmarks folder still trains
                run.notes.append(f"{run.name}: [stage.eval] skips {', '.join(missing)}: no file under {benchmarks_dir()}")
        return evaluate_model(run.backend, model, self.tokenizer, model.spec, config, self.selected)


def validation_loss(backend, model, source, documents: int, seq_len: int, batch_rows: int) -> float:
    """Mean loss per token (nats) of `documents` of the source's held-out documents (a fixed sample
    of its documents when it holds none out), each cut to seq_len + 1 tokens."""
    from orchestration.data.loader import held_documents

    offsets, n_docs = source.offsets, len(source.offsets) - 1
    if len(source.held):  # the first of the held-out draw: a subset of source.held
        chosen = held_documents(source.key, n_docs, min(documents, len(source.held)))
    else:
        rng = np.random.default_rng(zlib.crc32(source.key.encode()))
        chosen = np.sort(rng.choice(n_docs, size=min(documents, n_docs), replace=False))
    docs = [np.asarray(source.tokens[offsets[i] : min(offsets[i + 1], offsets[i] + seq_len + 1)]) for i in chosen]
    docs = [d for d in docs if len(d) > 1]
    nats, count = 0.0, 0
    for lo in range(0, len(docs), batch_rows):
        chunk = docs[lo : lo + batch_rows]
        width = max(len(d) for d in chunk) - 1
        inputs, targets = np.zeros((len(chunk), width), np.int64), np.zeros((len(chunk), width), np.int64)
        for r, d in enumerate(chunk):
            inputs[r, : len(d) - 1], targets[r, : len(d) - 1] = d[:-1], d[1:]
        logp = backend.logprobs(model, Batch(inputs, targets))
        for r, d in enumerate(chunk):
            nats -= float(np.sum(logp[r, : len(d) - 1], dtype=np.float64))
            count += len(d) - 1
    return round(nats / count, 6)
