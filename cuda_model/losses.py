"""Training losses: plain functions `loss(model, batch) -> (sum_loss, n_counted)`.

`batch` is a dict of tensors on the model's device, split along B for gradient accumulation: every
array of the Batch by name (orchestration/core/batch.py), ids int64 and floats float32: inputs,
targets (B, T); loss_mask (B, T) and segment_ids (B, T) only when the Batch has them (absent keys,
as in the MLX backend); a further loss's own arrays (ref_logprobs, rewards, teacher_logits, ...)
arrive as the Batch's extras, unchanged. A loss returns the SUM of its per-item losses and the
count it sums over (tokens, pairs, ...), both 0-dim tensors; the step divides the accumulated
gradients by the count of the whole global batch, so splitting a batch into micro-batches never
changes the update (mlx-lm `default_loss` returns `ce, ntoks` likewise).

A loss may return a third element: a dict of metrics, name -> 0-dim SUM over the same items the
count counts (pairs: implicit rewards, accuracy, ...), no gradient through them; the step sums them
over micro-batches and ranks like the loss and reports each as its global mean beside the loss
(they land in the stage's metrics.jsonl). The backends stay loss-agnostic: whatever a loss already
computed is logged at no extra forward.

A loss declares the arrays it reads; the step refuses a batch without one of them before computing
(DataError naming the loss and the array). DPO, SimPER, Bradley-Terry reward, distillation and
GRPO plug in with `register_loss(name, fn, reads)`, the same name in both backends.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from orchestration.core.losses import LossRegistry

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


REGISTRY = LossRegistry("torch")  # orchestration/core/losses.py: name -> (loss, the arrays it reads)
LOSSES, LOSS_READS = REGISTRY.losses, REGISTRY.reads
register_loss, get_loss, check_reads = REGISTRY.register, REGISTRY.get, REGISTRY.check_reads


register_loss("causal_lm", causal_lm, reads=("inputs", "targets"))
register_loss("sft", sft, reads=("inputs", "targets", "loss_mask"))


# ---- preference objectives (DPO, IPO, SimPER) ---------------------------------------------------
# A batch row is one PAIR, so the generic splits along B (rank_rows, grad accumulation) never
# separate a chosen answer from its rejected one:
#   inputs, targets, loss_mask                      [B, T] the prompt + CHOSEN answer; the mask is 1 on
#                                                   answer targets only (prompt and padding 0)
#   rejected_inputs, rejected_targets, rejected_mask [B, T] the same prompt + REJECTED answer
#   ref_chosen_logps, ref_rejected_logps             [B] float32: the reference model's summed
#                                                   log-probs of each answer (dpo, ipo)
#   beta [B], label_smoothing [B], sft_weight [B]    the stage's [stage.preference] settings, one per
#                                                   row (losses are looked up by name only), so a
#                                                   row carries everything its loss needs
# Each loss returns (sum of per-pair losses, number of pairs, PAIR_METRICS summed over the pairs).
# The metrics are TRL's DPOTrainer's: implicit rewards beta * (log pi - log pi_ref) of each answer
# (SimPER, reference-free: its mean token log-prob), their margin, the share of pairs whose chosen
# reward is the higher (strictly, as TRL counts), summed answer log-probs and answer lengths.
PAIR_READS = ("inputs", "targets", "loss_mask",
              "rejected_inputs", "rejected_targets", "rejected_mask")  # fmt: skip
REFERENCE_READS = ("ref_chosen_logps", "ref_rejected_logps", "beta")


def pair_logps(model: nn.Module, batch: Tensors) -> tuple[torch.Tensor, ...]:
    """Summed answer log-probs and answer lengths of chosen and rejected, (B,) each, float32:
    one forward over the 2B rows [chosen; rejected]."""
    B = batch["inputs"].shape[0]
    x = torch.cat([batch["inputs"], batch["rejected_inputs"]])
    y = torch.cat([batch["targets"], batch["rejected_targets"]])
    mask = torch.cat([batch["loss_mask"], batch["rejected_mask"]]).float()
    per_token = token_logprobs(model(x, None), y) * mask  # prompt/padding targets count 0
    logps, lengths = per_token.sum(-1), mask.sum(-1)
    return logps[:B], logps[B:], lengths[:B], lengths[B:]


def dpo_pair_loss(chosen, rejected, ref_chosen, ref_rejected, beta, label_smoothing=0.0):
    """DPO (Rafailov et al. 2023), per pair: -log sigmoid(beta * delta), delta the chosen log-ratio
    minus the rejected one; label_smoothing e is conservative DPO: -(1-e) log s(bd) - e log s(-bd)."""
    z = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def ipo_pair_loss(chosen, rejected, ref_chosen, ref_rejected, beta, chosen_len, rejected_len):
    """IPO (Azar et al. 2023) as TRL writes it: log-ratios averaged over answer tokens, then
    ((dc/|c| - dr/|r|) - 1/(2 beta))^2 per pair."""
    delta = (chosen - ref_chosen) / chosen_len.clamp(min=1.0) - (
        rejected - ref_rejected
    ) / rejected_len.clamp(min=1.0)
    return (delta - 1 / (2 * beta)) ** 2


def simper_pair_loss(chosen, rejected, chosen_len, rejected_len):
    """SimPER (Xiao et al. 2025; EXAONE Deep): -exp(mean log pi(c)) + exp(mean log pi(r)) per pair:
    no reference model, no beta."""
    return -torch.exp(chosen / chosen_len.clamp(min=1.0)) + torch.exp(
        rejected / rejected_len.clamp(min=1.0)
    )


def with_sft(per_pair, batch: Tensors, chosen, chosen_len):
    """Adds sft_weight * (chosen answer's mean token NLL) per pair when the batch carries sft_weight."""
    if "sft_weight" not in batch:
        return per_pair
    return per_pair + batch["sft_weight"] * (-chosen / chosen_len.clamp(min=1.0))


def pairs(batch: Tensors) -> torch.Tensor:
    return torch.tensor(float(batch["inputs"].shape[0]), device=batch["inputs"].device)


PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected", "lengths/chosen", "lengths/rejected")  # fmt: skip


@torch.no_grad()
def pair_metrics(c, r, nc, nr, reward_c, reward_r) -> dict[str, torch.Tensor]:
    """PAIR_METRICS summed over the batch's pairs (the step reports their means)."""
    values = (reward_c, reward_r, reward_c - reward_r, (reward_c > reward_r).float(), c, r, nc, nr)
    return {name: v.detach().float().sum() for name, v in zip(PAIR_METRICS, values)}


def reference_rewards(batch: Tensors, c, r) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO's implicit rewards beta * (log pi - log pi_ref) of the chosen and rejected answers."""
    beta = batch["beta"]
    return beta * (c - batch["ref_chosen_logps"]), beta * (r - batch["ref_rejected_logps"])


def dpo(model: nn.Module, batch: Tensors) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """DPO on summed answer log-probs (the pair layout above); -> (sum over pairs, pairs, metrics)."""
    c, r, nc, nr = pair_logps(model, batch)
    smoothing = batch.get("label_smoothing", torch.zeros_like(c))
    ref_c, ref_r = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    loss = dpo_pair_loss(c, r, ref_c, ref_r, batch["beta"], smoothing)
    metrics = pair_metrics(c, r, nc, nr, *reference_rewards(batch, c, r))
    return with_sft(loss, batch, c, nc).sum(), pairs(batch), metrics


def ipo(model: nn.Module, batch: Tensors) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """IPO on length-averaged answer log-probs; -> (sum over pairs, pairs, metrics)."""
    c, r, nc, nr = pair_logps(model, batch)
    ref_c, ref_r = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    loss = ipo_pair_loss(c, r, ref_c, ref_r, batch["beta"], nc, nr)
    metrics = pair_metrics(c, r, nc, nr, *reference_rewards(batch, c, r))
    return with_sft(loss, batch, c, nc).sum(), pairs(batch), metrics


def simper(model: nn.Module, batch: Tensors) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """SimPER on length-averaged answer log-probs, no reference; -> (sum over pairs, pairs,
    metrics whose rewards are the answers' mean token log-probs)."""
    c, r, nc, nr = pair_logps(model, batch)
    metrics = pair_metrics(c, r, nc, nr, c / nc.clamp(min=1.0), r / nr.clamp(min=1.0))
    return with_sft(simper_pair_loss(c, r, nc, nr), batch, c, nc).sum(), pairs(batch), metrics


register_loss("dpo", dpo, reads=PAIR_READS + REFERENCE_READS)
register_loss("ipo", ipo, reads=PAIR_READS + REFERENCE_READS)
register_loss("simper", simper, reads=PAIR_READS)


# ---- Bradley-Terry reward model ------------------------------------------------------------------
# The model is a reward model (spec.head 'score'). A batch row is one PAIR, each sequence WHOLE:
#   inputs, loss_mask                  [B, T] the prompt + CHOSEN answer up to its last answer token,
#                                      right-padded; the mask is 1 on the answer's tokens OF INPUTS
#                                      (not of targets): the reward is read at the last of them, which
#                                      is the row's last non-pad token, where transformers'
#                                      LlamaForSequenceClassification reads it
#   rejected_inputs, rejected_mask     [B, T] the same prompt + REJECTED answer
#   margin [B] (optional)              per pair: -log s(r_c - r_r - margin) (TRL's `margin` column)
#   center_coefficient [B] (optional)  TRL's center_rewards_coefficient c: + c (r_c + r_r)^2 per pair
# targets ride along (a Batch has them) unread. Returns (sum of per-pair losses, pairs,
# REWARD_METRICS summed over the pairs): the step's means are TRL's RewardTrainer's loss, accuracy
# (strictly r_c > r_r) and margin.
REWARD_READS = ("inputs", "loss_mask", "rejected_inputs", "rejected_mask")
REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def last_positions(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask -> (B,) int64: each row's last position with mask > 0 (0 in a row without one),
    found as transformers finds the last non-pad token (argmax of position x mask)."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (positions * (mask > 0)).argmax(-1)


def pair_rewards(model: nn.Module, batch: Tensors) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of the chosen and rejected answers, (B,) each, float32: one forward over the 2B
    rows [chosen; rejected]."""
    B = batch["inputs"].shape[0]
    x = torch.cat([batch["inputs"], batch["rejected_inputs"]])
    mask = torch.cat([batch["loss_mask"], batch["rejected_mask"]])
    r = model.rewards(x, last_positions(mask))
    return r[:B], r[B:]


def bradley_terry_loss(chosen, rejected, margin=None, center_coefficient=None) -> torch.Tensor:
    """Per pair: -log sigmoid(r_c - r_r - margin) + c (r_c + r_r)^2. Summed over a batch and divided
    by its pairs, this is TRL's RewardTrainer.compute_loss (mean BT loss + c * mean squared sum)."""
    z = chosen - rejected if margin is None else chosen - rejected - margin
    loss = -F.logsigmoid(z)
    if center_coefficient is not None:
        loss = loss + center_coefficient * (chosen + rejected) ** 2
    return loss


@torch.no_grad()
def reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """REWARD_METRICS summed over the batch's pairs (the step reports their means)."""
    values = (chosen, rejected, chosen - rejected, (chosen > rejected).float())
    return {name: v.detach().float().sum() for name, v in zip(REWARD_METRICS, values)}


def reward(model: nn.Module, batch: Tensors) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Bradley-Terry reward model loss (the pair layout above); -> (sum over pairs, pairs, metrics)."""
    c, r = pair_rewards(model, batch)
    loss = bradley_terry_loss(c, r, batch.get("margin"), batch.get("center_coefficient"))
    return loss.sum(), pairs(batch), reward_metrics(c, r)


register_loss("reward", reward, reads=REWARD_READS)


# ---- distillation (AFM's hard-target mix, Gemma 2's soft targets) -------------------------------
# Rows are packed documents as in pretraining: inputs, targets, loss_mask and segment_ids behave as
# causal_lm's. The teacher arrives as extras (orchestration/pipeline/distill_stage.py computes them):
#   teacher_ids       int [B, T, k]      the teacher's k most likely next tokens, most likely first
#   teacher_logprobs  float32 [B, T, k]  their log-probs (log-softmax over the vocabulary, temperature 1)
#   afm_weight [B]    afm: w, the teacher's top-1 share of the target (AFM: 0.9)
#   temperature [B]   soft: the temperature of both distributions
#   mix [B]           (optional) the ordinary next-token loss's weight: (1 - mix) kd + mix ce
# Returns (summed loss over counted targets, their count, DISTILL_METRICS summed over them).
DISTILL_METRICS = ("distill/ce", "distill/kd", "distill/agreement")


def afm_target_loss(logits: torch.Tensor, targets: torch.Tensor, top1: torch.Tensor,
                    weight: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """(B, T) cross-entropy against w one-hot(teacher top-1) + (1 - w) one-hot(target) (AFM);
    logits (B, T, V), targets and top1 (B, T), weight (B,)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    at = lambda ids: logp.gather(-1, ids[..., None].long())[..., 0]  # noqa: E731
    w = weight[:, None]
    return -(w * at(top1) + (1 - w) * at(targets))


def soft_target_loss(logits: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor,
                     temperature: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """(B, T) cross-entropy -sum_k p_k log q(ids_k) to the teacher at a temperature, times its square
    (Hinton et al. 2015: the gradient keeps its scale as the temperature changes). q = softmax(logits
    / tau) over the vocabulary; p = softmax(teacher log-probs / tau) over the k ids given (the rest of
    the teacher's mass renormalised away; k = V is the whole distribution). logits (B, T, V); ids,
    logprobs (B, T, k); temperature (B,)."""
    tau = temperature[:, None, None]
    logq = F.log_softmax(logits.float() / tau, dim=-1)
    p = torch.softmax(logprobs.float() / tau, dim=-1)
    return -(p * logq.gather(-1, ids.long())).sum(-1) * tau[..., 0] ** 2


def distill(model: nn.Module, batch: Tensors, kd_term: Callable) -> tuple[torch.Tensor, ...]:
    """(1 - mix) kd + mix ce per counted target, kd = kd_term(logits, batch); the full logits are
    kept (the teacher's targets need the whole softmax)."""
    logits = model(batch["inputs"], batch.get("segment_ids"))  # (B, T, V)
    ce = -token_logprobs(logits, batch["targets"])
    kd = kd_term(logits, batch)
    mix = batch.get("mix")
    per_token = kd if mix is None else (1 - mix[:, None]) * kd + mix[:, None] * ce
    mask = batch.get("loss_mask")
    mask = torch.ones_like(ce) if mask is None else mask.float()
    with torch.no_grad():
        agree = (logits.argmax(-1) == batch["teacher_ids"][..., 0]).float()
        values = (ce, kd, agree)
        metrics = {name: (v.detach() * mask).sum() for name, v in zip(DISTILL_METRICS, values)}
    return (per_token * mask).sum(), mask.sum(), metrics


def afm(model: nn.Module, batch: Tensors) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """AFM's distillation: cross-entropy against 0.9 (afm_weight) x the teacher's top-1 + 0.1 x the
    true next token."""
    return distill(model, batch, lambda logits, b: afm_target_loss(
        logits, b["targets"], b["teacher_ids"][..., 0], b["afm_weight"]))  # fmt: skip


def soft(model: nn.Module, batch: Tensors) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Gemma 2's distillation: cross-entropy to the teacher's (top-k) distribution at a temperature."""
    return distill(model, batch, lambda logits, b: soft_target_loss(
        logits, b["teacher_ids"], b["teacher_logprobs"], b["temperature"]))  # fmt: skip


register_loss("afm", afm, reads=("inputs", "targets", "teacher_ids", "afm_weight"))
register_loss("soft", soft, reads=("inputs", "targets", "teacher_ids", "teacher_logprobs",
                                   "temperature"))  # fmt: skip


# ---- GRPO (Shao et al. 2024; DAPO's clip, Dr. GRPO's aggregation) ------------------------------
# One sampled ANSWER per row: inputs/targets [B, T] the prompt + answer, right-padded; loss_mask
# [B, T] 1 on the answer's targets (its stop token included). Extras, per row
# (orchestration/core/grpo.py makes them):
#   advantages [B]                   the answer's group-relative advantage
#   epsilon_low, epsilon_high [B]    the ratio's clip range [1 - low, 1 + high] (DAPO: high > low)
#   token_weight, row_count [B]      the loss aggregation: sum_b w_b sum_t loss_bt / sum_b row_count_b
#   old_logprobs [B, T] (optional)   the sampling policy's log-probs; absent: the current ones
#                                    detached, so the ratio is exactly 1 (one update per generation)
#   ref_logprobs, beta [B, T], [B] (optional)  the reference's log-probs: + beta * k3 KL per token
# Returns (summed loss, summed row_count, GRPO_METRICS): each metric a mean aggregated like the loss
# (token_mean: over answer tokens; the others: over answers of their token means).
GRPO_READS = ("inputs", "targets", "loss_mask", "advantages", "epsilon_low", "epsilon_high",
              "token_weight", "row_count")  # fmt: skip
GRPO_METRICS = ("grpo/clip_ratio", "grpo/ratio", "grpo/entropy", "grpo/kl")


def grpo_token_loss(logps, old_logps, advantages, epsilon_low, epsilon_high, ref_logps=None, beta=None):
    """(B, T) per-token loss -min(r A, clip(r, 1 - low, 1 + high) A) [+ beta k3], r = pi / pi_old,
    k3 = exp(ref - logp) - (ref - logp) - 1 (Schulman's unbiased, positive KL estimator), and the
    ratio r. TRL's GRPOTrainer._compute_loss per token."""
    ratio = torch.exp(logps - old_logps)
    A = advantages[:, None]
    clipped = torch.clamp(ratio, 1 - epsilon_low[:, None], 1 + epsilon_high[:, None])
    loss = -torch.minimum(ratio * A, clipped * A)
    if ref_logps is not None:
        delta = ref_logps - logps
        loss = loss + beta[:, None] * (torch.exp(delta) - delta - 1)
    return loss, ratio


def grpo(model: nn.Module, batch: Tensors) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The clipped surrogate of each answer token, aggregated by token_weight / row_count."""
    logp_all = F.log_softmax(model(batch["inputs"], None).float(), dim=-1)  # (B, T, V)
    logps = logp_all.gather(-1, batch["targets"][..., None].long())[..., 0]
    old = batch.get("old_logprobs", logps.detach())
    ref = batch.get("ref_logprobs")
    A, low, high = batch["advantages"], batch["epsilon_low"], batch["epsilon_high"]
    per_token, ratio = grpo_token_loss(logps, old, A, low, high, ref, batch.get("beta"))
    mask = batch["loss_mask"].float()
    loss = (batch["token_weight"] * (per_token * mask).sum(-1)).sum()
    with torch.no_grad():
        weight = batch["row_count"] / mask.sum(-1).clamp(min=1.0)  # a metric's token mean per answer
        clipped = ((ratio < 1 - low[:, None]) & (A[:, None] < 0)) | ((ratio > 1 + high[:, None]) & (A[:, None] > 0))
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        values = {"grpo/clip_ratio": clipped.float(), "grpo/ratio": ratio, "grpo/entropy": entropy}
        if ref is not None:
            delta = ref - logps
            values["grpo/kl"] = torch.exp(delta) - delta - 1
        metrics = {name: (weight * (v.detach() * mask).sum(-1)).sum() for name, v in values.items()}
    return loss, batch["row_count"].sum(), metrics


register_loss("grpo", grpo, reads=GRPO_READS)
