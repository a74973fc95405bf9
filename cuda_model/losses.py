"""Training losses: plain functions `loss(model, batch) -> (sum_loss, n_counted)`.

`batch` is a dict of tensors on the model's device, split along B for gradient accumulation: every
array of the Batch by name (orchestration/core/batch.py), ids int64 and floats float32: inputs,
targets (B, T); loss_mask (B, T) and segment_ids (B, T) only when the Batch has them (absent keys,
as in the MLX backend); a further loss's own arrays (ref_logprobs, rewards, teacher_logits, ...)
arrive as the Batch's extras, unchanged. A loss returns the SUM of its per-item losses and the
count it sums over (tokens, pairs, ...), both 0-dim tensors; the step divides the accumulated
gradients by the count of the whole global batch, so splitting a batch into micro-batches never
changes the update (mlx-lm `default_loss` returns `ce, ntoks` likewise).

A loss declares the arrays it reads; the step refuses a batch without one of them before computing
(DataError naming the loss and the array). DPO, SimPER, Bradley-Terry reward, distillation and
GRPO plug in with `register_loss(name, fn, reads)`, the same name in both backends.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from hanyeong.errors import ConfigError, DataError

Tensors = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Tensors], tuple[torch.Tensor, torch.Tensor]]
CHUNK_ELEMENTS = 1 << 26  # logits per chunk of the fused head + loss (256 MB in fp32)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits (B, T, V), targets (B, T) -> log p(target) (B, T) float32."""
    B, T, V = logits.shape
    # fp32 log-softmax: bf16 logits lose the small probabilities the loss is made of
    nll = F.cross_entropy(
        logits.reshape(B * T, V).float(), targets.reshape(B * T), reduction="none"
    )
    return -nll.view(B, T)


def masked_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over the counted targets, and how many there are (fp32 scalars)."""
    B, T, V = logits.shape
    flat_logits, flat_targets = logits.reshape(B * T, V).float(), targets.reshape(B * T)
    if loss_mask is None:
        total = F.cross_entropy(flat_logits, flat_targets, reduction="sum")
        return total, torch.tensor(float(B * T), device=logits.device)
    nll = F.cross_entropy(flat_logits, flat_targets, reduction="none")  # (B*T,)
    mask = loss_mask.reshape(B * T).to(nll.dtype)
    return (nll * mask).sum(), mask.sum()


def chunk_nll_grad(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (n, V) -> summed nll (fp32) and d nll / d logits = softmax - onehot (n, V), logits' dtype.

    Eager form, in place on the fp32 logits (fp32 `logits` are overwritten: pass a temporary)."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    rows = torch.arange(targets.shape[0], device=x.device)
    nll = lse - x[rows, targets]
    probs = x.sub_(lse[:, None]).exp_()
    probs[rows, targets] -= 1.0
    if mask is not None:
        nll, probs = nll * mask, probs.mul_(mask[:, None])
    return nll.sum(), probs.to(logits.dtype)


def chunk_nll_grad_fusable(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """chunk_nll_grad written without in-place ops, for torch.compile to fuse into one or two kernels."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    onehot = torch.arange(x.shape[-1], device=x.device)[None, :] == targets[:, None]
    nll = lse[:, 0] - x.gather(1, targets[:, None])[:, 0]
    grad = torch.exp(x - lse) - onehot.to(x.dtype)
    if mask is not None:
        nll, grad = nll * mask, grad * mask[:, None]
    return nll.sum(), grad.to(logits.dtype)


COMPILE_HEAD_KERNEL = False  # set by step.init_train_state(compile=True): process-wide, CUDA only
_compiled_kernel = None


def head_kernel(device: torch.device):
    global _compiled_kernel
    if not (COMPILE_HEAD_KERNEL and device.type == "cuda"):
        return chunk_nll_grad
    if _compiled_kernel is None:
        _compiled_kernel = torch.compile(chunk_nll_grad_fusable, dynamic=False)
    return _compiled_kernel


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of (h @ weight.T) without ever holding the (N, V) logits.

    The head matmul and the loss run in row chunks; each chunk's gradients (w.r.t. h and weight)
    are computed right away from its softmax, so only (chunk, V) logits live at a time and nothing
    V-wide is kept for backward. Same FLOPs as the plain path (no recompute). Under autocast the
    matmuls run in the autocast dtype and the softmax in fp32, as the plain path does.
    """

    @staticmethod
    def forward(
        ctx, h, weight, targets, mask, chunk_rows: int
    ):  # h (N, D), weight (V, D), targets (N,)
        device = h.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        kernel = head_kernel(h.device)
        w = weight.to(dtype)  # cast once, not per chunk
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros_like(weight, dtype=torch.float32)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk_rows):
            end = start + chunk_rows
            hc = h[start:end].to(dtype)
            m = None if mask is None else mask[start:end].float()
            nll, g = kernel(hc @ w.T, targets[start:end], m)  # logits (chunk, V) -> g (chunk, V)
            total += nll
            grad_h[start:end] = (g @ w).to(h.dtype)
            grad_w += (g.T @ hc).float()
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_total, grad_w * grad_total, None, None, None


def chunked_nll(h, weight, targets, mask, chunk_rows: int) -> torch.Tensor:
    """Summed nll of (h @ weight.T) by row chunks, no gradients: the evaluation path."""
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for start in range(0, h.shape[0], chunk_rows):
        logits = F.linear(h[start : start + chunk_rows], weight)[None]  # (1, chunk, V)
        m = None if mask is None else mask[start : start + chunk_rows][None]
        total += masked_cross_entropy(logits, targets[None, start : start + chunk_rows], m)[0]
    return total


@torch.compiler.disable  # eager: a compiled model graph ends at the hidden states
def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """h (B, T, D), head weight (V, D), targets (B, T) -> summed CE of counted targets, their count."""
    B, T, D = h.shape
    chunk_rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
    mask = None if loss_mask is None else loss_mask.reshape(B * T)
    args = (h.reshape(B * T, D), weight, targets.reshape(B * T), mask)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        total = LinearCrossEntropy.apply(*args, chunk_rows)
    else:  # evaluation: the loss alone, still chunked
        total = chunked_nll(*args, chunk_rows)
    count = torch.tensor(float(B * T), device=h.device) if mask is None else mask.float().sum()
    return total, count


def causal_lm(model: nn.Module, batch: Tensors) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy on every target (or those under loss_mask, e.g. padding off)."""
    h = model.model(batch["inputs"], batch.get("segment_ids"))  # (B, T, d_model): no logits kept
    return linear_cross_entropy(h, model.head_weight(), batch["targets"], batch.get("loss_mask"))


def sft(model: nn.Module, batch: Tensors) -> tuple[torch.Tensor, torch.Tensor]:
    """Supervised fine-tuning: cross-entropy on assistant tokens only (loss_mask == 1)."""
    h = model.model(batch["inputs"], batch.get("segment_ids"))
    return linear_cross_entropy(h, model.head_weight(), batch["targets"], batch["loss_mask"])


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
            f"unknown loss {name!r} for the torch backend; known: {', '.join(LOSSES)}"
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
