"""What a reward stage (kind `reward`) adds to run_stage: the rows a reward model scores, its
`[stage.reward]` settings, and the held-back pairs' accuracy and margin.

THE MODEL: the spec's decoder with a scalar head (spec.head 'score': `score.weight` [1, d_model],
transformers' LlamaForSequenceClassification with num_labels=1) read at the last answer token. A
reward stage starting from a language model (an SFT stage's checkpoint) drops its LM head and draws
the score head from N(0, 1/(d_model + 1)) (ModelSpec.score_init_std; checkpoint.with_score_head, in
numpy from the stage's seed, so both backends start alike): first rewards ~N(0, 1), and the decoder
learns from the first step, which a zero head would delay. A reward checkpoint keeps no LM head, as
LlamaForSequenceClassification has none: it only scores (backend.rewards), and its spec.json says
head "score", so loading, resuming and exporting keep it a reward model.

ROWS (RewardLoader): PairLoader's pairs, each sequence whole and cut after its last answer token:
[BOS] prompt answer [|endofturn|]; the newline and [EOS] the chat encoding puts after the turn
are dropped, so the scored token is the row's last one before the [PAD] padding, the token
transformers' sequence classifiers read (the rightmost non-pad one). Rows are seq_len tokens (a
longer pair is cut as PairLoader cuts it). Extras: rejected_inputs/targets/mask, and per row
`center_coefficient` ([stage.reward]) and `margin` (a dataset's optional float `margin` column,
TRL's per-pair margin; no preparation writes one yet).

LOSS: Bradley-Terry, -log s(r_c - r_r - margin) + c (r_c + r_r)^2 per pair, averaged over the
pairs: TRL's RewardTrainer.compute_loss (cuda_model/losses.py `reward`). Each step logs the mean
rewards/chosen, rewards/rejected, rewards/margins and rewards/accuracies (strictly r_c > r_r).

HELD-BACK PAIRS: `held_out` pairs (at most a tenth), drawn from the seed, never reach a batch; they
are scored at the stage's start and end into STAGE_DIR/reward.json (accuracy, ties counting half;
mean margin and rewards) and the run's echo.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hanyeong.errors import ConfigError, DataError
from orchestration.core.batch import Batch
from orchestration.data.pair_loader import PairLoader
from orchestration.data.preference import fit
from orchestration.pipeline.preference_stage import HeldOut, RewardPlot

HELD_OUT_FILE, PLOT_FILE = "reward.json", "reward.png"
MARGIN_COLUMN = "margin"


@dataclass(frozen=True)
class RewardSettings:
    """`[stage.reward]`: the reward model's objective (kind reward)."""

    center_rewards_coefficient: float | None = None
    """TRL's: adds c * mean((r_c + r_r)^2), pulling the rewards toward mean zero (Eisenstein et al.
    2023, eq. 2; TRL recommends 0.01). None: off."""
    held_out: int = 64
    """Pairs kept out of training and scored at the stage's start and end (at most a tenth)."""

    def __post_init__(self) -> None:
        c = self.center_rewards_coefficient
        if c is not None and not 0.0 <= c < math.inf:
            raise ConfigError(f"center_rewards_coefficient must be >= 0, got {c!r}")
        held = self.held_out
        if isinstance(held, bool) or not isinstance(held, int) or held < 0:
            raise ConfigError(f"held_out must be an integer >= 0, got {self.held_out!r}")

    def per_row(self) -> dict[str, float]:
        """The values each batch row carries for the reward loss (cuda_model/losses.py's layout)."""
        c = self.center_rewards_coefficient
        return {"center_coefficient": c} if c else {}


# ---- rows ---------------------------------------------------------------------------------------


