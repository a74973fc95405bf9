"""Training losses: plain functions `loss(model, batch) -> (sum_loss, n_counted)`.

`batch` is a dict of mx arrays, split along B for gradient accumulation: every array of the Batch
by name (orchestration/core/batch.py), ids int32 and floats float32: inputs, targets (B, T);
loss_mask (B, T) and segment_ids (B, T) only when the Batch has them (absent keys, never None, so
`mx.compile` sees a tree of arrays); a further loss's own arrays (ref_logprobs, rewards,
teacher_logits, ...) arrive as the Batch's extras, unchanged. A loss returns the SUM of its
per-item losses and the count it sums over (tokens, pairs, ...), both fp32 scalars; the step
divides the accumulated gradients by the count of the whole global batch, so splitting a batch
into micro-batches never changes the update. The same contract as cuda_model/losses.py (mlx-lm
`default_loss` returns `ce, ntoks` likewise).

A loss declares the arrays it reads; the step refuses a batch without one of them before computing
(DataError naming the loss and the array). DPO, SimPER, Bradley-Terry reward, distillation and
GRPO plug in with `register_loss(name, fn, reads)`, the same name in both backends.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from hanyeong.errors import ConfigError, DataError

Arrays = dict[str, mx.array]
LossFn = Callable[[nn.Module, Arrays], tuple[mx.array, mx.array]]


def token_logprobs(logits: mx.array, targets: mx.array) -> mx.array:
    """logits (B, T, V), targets (B, T) -> log p(target) (B, T) float32."""
    # fp32 log-softmax: bf16 logits lose the small probabilities the loss is made of
    return -nn.losses.cross_entropy(logits.astype(mx.float32), targets, reduction="none")


def masked_cross_entropy(
    logits: mx.array, targets: mx.array, loss_mask: mx.array | None
) -> tuple[mx.array, mx.array]:
    """Summed cross-entropy over the counted targets, and how many there are (fp32 scalars)."""
    nll = -token_logprobs(logits, targets)  # (B, T)
    if loss_mask is None:
        return nll.sum(), mx.array(float(nll.size), mx.float32)
    mask = loss_mask.astype(mx.float32)
    return (nll * mask).sum(), mask.sum()


def causal_lm(model: nn.Module, batch: Arrays) -> tuple[mx.array, mx.array]:
    """Next-token cross-entropy on every target (or those under loss_mask, e.g. padding off)."""
    logits = model(batch["inputs"], batch.get("segment_ids"))
    return masked_cross_entropy(logits, batch["targets"], batch.get("loss_mask"))


def sft(model: nn.Module, batch: Arrays) -> tuple[mx.array, mx.array]:
    """Supervised fine-tuning: cross-entropy on assistant tokens only (loss_mask == 1)."""
    logits = model(batch["inputs"], batch.get("segment_ids"))
    return masked_cross_entropy(logits, batch["targets"], batch["loss_mask"])


LOSSES: dict[str, LossFn] = {}
LOSS_READS: dict[str, tuple[str, ...]] = {}  # loss name -> the batch arrays it needs
FIELD_HINTS = {"loss_mask": " (1 on counted targets, e.g. assistant tokens, 0 elsewhere)"}


def register_loss(name: str, fn: LossFn, reads: tuple[str, ...]) -> None:
    """Make `fn(model, batch) -> (summed loss, count)` the loss `name`; `reads`: the batch arrays
    it needs (optional ones, read with batch.get, are left out). Replaces a loss of that name."""
    LOSSES[name], LOSS_READS[name] = fn, tuple(reads)


def get_loss(name: str) -> LossFn:
    """The loss called `name`; an unknown name lists the known ones."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ConfigError(
            f"unknown loss {name!r} for the mlx backend; known: {', '.join(LOSSES)}"
        ) from None


def check_reads(name: str, present) -> None:
    """DataError when a batch with arrays `present` lacks one the loss `name` reads."""
    get_loss(name)
    for array in LOSS_READS[name]:
        if array not in present:
            raise DataError(f"the {name} loss needs batch.{array}{FIELD_HINTS.get(array, '')}; "
                            f"the batch has {', '.join(present)}")  # fmt: skip


register_loss("causal_lm", causal_lm, reads=("inputs", "targets"))
register_loss("sft", sft, reads=("inputs", "targets", "loss_mask"))
