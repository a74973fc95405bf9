"""The stage loop's callbacks: ramps, the metrics log, the checkpointer, the progress bar.

Each has three hooks, `before_step(run)`, `after_step(run, record)` and `at_end(run)`, where `run`
is the stage's `StageRun` (orchestration/pipeline/stage.py) and `record` the step's metrics line. None keeps
state of its own beyond what a checkpoint restores: shapes follow from tokens_seen, the data cursor
goes into trainer_state.json, and the metrics log is cut back to the checkpoint's step on resume.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


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
        from hanyeong.files import write_atomic

        try:
            kept = [line for line in self.read() if line["step"] <= step]
        except (json.JSONDecodeError, KeyError, TypeError):  # a line cut by a crash: start afresh
            kept = []
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


class ProgressBar(Callback):
    """A tqdm bar of the stage's tokens on stderr (a terminal only), with the latest loss."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar = enabled, None

    def before_step(self, run) -> None:
        if self.enabled and self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=run.stage.token_budget, initial=run.state.tokens_seen, unit="tok",
                            unit_scale=True, desc=run.name, file=sys.stderr, disable=None,
                            dynamic_ncols=True)  # fmt: skip

    def after_step(self, run, record: dict) -> None:
        if self.bar is not None:
            self.bar.update(record["seq_len"] * record["batch_rows"])
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)

    def at_end(self, run) -> None:
        if self.bar is not None:
            self.bar.close()
