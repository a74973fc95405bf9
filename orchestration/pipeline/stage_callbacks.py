"""The stage loop's callbacks: ramps, the metrics log, the checkpointer, the progress bar (whose
StageBar the Ray runner also draws from a stage's metrics.jsonl).

Each has three hooks, `before_step(run)`, `after_step(run, record)` and `at_end(run)`, where `run`
is the stage's `StageRun` (orchestration/pipeline/stage.py) and `record` the step's metrics line. None keeps
state of its own beyond what a checkpoint restores: shapes follow from tokens_seen, the data cursor
goes into trainer_state.json, and the metrics log is cut back to the checkpoint's step on resume.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from orchestration.core import checkpoint


class Callback:
    def before_step(self, run) -> None:
        pass

    def after_step(self, run, record: dict) -> None:
        pass

    def at_end(self, run) -> None:
        pass


class Ramps(Callback):
    """Sequence-length and batch ramps: each step's (seq_len, rows) from the stage's plan."""

    def before_step(self, run) -> None:
        run.loader.seq_len, run.loader.batch_rows = run.stage.shape_at(run.state.tokens_seen)


class MetricsLog(Callback):
    """STAGE_DIR/metrics.jsonl: one JSON line per step, flushed as written so a watcher can tail it.
    Of a data-parallel group only rank 0 writes (`write`); every rank keeps its records."""

    def __init__(self, path: Path, write: bool = True):
        self.path, self.write = path, write

    def reset(self) -> None:
        if self.write:
            self.path.unlink(missing_ok=True)

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        lines = self.path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def truncate(self, step: int) -> None:
        """Keep the lines of steps up to `step` (a checkpoint's): the steps after it run again."""
        from hanyeong.files import read_jsonl, write_atomic

        # read_jsonl skips a line a kill cut short (the last one), keeping every whole line before it
        kept = [line for line in read_jsonl(self.path) if isinstance(line.get("step"), int) and line["step"] <= step]
        write_atomic(self.path, "".join(json.dumps(line) + "\n" for line in kept))

    def after_step(self, run, record: dict) -> None:
        if self.write:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
        run.records.append(record)


class Checkpointer(Callback):
    """STAGE_DIR/checkpoint after the first step at or past every `every_tokens`, and at the end.

    backend.save writes it atomically (a temporary directory renamed over the old one), with the
    loader's cursor as trainer_state.json's data_cursor. In a data-parallel group every rank calls
    it (FSDP gathers the shards) and the backend returns once rank 0's files are in place, so the
    ranks agree on what is on disk.
    """

    def __init__(self, every_tokens: int | None):
        self.every = every_tokens
        self.saved_step = None

    def save(self, run) -> None:
        run.state.data_cursor = run.loader.state()
        run.backend.save(run.state.model, run.checkpoint_dir, run.state)
        self.saved_step = run.state.step

    def after_step(self, run, record: dict) -> None:
        tokens, step_tokens = run.state.tokens_seen, record["seq_len"] * record["batch_rows"]
        if self.every and tokens // self.every > (tokens - step_tokens) // self.every:
            self.save(run)

    def at_end(self, run) -> None:
        # a stage found finished (no step in this call) keeps its checkpoint untouched
        if not run.checkpoint_dir.is_dir() or (run.records and self.saved_step != run.state.step):
            self.save(run)
        # An FSDP stage's pieces get their weights consolidated beside them (one piece in memory at a
        # time), so the next stage, evaluation and export read one model.safetensors; a retry of a
        # stage killed before this finds it missing and does it.
        sharded = checkpoint.is_sharded(run.checkpoint_dir)
        if run.main and sharded and not checkpoint.has_weights_file(run.checkpoint_dir):
            run.backend.consolidate(run.checkpoint_dir, weights_only=True)


class ProgressBar(Callback):
    """A StageBar of the stage's tokens on stderr (a terminal only), with the time left and the loss."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar = enabled, None

    def before_step(self, run) -> None:
        if self.enabled and self.bar is None:
            self.bar = StageBar(run.name, run.stage.token_budget, initial=run.state.tokens_seen)

    def after_step(self, run, record: dict) -> None:
        if self.bar is not None:
            self.bar.show(record)

    def at_end(self, run) -> None:
        if self.bar is not None:
            self.bar.close()


# elapsed is the stage's wall time so far; the time left comes from the pace of its steps
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} tokens [{elapsed}{postfix}]"


class StageBar:
    """A stage's progress line: tokens against the budget, wall time, time left, latest loss.

    The time left is (budget - tokens) at the pace of the steps seen so far (metrics lines'
    `time` and `tokens`), so worker start-up, data loading and a resume's jump to its checkpoint
    do not skew it the way a rate since the bar's start does."""

    def __init__(self, desc: str, budget: int, initial: int = 0, enabled: bool = True):
        from tqdm import tqdm

        self.budget, self.first, self.started = budget, None, time.time()
        self.bar = tqdm(total=budget, initial=initial, desc=desc, unit="tok", unit_scale=True, dynamic_ncols=True,
                        disable=None if enabled else True, file=sys.stderr, bar_format=BAR_FORMAT,
                        postfix="? left")  # fmt: skip

    def show(self, record: dict) -> None:
        """Move to a metrics line (a retried attempt may step back: its pace is measured afresh).
        Lines written before the bar started (a resumed stage's old ones) give no pace."""
        tokens, now = int(record.get("tokens", 0)), record.get("time")
        if now is not None and now >= self.started and (self.first is None or tokens < self.first[1]):
            self.first = (now, tokens)
        self.bar.n = min(tokens, self.budget)
        parts = [f"{time_left(self.first, (now, tokens), self.budget)} left"]
        if "loss" in record:
            parts.append(f"loss {record['loss']:.3f}")
        self.bar.set_postfix_str(", ".join(parts), refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def time_left(first: tuple[float, int] | None, last: tuple[float | None, int], budget: int) -> str:
    """'1m50s': the budget's remaining tokens at the pace between two metrics lines; '?' before."""
    if first is None or last[0] is None or last[1] <= first[1] or last[0] <= first[0]:
        return "?"
    seconds = (budget - last[1]) * (last[0] - first[0]) / (last[1] - first[1])
    minutes, sec = divmod(max(0, round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{sec:02d}s" if minutes else f"{sec}s"