def scored(ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A sequence cut after its last answer token (the last mask 1)."""
    answer = np.flatnonzero(mask)
    end = int(answer[-1]) + 1 if len(answer) else len(ids)
    return ids[:end], mask[:end]


def reward_row(ids: np.ndarray, mask: np.ndarray, T: int) -> tuple[np.ndarray, ...]:
    """inputs (the sequence itself), targets (the next tokens; unread), both int32 [T] padded with
    [PAD] 0, and the answer mask of inputs, float32 [T]."""
    inputs, targets, weights = np.zeros(T, np.int32), np.zeros(T, np.int32), np.zeros(T, np.float32)
    n = len(ids)
    inputs[:n], targets[: n - 1], weights[:n] = ids, ids[1:], mask
    return inputs, targets, weights


def read_margins(mixture, pairs: int) -> np.ndarray | None:
    """float32 [pairs]: each pair's margin in PairLoader's order (the sources' shards, in their
    manifests' order), from an optional float `margin` column (0 in a shard without one); None when
    no shard has the column."""
    import pyarrow.parquet as pq

    parts, found = [], False
    for entry in mixture.sources:
        directory = Path(entry.dataset)
        manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
        for name, source in manifest["sources"].items():
            if entry.source not in ("*", name):
                continue
            for shard in source["shards"]:
                path = directory / shard["path"]
                if MARGIN_COLUMN in pq.read_schema(path).names:
                    table = pq.read_table(path, columns=[MARGIN_COLUMN])
                    parts.append(table[MARGIN_COLUMN].to_numpy())
                    found = True
                else:
                    parts.append(np.zeros(pq.read_metadata(path).num_rows))
    if not found:
        return None
    margins = np.concatenate(parts).astype(np.float32)
    if len(margins) != pairs or not np.isfinite(margins).all():
        where = ", ".join(e.dataset for e in mixture.sources)
        raise DataError(f"{where}: the margin column must be one finite number per pair")
    return margins


class RewardLoader(PairLoader):
    """The Loader protocol (orchestration/pipeline/kinds.py) over preference pairs, as a reward
    model scores them (see the module doc)."""

    def __init__(self, mixture, seq_len: int, rows: int, seed: int):
        super().__init__(mixture, seq_len, rows, seed)
        # PairLoader's rows hold seq_len + 1 tokens (inputs and the targets one ahead); a reward
        # row is the sequence itself, seq_len tokens, ending at its last answer token
        self.pairs = [fit(scored(*c), scored(*r), seq_len)[:2] for c, r in self.pairs]
        self.settings = {}
        self.margins = read_margins(mixture, len(self.pairs))

    def batch(self, indices: np.ndarray, with_reference: bool = False) -> Batch:
        """The pair rows `indices` as one Batch (the layout of the reward loss); a reward model has
        no reference (`with_reference` is PairLoader's and ignored)."""
        T = self.seq_len
        chosen = [reward_row(*self.pairs[i][0], T) for i in indices]
        rejected = [reward_row(*self.pairs[i][1], T) for i in indices]
        stack = lambda rows, k: np.stack([r[k] for r in rows])  # noqa: E731
        extras = {"rejected_inputs": stack(rejected, 0), "rejected_targets": stack(rejected, 1),
                  "rejected_mask": stack(rejected, 2)}  # fmt: skip
        extras |= {k: np.full(len(indices), v, np.float32) for k, v in self.settings.items()}
        if self.margins is not None:
            extras["margin"] = self.margins[np.asarray(indices, np.int64)]
        return Batch(stack(chosen, 0), stack(chosen, 1), loss_mask=stack(chosen, 2), extras=extras)

    def lengths(self, indices: np.ndarray) -> np.ndarray:
        """int64 [n, 2]: tokens of the chosen and rejected sequence of pairs `indices`."""
        pairs = [self.pairs[i] for i in indices]
        return np.array([[len(c[0]), len(r[0])] for c, r in pairs], np.int64).reshape(-1, 2)


# ---- scoring ------------------------------------------------------------------------------------


def pair_rewards(
    backend, model, loader: RewardLoader, indices: np.ndarray, rows: int = 32
) -> np.ndarray:
    """float32 [len(indices), 2]: the rewards of the chosen and rejected answers of pairs `indices`,
    scored shortest first, `rows` pairs at a time (backend.rewards runs each group only up to its
    longest row: a row's reward does not depend on the padding after it)."""
    indices = np.asarray(indices, np.int64)
    lengths = loader.lengths(indices)
    order = np.argsort(lengths.max(-1, initial=0), kind="stable")
    out = np.zeros((len(indices), 2), np.float32)
    for start in range(0, len(indices), rows):
        chunk = order[start : start + rows]
        b = loader.batch(indices[chunk])
        tokens = np.concatenate([b.inputs, b["rejected_inputs"]])
        r = backend.rewards(model, tokens, np.concatenate([lengths[chunk, 0], lengths[chunk, 1]]))
        out[chunk, 0], out[chunk, 1] = r[: len(chunk)], r[len(chunk) :]
    return out


def evaluate(backend, model, loader: RewardLoader, indices: np.ndarray) -> dict:
    """Pairs `indices` scored by the reward model: accuracy, the share whose chosen answer has the
    higher reward (ties count half); margin, the mean r_c - r_r; chosen, rejected: mean rewards."""
    r = pair_rewards(backend, model, loader, indices)
    margin = r[:, 0] - r[:, 1]
    accuracy = (margin > 0).mean() + 0.5 * (margin == 0).mean()
    return {"accuracy": round(float(accuracy), 6), "margin": round(float(margin.mean()), 6),
            "chosen": round(float(r[:, 0].mean()), 6), "rejected": round(float(r[:, 1].mean()), 6)}  # fmt: skip


def held_out_note(body: dict) -> str:
    """'held-back reward accuracy 47.5% -> 97.5% (40 pairs), margin 0.012 -> 3.456'."""
    start, end = body["start"], body["end"]
    return (f"held-back reward accuracy {start['accuracy']:.1%} -> {end['accuracy']:.1%} "
            f"({body['held_out']} pairs), margin {start['margin']:.3f} -> {end['margin']:.3f}")  # fmt: skip


def prepare_rewards(run, recipe, init_from: str | None) -> list:
    """Give the stage's RewardLoader its per-row settings and held-back pairs; score those at
    step 0. Returns the loop's held-back scores (reward.json) and reward plot callbacks."""
    loader = run.loader
    settings = run.stage.reward or RewardSettings()
    loader.settings = settings.per_row()
    loader.hold_out(settings.held_out)
    held = HeldOut(run.directory / HELD_OUT_FILE, score=evaluate, note=held_out_note)  # reward.json
    if run.state.step == 0 and len(loader.held):
        held.write(run, "start", evaluate(run.backend, run.state.model, loader, loader.held))
    return [held, RewardPlot(run.directory / PLOT_FILE)]
