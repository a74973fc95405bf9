"""What a preference stage (kinds dpo, ipo, simper) adds to run_stage: its `[stage.preference]`
settings and the reference model's log-probs.

REFERENCE: precomputed. Before the first step the start model (the stage's start checkpoint, or its
init) scores every pair's chosen and rejected answers once; the float32 [pairs, 2] array is stored
in STAGE_DIR/reference/<start hash>-<dataset hash>.npy (the start checkpoint's weights file SHA-256,
or the spec and seed of an init; the datasets' content hashes and the row length), so a resumed
stage reads it back and a changed start or dataset computes it again. The scoring model is dropped
before training: no second model sits in memory. Of a data-parallel group rank 0 alone computes and
writes it; the other ranks wait for the file and read it, so every rank trains on the same numbers.
(Ray tasks over the dataset: not yet.)

REFERENCE: live (`[stage.preference] reference = "live"`, for data generated on the fly). The start
model stays loaded beside the trained one (twice the weights' memory) and scores each global batch's
pairs as it is drawn (every rank scores the whole global batch, so every rank has the same numbers);
nothing is stored. On the same data it gives the cached reference's losses and metrics.

HELD-BACK PAIRS: `held_out` pairs (at most a tenth), drawn from the seed, never reach a batch; they
are scored at the stage's start and end (`evaluate`: preference accuracy and reward margin) into
STAGE_DIR/preference.json and the run's echo. At the start of a dpo/ipo stage the model IS the
reference, so every reward is 0 and the accuracy 50% (ties count half) by construction; the
reference-free `logp_accuracy` (chosen answer's mean token log-prob the higher) says what the start
model prefers on its own.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hanyeong.errors import ConfigError
from orchestration.pipeline.stage_callbacks import Callback

REFERENCE_DIR = "reference"
REFERENCE_MODES = ("cached", "live")
REFERENCE_WAIT_S = 6 * 3600.0  # how long the other ranks wait for rank 0's reference log-probs


@dataclass(frozen=True)
class PreferenceSettings:
    """`[stage.preference]`: the objective's settings (kinds dpo, ipo, simper)."""

    beta: float = 0.1
    """DPO's beta (the strength of the KL tie to the reference); IPO's tau. SimPER has none."""
    label_smoothing: float = 0.0
    """Conservative DPO: the assumed rate of flipped labels, in [0, 0.5)."""
    sft_weight: float = 0.0
    """Weight of an SFT term on the chosen answer (its mean token NLL), as RPO adds; 0: none."""
    held_out: int = 64
    """Pairs kept out of training and scored at the stage's start and end (at most a tenth)."""
    reference: str = "cached"
    """'cached': the reference's log-probs computed once before training and stored; 'live': the
    reference model stays loaded and scores each batch as it is drawn (data generated on the fly)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.beta < float("inf"):
            raise ConfigError(f"beta must be > 0, got {self.beta!r}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing!r}")
        if not 0.0 <= self.sft_weight < float("inf"):
            raise ConfigError(f"sft_weight must be >= 0, got {self.sft_weight!r}")
        if isinstance(self.held_out, bool) or not isinstance(self.held_out, int) or self.held_out < 0:
            raise ConfigError(f"held_out must be an integer >= 0, got {self.held_out!r}")
        if self.reference not in REFERENCE_MODES:
            raise ConfigError(f"reference must be one of {', '.join(REFERENCE_MODES)}, got {self.reference!r}")

    def per_row(self, loss: str) -> dict[str, float]:
        """The values each batch row carries for `loss` (cuda_model/losses.py's pair layout)."""
        out = {} if loss == "simper" else {"beta": self.beta}
        if loss == "dpo" and self.label_smoothing:
            out["label_smoothing"] = self.label_smoothing
        if self.sft_weight:
            out["sft_weight"] = self.sft_weight
        return out


def start_hash(source: str | None, spec, seed: int) -> str:
    """SHA-256 of the start checkpoint's weights file, or of the spec and seed of an init."""
    from orchestration.core import checkpoint
    from orchestration.data.shards import file_sha256

    if source is not None:
        return file_sha256(str(checkpoint.weights_file(source)))
    return hashlib.sha256(json.dumps([spec.to_dict(), seed], sort_keys=True).encode()).hexdigest()


def prepare_pairs(run, recipe, init_from: str | None) -> list:
    """Give the stage's PairLoader its per-row settings, its held-back pairs and (dpo, ipo) the
    reference log-probs; score the held-back pairs at step 0. Returns the loop's HeldOut callback."""
    loader, stage = run.loader, run.stage
    settings = stage.preference or PreferenceSettings()
    loader.settings = settings.per_row(stage.loss)
    loader.hold_out(settings.held_out)
    if stage.loss != "simper" and settings.reference == "live":
        from orchestration.pipeline.stage import start_model

        loader.live = (run.backend, start_model(run.backend, recipe, run.index, init_from, run.directory, run.main))
    elif stage.loss != "simper":
        loader.reference = reference_logps(run, recipe, init_from)
    held = HeldOut(run.directory / HELD_OUT_FILE)
    if run.state.step == 0 and len(loader.held):
        # dpo/ipo: the start model is the reference, whose log-probs are at hand
        logps = None if loader.reference is None else loader.reference[loader.held]
        held.write(run, "start", evaluate(run.backend, run.state.model, loader, loader.held, logps))
    return [held, RewardPlot(run.directory / PLOT_FILE)]


def reference_logps(run, recipe, init_from: str | None) -> np.ndarray:
    """The start model's summed answer log-probs of every pair, float32 [pairs, 2]: read from
    STAGE_DIR/reference/ or computed (and written by rank 0)."""
    from orchestration.pipeline.stage import start_model, wait_for

    loader, stage = run.loader, run.stage
    source = init_from or (None if stage.start in ("init", "previous") else stage.start)
    source = source or recipe.run.init_checkpoint
    key = start_hash(source, recipe.run.model_spec(), recipe.run.seed)
    path = run.directory / REFERENCE_DIR / f"{key[:16]}-{loader.data_hash[:16]}.npy"
    if path.exists():
        return np.load(path)
    if not run.main:  # rank 0 scores the pairs once; the other ranks read what it wrote
        wait_for(path, REFERENCE_WAIT_S)
        return np.load(path)
    from hanyeong.files import write_atomic
    from orchestration.data.pair_loader import answer_logps

    model = start_model(run.backend, recipe, run.index, init_from, run.directory, run.main)
    reference = answer_logps(run.backend, model, loader, np.arange(len(loader.pairs)))
    del model
    buffer = io.BytesIO()
    np.save(buffer, reference)
    write_atomic(path, buffer.getvalue())
    return reference


HELD_OUT_FILE = "preference.json"


class HeldOut(Callback):
    """The held-back pairs' scores at the stage's start and end: STAGE_DIR/preference.json
    {"held_out": pairs, "start": {...}, "end": {...}} (rank 0 writes), and a note for the run's echo.
    A reward stage passes its own scoring and note (reward_stage.py)."""

    def __init__(self, path: Path, score=None, note=None):
        self.path = path
        self.score = score or evaluate  # (backend, model, loader, indices) -> {"accuracy", "margin", ...}
        self.note = note or held_out_note

    def read(self) -> dict:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def write(self, run, when: str, scores: dict) -> None:
        if not run.main:
            return
        from hanyeong.files import write_atomic

        body = {**(self.read() if when == "end" else {}), "held_out": len(run.loader.held), when: scores}
        write_atomic(self.path, json.dumps(body, indent=2) + "\n")

    def at_end(self, run) -> None:
        loader = run.loader
        if not len(loader.held):
            return
        if run.records or "end" not in self.read():  # a stage found finished keeps its scores
            self.write(run, "end", self.score(run.backend, run.state.model, loader, loader.held))
        body = self.read()
        if run.main and "start" in body and "end" in body:
            run.notes.append(self.note(body))


def held_out_note(body: dict) -> str:
    """'held-back preference accuracy 50.0% -> 93.8% (64 pairs), margin 0.000 -> 1.234'."""
    start, end = body["start"], body["end"]
    return (f"held-back preference accuracy {start['accuracy']:.1%} -> {end['accuracy']:.1%} "
            f"({body['held_out']} pairs), reward margin {start['margin']:.3f} -> {end['margin']:.3f}")


def evaluate(backend, model, loader, indices: np.ndarray, logps: np.ndarray | None = None) -> dict:
    """Pairs `indices` scored by `model` (or by their summed answer log-probs `logps` [n, 2]):
    accuracy, the share whose chosen answer has the higher reward (ties count half), the reward being
    beta * (log pi - log pi_ref) with a reference, else SimPER's mean token log pi; margin, the
    mean chosen - rejected reward; logp_accuracy, the share whose chosen answer has the higher mean
    token log-prob (reference-free)."""
    from orchestration.data.pair_loader import answer_logps

    if logps is None:
        logps = answer_logps(backend, model, loader, indices)
    b = loader.batch(indices, with_reference=False)
    lengths = np.maximum(np.stack([b.loss_mask.sum(-1), b["rejected_mask"].sum(-1)], -1), 1.0)
    mean = logps / lengths
    reference = loader.reference_logps(indices)
    if reference is not None:
        rewards = loader.settings.get("beta", 1.0) * (logps - reference)
    else:
        rewards = mean
    margin = rewards[:, 0] - rewards[:, 1]
    accuracy = (margin > 0).mean() + 0.5 * (margin == 0).mean()
    return {"accuracy": round(float(accuracy), 6), "margin": round(float(margin.mean()), 6),
            "logp_accuracy": round(float((mean[:, 0] > mean[:, 1]).mean()), 6)}  # fmt: skip


def preference_accuracy(backend, model, loader, indices: np.ndarray | None = None) -> dict[str, float]:
    """`evaluate` on pairs `indices` (default: all of the loader's)."""
    indices = np.arange(len(loader.pairs)) if indices is None else indices
    return evaluate(backend, model, loader, indices)


PLOT_FILE = "preference.png"


class RewardPlot(Callback):
    """STAGE_DIR/preference.png at the stage's end (rank 0): the implicit rewards of the chosen and
    rejected answers and their margin, and the preference accuracy, against step, from the stage's
    metrics.jsonl (so a resumed stage's plot has every step)."""

    def __init__(self, path: Path):
        self.path = path

    def at_end(self, run) -> None:
        if run.main:
            from orchestration.pipeline.stage import METRICS

            plot_rewards(run.directory / METRICS, self.path, f"{run.name} ({run.stage.kind})")


def plot_rewards(metrics: Path, out: Path, title: str) -> Path | None:
    """Draw `metrics` (a metrics.jsonl)'s rewards/* lines to `out`; None when it has none."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg without touching pyplot's state
    from matplotlib.figure import Figure

    from hanyeong.files import write_figure
    from orchestration.pipeline.run_report import read_metrics

    lines = [line for line in read_metrics(metrics) if "rewards/margins" in line]
    if not lines:
        return None
    steps = [line["step"] for line in lines]
    figure = Figure(figsize=(10, 4), dpi=120)
    FigureCanvasAgg(figure)
    rewards, accuracy = figure.subplots(1, 2)
    for key, color in (("chosen", "C2"), ("rejected", "C3"), ("margins", "C0")):
        rewards.plot(steps, [line[f"rewards/{key}"] for line in lines], color=color, linewidth=1.2, label=key)
    rewards.axhline(0, color="0.7", linewidth=0.8, zorder=0)
    rewards.set_xlabel("step")
    rewards.set_ylabel("implicit reward")
    rewards.set_title(f"{title}: rewards")
    rewards.legend(fontsize=8)
    accuracy.plot(steps, [line["rewards/accuracies"] for line in lines], color="C1", linewidth=1.2)
    accuracy.set_ylim(-0.02, 1.02)
    accuracy.set_xlabel("step")
    accuracy.set_ylabel("preference accuracy (batch)")
    accuracy.set_title(f"{title}: accuracy")
    for ax in (rewards, accuracy):
        ax.grid(alpha=0.3)
    figure.tight_layout()
    return write_figure(out, figure)
