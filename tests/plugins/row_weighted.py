"""A toy objective added from outside hanyeong, through its public extension points alone:

- a loss in each backend (`register_loss`), reading an extra batch field `row_weight` [B];
- a stage kind (`register_kind`) whose loader is the ordinary mixture loader with that field added.

A recipe names this module in `[run] imports` and says `kind = "row_weighted"`; nothing under
orchestration/, cuda_model/ or mlx_model/ changes. The loss: cross-entropy of every target, each
row weighted, divided by the summed weights times the row length (a per-row weighted mean).
"""

from __future__ import annotations

import importlib.util

import numpy as np

from orchestration.core.batch import Batch
from orchestration.pipeline.kinds import StageKind, mixture_loader, register_kind

KIND, LOSS, FIELD = "row_weighted", "row_weighted_lm", "row_weight"
READS = ("inputs", "targets", FIELD)


def row_weights(inputs: np.ndarray) -> np.ndarray:
    """A weight per row from its content (first token odd: 2, even: 0.5), so it is not uniform."""
    return np.where(inputs[:, 0] % 2 == 1, 2.0, 0.5).astype(np.float32)


class WeightedRows:
    """The mixture loader, each batch given its `row_weight` extra."""

    def __init__(self, mixture, seq_len: int, rows: int, seed: int):
        self.inner = mixture_loader(mixture, seq_len, rows, seed)

    def __getattr__(self, name):  # seq_len, batch_rows, sources, state, load_state: the mixture's
        return getattr(self.inner, name)

    def __setattr__(self, name, value):
        if name == "inner":
            object.__setattr__(self, name, value)
        else:  # the Ramps callback sets seq_len / batch_rows on the loader it was given
            setattr(self.inner, name, value)

    def next_batch(self) -> Batch:
        batch = self.inner.next_batch()
        batch.extras[FIELD] = row_weights(batch.inputs)
        return batch


def torch_loss(model, batch):
    from cuda_model.losses import token_logprobs

    nll = -token_logprobs(model(batch["inputs"], batch.get("segment_ids")), batch["targets"])  # (B, T)
    w = batch[FIELD]
    return (nll.sum(dim=1) * w).sum(), w.sum() * nll.shape[1]


def mlx_loss(model, batch):
    from mlx_model.losses import token_logprobs

    nll = -token_logprobs(model(batch["inputs"], batch.get("segment_ids")), batch["targets"])
    w = batch[FIELD]
    return (nll.sum(axis=1) * w).sum(), w.sum() * nll.shape[1]


def register() -> None:
    from cuda_model.losses import register_loss as register_torch

    register_torch(LOSS, torch_loss, READS)
    if importlib.util.find_spec("mlx") is not None:
        from mlx_model.losses import register_loss as register_mlx

        register_mlx(LOSS, mlx_loss, READS)
    register_kind(StageKind(KIND, loss=LOSS, formats=("text",), whole_documents=False,
                            loader=WeightedRows))  # fmt: skip


register()
