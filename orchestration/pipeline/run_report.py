"""What a run directory shows: `hanyeong pipeline status` rows, RUN_DIR/loss.png, and for stages with
[stage.eval] RUN_DIR/eval.png and the eval table of RUN_DIR/report.md."""

from __future__ import annotations

import json
from pathlib import Path

from hanyeong.files import read_jsonl
from orchestration.pipeline.run_manifest import RunManifest

COLUMNS = ("stage", "kind", "status", "tokens / budget", "last loss", "last eval", "wall", "attempts", "checkpoint")


read_metrics = read_jsonl  # the lines of its metrics.jsonl


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
                     "-" if loss is None else f"{loss:.4f}", eval_summary(run_dir / s.dir), _duration(s.seconds), str(attempts),
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

    from hanyeong.files import write_figure

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
    return write_figure(Path(run_dir) / "loss.png", figure)


# ---- [stage.eval]: STAGE_DIR/eval.jsonl (orchestration/pipeline/stage_eval.py) -------------------


def eval_summary(stage_dir: Path) -> str:
    """`pipeline status`'s "last eval": the mean validation loss and each task's first metric of
    the stage's latest eval line; '-' without one."""
    from orchestration.pipeline.stage_eval import EVAL_FILE, read_evals

    lines = read_evals(stage_dir / EVAL_FILE)
    if not lines:
        return "-"
    line, parts = lines[-1], []
    losses = list(line.get("val_loss", {}).values())
    if losses:
        parts.append(f"val {sum(losses) / len(losses):.3f}")
    for name, metrics in line.get("tasks", {}).items():
        key = next(iter(metrics), None)
        if key is not None:
            parts.append(f"{name} {metrics[key]:.3f}")
    return ", ".join(parts) or "-"


def eval_table(run_dir: Path, manifest: RunManifest) -> str | None:
    """Markdown: per stage, its last eval line's validation loss per source and task metrics
    (rows: stages; columns: every source and task metric seen); None when no stage evaluated."""
    from orchestration.pipeline.stage_eval import EVAL_FILE, read_evals

    rows, columns = [], []
    for i, stage in enumerate(manifest.stages):
        lines = read_evals(run_dir / stage.dir / EVAL_FILE)
        if not lines:
            continue
        cells = {f"val {k}": v for k, v in lines[-1].get("val_loss", {}).items()}
        for task, metrics in lines[-1].get("tasks", {}).items():
            cells |= {f"{task} {m}": v for m, v in metrics.items() if m in ("acc", "acc_norm", "exact_match",
                                                                           "pass@1", "bits_per_byte")}  # fmt: skip
        columns += [c for c in cells if c not in columns]
        mark = " *" if lines[-1].get("val_held_out") is False else ""
        rows.append((f"{i + 1}. {stage.name}{mark}", lines[-1]["tokens"], cells))
    if not rows:
        return None
    out = ["| stage | tokens | " + " | ".join(columns) + " |", "|---|---:|" + "---:|" * len(columns)]
    for name, tokens, cells in rows:
        values = [f"{cells[c]:.4f}" if c in cells else "" for c in columns]
        out.append(f"| {name} | {tokens:,} | " + " | ".join(values) + " |")
    if any(name.endswith(" *") for name, _, _ in rows):
        out += ["", "\\* validation loss partly on training documents (data.hold_out = 0, or a source of under 10 "
                "documents)."]  # fmt: skip
    return "\n".join(out) + "\n"


def write_report(run_dir: Path, manifest: RunManifest) -> Path:
    """RUN_DIR/report.md: the stages (status rows) and, when any stage evaluated, the eval table
    (validation loss is on each source's held-out documents: stage_eval.py)."""
    from hanyeong.files import write_atomic

    header = ("stage", "kind", "status", "tokens / budget", "last loss", "wall")
    keep = [COLUMNS.index(c) for c in header]
    lines = [f"# {manifest.name}", "", "## Stages", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]  # fmt: skip
    for row in status_rows(manifest, run_dir):
        lines.append("| " + " | ".join(row[k] for k in keep) + " |")
    lines += ["", "Training loss: loss.png."]
    table = eval_table(run_dir, manifest)
    if table:
        lines += ["", "## Evaluation", "", "Each stage's last [stage.eval] (validation loss in nats per token on "
                  "each source's documents held out of training; task metrics as `hanyeong eval`). "
                  "Curves: eval.png.", "", table.rstrip()]  # fmt: skip
    out = Path(run_dir) / "report.md"
    write_atomic(out, "\n".join(lines) + "\n")
    return out


def plot_evals(run_dir: Path, manifest: RunManifest) -> Path | None:
    """RUN_DIR/eval.png: each source's validation loss (left) and each task's first metric (right)
    against the run's cumulative tokens; None when no stage evaluated."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    from hanyeong.files import write_figure
    from orchestration.pipeline.stage_eval import EVAL_FILE, read_evals

    series: dict[tuple[int, str], dict[str, list]] = {}
    offset = 0
    for stage in manifest.stages:
        for line in read_evals(run_dir / stage.dir / EVAL_FILE):
            x = offset + line["tokens"]
            for source, loss in line.get("val_loss", {}).items():
                series.setdefault((0, source), {}).setdefault(stage.name, []).append((x, loss))
            for task, metrics in line.get("tasks", {}).items():
                key = next(iter(metrics), None)
                if key is not None:
                    series.setdefault((1, f"{task} {key}"), {}).setdefault(stage.name, []).append((x, metrics[key]))
        offset += stage.token_budget
    if not series:
        return None
    figure = Figure(figsize=(12, 4.5), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2)
    for n, (panel, name) in enumerate(sorted(series)):
        points = sorted(p for stage_points in series[(panel, name)].values() for p in stage_points)
        axes[panel].plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3,
                         color=f"C{n % 10}", label=name)  # fmt: skip
    for ax, label in zip(axes, ("validation loss (nats/token)", "task metric")):
        ax.xaxis.set_major_formatter(EngFormatter())
        ax.set_xlabel("tokens (cumulative over stages)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    figure.suptitle(f"{manifest.name}: [stage.eval]")
    figure.tight_layout()
    return write_figure(Path(run_dir) / "eval.png", figure)
