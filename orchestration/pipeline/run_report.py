"""What a run directory shows: `hanyeong pipeline status` rows and RUN_DIR/loss.png."""

from __future__ import annotations

import io
import json
from pathlib import Path

from orchestration.pipeline.run_manifest import RunManifest

COLUMNS = ("stage", "kind", "status", "tokens / budget", "last loss", "wall", "attempts", "checkpoint")


def read_metrics(path: Path) -> list[dict]:
    """The lines of a metrics.jsonl (a line cut short by a crash is skipped)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def status_rows(manifest: RunManifest, run_dir: Path, driver_alive: bool = True) -> list[tuple[str, ...]]:
    """One row per stage: COLUMNS. A running stage shows its metrics' latest tokens and loss, its
    attempts so far and its last checkpoint's step; with its driver gone (`driver_alive` False)
    it is `interrupted`."""
    rows = []
    for i, s in enumerate(manifest.stages):
        tokens, loss, attempts, saved = s.tokens, s.last_loss, s.attempts, s.checkpoint
        status = s.status + (f": {s.error}" if s.error else "")
        if s.status == "running":
            lines = read_metrics(run_dir / s.dir / "metrics.jsonl")
            if lines:
                tokens, loss = lines[-1]["tokens"], lines[-1]["loss"]
            attempts = max(attempts, count_attempts(run_dir / s.dir / "attempts.jsonl"))
            step = checkpoint_step(run_dir / s.dir / "checkpoint")
            saved = None if step is None else f"{s.dir}/checkpoint (step {step})"
            status = "running" if driver_alive else "interrupted"
        share = f" ({tokens / s.token_budget:.0%})" if s.token_budget and tokens < s.token_budget else ""
        rows.append((f"{i + 1}. {s.name}", s.kind, status, f"{tokens:,} / {s.token_budget:,}{share}",
                     "-" if loss is None else f"{loss:.4f}", _duration(s.seconds), str(attempts),
                     saved or "-"))  # fmt: skip
    return rows


def interrupted_line(manifest: RunManifest, run_dir: Path, driver: str | None) -> str:
    """What to do about a run whose driver (`driver` describes it; None: it left no lock) is gone."""
    where = ""
    for i, s in enumerate(manifest.stages):
        if s.status == "running":
            step = checkpoint_step(run_dir / s.dir / "checkpoint")
            resumes = "starts over (no checkpoint yet)"
            if step is not None:
                resumes = f"resumes from its checkpoint of step {step}"
            where = f": stage {i + 1} {s.name!r} {resumes}"
            break
    gone = f"its `hanyeong pipeline run`, {driver}, is gone" if driver else "no `hanyeong pipeline run` holds it"
    return f"interrupted — rerun the same command to resume{where} ({gone})"


def count_attempts(path: Path) -> int:
    """Starts of a stage so far: attempts.jsonl lines of single workers or of rank 0 of a group."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return 0
    count = 0
    for line in lines:
        try:
            count += json.loads(line).get("rank", 0) == 0
        except (json.JSONDecodeError, AttributeError):  # a line cut by a kill
            continue
    return count


def checkpoint_step(path: Path) -> int | None:
    """The step of a stage's checkpoint (its trainer_state.json), None when there is none yet."""
    from hanyeong.errors import CheckpointError
    from orchestration.core.checkpoint import read_trainer_state

    try:
        return int(read_trainer_state(path)["step"])
    except (CheckpointError, KeyError, TypeError, ValueError):
        return None


def _duration(seconds: float) -> str:
    if not seconds:
        return "-"
    minutes, sec = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{sec:02d}s" if minutes else f"{seconds:.1f}s"


def plot_losses(run_dir: Path, manifest: RunManifest) -> Path:
    """RUN_DIR/loss.png: training loss against cumulative tokens, one colour per stage."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg without touching pyplot's state
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    from hanyeong.files import write_atomic

    figure = Figure(figsize=(9, 4.5), dpi=120)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    offset = 0
    for i, stage in enumerate(manifest.stages):
        lines = read_metrics(run_dir / stage.dir / "metrics.jsonl")
        if lines:
            x = [offset + line["tokens"] for line in lines]
            ax.plot(x, [line["loss"] for line in lines], color=f"C{i % 10}", linewidth=1.2,
                    label=f"{stage.name} ({stage.kind})")  # fmt: skip
        offset += stage.token_budget
        ax.axvline(offset, color="0.85", linewidth=0.8, zorder=0)
    ax.xaxis.set_major_formatter(EngFormatter())
    ax.set_xlabel("tokens (cumulative over stages)")
    ax.set_ylabel("training loss")
    ax.set_title(f"{manifest.name}: loss per stage")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    out = Path(run_dir) / "loss.png"
    write_atomic(out, buffer.getvalue())
    return out
