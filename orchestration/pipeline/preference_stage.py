"""What a preference stage (kinds dpo, ipo, simper) adds to run_stage: its `[stage.preference]`
settings and the reference model's log-probs.

REFERENCE: precomputed. Before the first step the start model (the stage's start checkpoint, or its
init) scores every pair's chosen and rejected answers once; the float32 [pairs, 2] array is stored
in STAGE_DIR/reference/<start hash>-<dataset hash>.npy (the start checkpoint's weights file SHA-256,
or the spec and seed of an init; the datasets' content hashes and the row length), so a resumed
stage reads it back and a changed start or dataset computes it again. The scoring model is dropped
before training: no second model sits in memory. Every rank computes it the same way when the file
is missing; rank 0 writes it. (Ray tasks over the dataset and a live reference: not yet.)
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hanyeong.errors import ConfigError

REFERENCE_DIR = "reference"


@dataclass(frozen=True)
class PreferenceSettings:
    """`[stage.preference]`: the objective's settings (kinds dpo, ipo, simper)."""

    beta: float = 0.1
    """DPO's beta (the strength of the KL tie to the reference); IPO's tau. SimPER has none."""
    label_smoothing: float = 0.0
    """Conservative DPO: the assumed rate of flipped labels, in [0, 0.5)."""
    sft_weight: float = 0.0
    """Weight of an SFT term on the chosen answer (its mean token NLL), as RPO adds; 0: none."""

    def __post_init__(self) -> None:
        if not 0.0 < self.beta < float("inf"):
            raise ConfigError(f"beta must be > 0, got {self.beta!r}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing!r}")
        if not 0.0 <= self.sft_weight < float("inf"):
            raise ConfigError(f"sft_weight must be >= 0, got {self.sft_weight!r}")

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
        return file_sha256(str(Path(source) / checkpoint.MODEL_FILE))
    return hashlib.sha256(json.dumps([spec.to_dict(), seed], sort_keys=True).encode()).hexdigest()


def prepare_pairs(run, recipe, init_from: str | None) -> None:
    """Give the stage's PairLoader its per-row settings and (dpo, ipo) the reference log-probs."""
    from orchestration.pipeline.stage import start_model

    loader, stage = run.loader, run.stage
    loader.settings = (stage.preference or PreferenceSettings()).per_row(stage.loss)
    if stage.loss == "simper":
        return
    source = init_from or (None if stage.start in ("init", "previous") else stage.start)
    source = source or recipe.run.init_checkpoint
    key = start_hash(source, recipe.run.model_spec(), recipe.run.seed)
    path = run.directory / REFERENCE_DIR / f"{key[:16]}-{loader.data_hash[:16]}.npy"
    if path.exists():
        loader.reference = np.load(path)
        return
    from orchestration.data.pair_loader import answer_logps

    model = start_model(run.backend, recipe, run.index, init_from, run.directory, run.main)
    loader.reference = answer_logps(run.backend, model, loader, np.arange(len(loader.pairs)))
    del model
    if run.main:
        from hanyeong.files import write_atomic

        buffer = io.BytesIO()
        np.save(buffer, loader.reference)
        write_atomic(path, buffer.getvalue())


def preference_accuracy(backend, model, loader, indices: np.ndarray | None = None) -> dict[str, float]:
    """Held-back pairs: the share whose chosen answer has the higher reward log pi - log pi_ref
    (the mean token log pi when the loader has no reference), and the mean margin of the rewards."""
    from orchestration.data.pair_loader import answer_logps

    indices = np.arange(len(loader.pairs)) if indices is None else indices
    logps = answer_logps(backend, model, loader, indices)
    if loader.reference is not None:
        logps = logps - loader.reference[indices]
    else:  # SimPER's reward: the mean log-prob of an answer's tokens
        b = loader.batch(indices, with_reference=False)
        logps = logps / np.maximum(np.stack([b.loss_mask.sum(-1), b["rejected_mask"].sum(-1)], -1), 1.0)
    margin = logps[:, 0] - logps[:, 1]
    return {"accuracy": float((margin > 0).mean()), "margin": float(margin.mean())}
