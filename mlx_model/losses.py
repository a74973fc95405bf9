"""Training losses: plain functions `loss(model, batch) -> (sum_loss, n_counted)`.

`batch` is a dict of mx arrays, split along B for gradient accumulation: every array of the Batch
by name (orchestration/core/batch.py), ids int32 and floats float32: inputs, targets (B, T);
loss_mask (B, T) and segment_ids (B, T) only when the Batch has them (absent keys, never None, so
`mx.compile` sees a tree of arrays); a further loss's own arrays (ref_logprobs, rewards,
teacher_logits, ...) arrive as the Batch's extras, unchanged. A loss returns the SUM of its
per-item losses and the count it sums over (tokens, pairs, ...), both fp32 scalars; the step
divides the accumulated gradients by the count of the whole global batch, so splitting a batch
into micro-batches never changes the update. The same contract as cuda_model/losses.py (mlx-lm
`default_loss` returns `ce, ntoks` likewise), a third element included: a dict of metrics summed
over the counted items (no gradient), which the step reports as global means.

A loss declares the arrays it reads; the step refuses a batch without one of them before computing
(DataError naming the loss and the array). DPO, SimPER, Bradley-Terry reward, distillation and
GRPO plug in with `register_loss(name, fn, reads)`, the same name in both backends.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from orchestration.core.losses import LossRegistry

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


REGISTRY = LossRegistry("mlx")  # orchestration/core/losses.py: name -> (loss, the arrays it reads)
LOSSES, LOSS_READS = REGISTRY.losses, REGISTRY.reads
register_loss, get_loss, check_reads = REGISTRY.register, REGISTRY.get, REGISTRY.check_reads


register_loss("causal_lm", causal_lm, reads=("inputs", "targets"))
register_loss("sft", sft, reads=("inputs", "targets", "loss_mask"))


# ---- preference objectives (DPO, IPO, SimPER): the pair layout of cuda_model/losses.py ----------
# One PAIR per batch row (so splits along B never separate a chosen answer from its rejected one):
# inputs/targets/loss_mask [B, T] hold the prompt + chosen answer (mask 1 on answer targets only),
# rejected_inputs/rejected_targets/rejected_mask [B, T] the same prompt + rejected answer,
# ref_chosen_logps/ref_rejected_logps [B] the reference's summed answer log-probs (dpo, ipo), and
# beta/label_smoothing/sft_weight [B] the stage's [stage.preference] settings per row.
# Each loss returns (sum of per-pair losses, number of pairs, PAIR_METRICS summed over the pairs).
PAIR_READS = ("inputs", "targets", "loss_mask",
              "rejected_inputs", "rejected_targets", "rejected_mask")  # fmt: skip
REFERENCE_READS = ("ref_chosen_logps", "ref_rejected_logps", "beta")


def pair_logps(model: nn.Module, batch: Arrays) -> tuple[mx.array, ...]:
    """Summed answer log-probs and answer lengths of chosen and rejected, (B,) each, float32:
    one forward over the 2B rows [chosen; rejected]."""
    B = batch["inputs"].shape[0]
    x = mx.concatenate([batch["inputs"], batch["rejected_inputs"]])
    y = mx.concatenate([batch["targets"], batch["rejected_targets"]])
    mask = mx.concatenate([batch["loss_mask"], batch["rejected_mask"]]).astype(mx.float32)
    per_token = token_logprobs(model(x, None), y) * mask  # prompt/padding targets count 0
    logps, lengths = per_token.sum(-1), mask.sum(-1)
    return logps[:B], logps[B:], lengths[:B], lengths[B:]


def dpo_pair_loss(chosen, rejected, ref_chosen, ref_rejected, beta, label_smoothing=0.0):
    """DPO per pair: -(1-e) log s(b d) - e log s(-b d) (e = label_smoothing: conservative DPO)."""
    z = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
    return -(1 - label_smoothing) * nn.log_sigmoid(z) - label_smoothing * nn.log_sigmoid(-z)


def ipo_pair_loss(chosen, rejected, ref_chosen, ref_rejected, beta, chosen_len, rejected_len):
    """IPO as TRL writes it: ((dc/|c| - dr/|r|) - 1/(2 beta))^2 per pair."""
    delta = (chosen - ref_chosen) / mx.maximum(chosen_len, 1.0) - (
        rejected - ref_rejected
    ) / mx.maximum(rejected_len, 1.0)
    return (delta - 1 / (2 * beta)) ** 2


def simper_pair_loss(chosen, rejected, chosen_len, rejected_len):
    """SimPER: -exp(mean log pi(c)) + exp(mean log pi(r)) per pair; no reference, no beta."""
    return -mx.exp(chosen / mx.maximum(chosen_len, 1.0)) + mx.exp(
        rejected / mx.maximum(rejected_len, 1.0)
    )


def with_sft(per_pair, batch: Arrays, chosen, chosen_len):
    """Adds sft_weight * (chosen answer's mean token NLL) per pair when the batch carries sft_weight."""
    if "sft_weight" not in batch:
        return per_pair
    return per_pair + batch["sft_weight"] * (-chosen / mx.maximum(chosen_len, 1.0))


def pairs(batch: Arrays) -> mx.array:
    return mx.array(float(batch["inputs"].shape[0]), mx.float32)


PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected", "lengths/chosen", "lengths/rejected")  # fmt: skip


def pair_metrics(c, r, nc, nr, reward_c, reward_r) -> dict[str, mx.array]:
    """PAIR_METRICS summed over the batch's pairs (cuda_model/losses.py), no gradient through them."""
    values = (reward_c, reward_r, reward_c - reward_r, (reward_c > reward_r).astype(mx.float32), c, r, nc, nr)
    return {name: mx.stop_gradient(v.astype(mx.float32).sum()) for name, v in zip(PAIR_METRICS, values)}


def reference_rewards(batch: Arrays, c, r) -> tuple[mx.array, mx.array]:
    """DPO's implicit rewards beta * (log pi - log pi_ref) of the chosen and rejected answers."""
    beta = batch["beta"]
    return beta * (c - batch["ref_chosen_logps"]), beta * (r - batch["ref_rejected_logps"])


def dpo(model: nn.Module, batch: Arrays) -> tuple[mx.array, mx.array, dict]:
    """DPO on summed answer log-probs; -> (sum over pairs, pairs, metrics)."""
    c, r, nc, nr = pair_logps(model, batch)
    smoothing = batch.get("label_smoothing", mx.zeros_like(c))
    ref_c, ref_r = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    loss = dpo_pair_loss(c, r, ref_c, ref_r, batch["beta"], smoothing)
    metrics = pair_metrics(c, r, nc, nr, *reference_rewards(batch, c, r))
    return with_sft(loss, batch, c, nc).sum(), pairs(batch), metrics


def ipo(model: nn.Module, batch: Arrays) -> tuple[mx.array, mx.array, dict]:
    """IPO on length-averaged answer log-probs; -> (sum over pairs, pairs, metrics)."""
    c, r, nc, nr = pair_logps(model, batch)
    ref_c, ref_r = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    loss = ipo_pair_loss(c, r, ref_c, ref_r, batch["beta"], nc, nr)
    metrics = pair_metrics(c, r, nc, nr, *reference_rewards(batch, c, r))
    return with_sft(loss, batch, c, nc).sum(), pairs(batch), metrics


def simper(model: nn.Module, batch: Arrays) -> tuple[mx.array, mx.array, dict]:
    """SimPER on length-averaged answer log-probs, no reference; -> (sum over pairs, pairs, metrics
    whose rewards are the answers' mean token log-probs)."""
    c, r, nc, nr = pair_logps(model, batch)
    metrics = pair_metrics(c, r, nc, nr, c / mx.maximum(nc, 1.0), r / mx.maximum(nr, 1.0))
    return with_sft(simper_pair_loss(c, r, nc, nr), batch, c, nc).sum(), pairs(batch), metrics


register_loss("dpo", dpo, reads=PAIR_READS + REFERENCE_READS)
register_loss("ipo", ipo, reads=PAIR_READS + REFERENCE_READS)
register_loss("simper", simper, reads=PAIR_READS)


# ---- Bradley-Terry reward model: the pair layout of cuda_model/losses.py's `reward` ------------------
# A reward model (spec.head 'score'); one PAIR per row, each sequence WHOLE: inputs/loss_mask [B, T]
# the prompt + chosen answer up to its last answer token, right-padded, the mask 1 on the answer's
# tokens OF INPUTS (the reward is read at the last of them: the row's last non-pad token);
# rejected_inputs/rejected_mask the same for the rejected answer; optional margin [B] and
# center_coefficient [B] (TRL's per-pair margin and center_rewards_coefficient).
REWARD_READS = ("inputs", "loss_mask", "rejected_inputs", "rejected_mask")
REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def last_positions(mask: mx.array) -> mx.array:
    """(B, T) mask -> (B,) each row's last position with mask > 0 (0 in a row without one)."""
    positions = mx.arange(mask.shape[1])
    return mx.argmax(positions * (mask > 0), axis=-1)


def pair_rewards(model: nn.Module, batch: Arrays) -> tuple[mx.array, mx.array]:
    """Rewards of the chosen and rejected answers, (B,) each, float32: one forward over the 2B
    rows [chosen; rejected]."""
    B = batch["inputs"].shape[0]
    x = mx.concatenate([batch["inputs"], batch["rejected_inputs"]])
    mask = mx.concatenate([batch["loss_mask"], batch["rejected_mask"]])
    r = model.rewards(x, last_positions(mask))
    return r[:B], r[B:]


def bradley_terry_loss(chosen, rejected, margin=None, center_coefficient=None) -> mx.array:
    """Per pair: -log sigmoid(r_c - r_r - margin) + c (r_c + r_r)^2 (TRL's RewardTrainer once
    summed over a batch and divided by its pairs)."""
    z = chosen - rejected if margin is None else chosen - rejected - margin
    loss = -nn.log_sigmoid(z)
    if center_coefficient is not None:
        loss = loss + center_coefficient * (chosen + rejected) ** 2
    return loss


def reward_metrics(chosen: mx.array, rejected: mx.array) -> dict[str, mx.array]:
    """REWARD_METRICS summed over the batch's pairs, no gradient through them."""
    values = (chosen, rejected, chosen - rejected, (chosen > rejected).astype(mx.float32))
    return {name: mx.stop_gradient(v.astype(mx.float32).sum()) for name, v in zip(REWARD_METRICS, values)}


def reward(model: nn.Module, batch: Arrays) -> tuple[mx.array, mx.array, dict]:
    """Bradley-Terry reward model loss; -> (sum over pairs, pairs, metrics)."""
    c, r = pair_rewards(model, batch)
    loss = bradley_terry_loss(c, r, batch.get("margin"), batch.get("center_coefficient"))
    return loss.sum(), pairs(batch), reward_metrics(c, r)


register_loss("reward", reward, reads=REWARD_READS)


# ---- distillation (AFM's hard-target mix, Gemma 2's soft targets): cuda_model/losses.py's layout -----
# Packed rows as in pretraining; extras teacher_ids int [B, T, k] (most likely first) and
# teacher_logprobs float32 [B, T, k] (log-softmax over the vocabulary, temperature 1), afm_weight [B]
# (afm's w), temperature [B] (soft), optional mix [B]: (1 - mix) kd + mix ce per counted target.
DISTILL_METRICS = ("distill/ce", "distill/kd", "distill/agreement")


def afm_target_loss(logits: mx.array, targets: mx.array, top1: mx.array,
                    weight: mx.array) -> mx.array:  # fmt: skip
    """(B, T) cross-entropy against w one-hot(teacher top-1) + (1 - w) one-hot(target) (AFM)."""
    x = logits.astype(mx.float32)
    logp = x - mx.logsumexp(x, axis=-1, keepdims=True)
    at = lambda ids: mx.take_along_axis(logp, ids[..., None].astype(mx.int32), -1)[..., 0]  # noqa: E731
    w = weight[:, None]
    return -(w * at(top1) + (1 - w) * at(targets))


def soft_target_loss(logits: mx.array, ids: mx.array, logprobs: mx.array,
                     temperature: mx.array) -> mx.array:  # fmt: skip
    """(B, T) -sum_k p_k log q(ids_k) at a temperature, times its square (Hinton et al. 2015); p is
    the teacher's top-k renormalised (cuda_model/losses.py `soft_target_loss`)."""
    tau = temperature[:, None, None]
    x = logits.astype(mx.float32) / tau
    logq = x - mx.logsumexp(x, axis=-1, keepdims=True)
    p = mx.softmax(logprobs.astype(mx.float32) / tau, axis=-1)
    picked = mx.take_along_axis(logq, ids.astype(mx.int32), axis=-1)
    return -(p * picked).sum(-1) * tau[..., 0] ** 2


def distill(model: nn.Module, batch: Arrays, kd_term: Callable) -> tuple[mx.array, mx.array, dict]:
    """(1 - mix) kd + mix ce per counted target; kd = kd_term(logits, batch)."""
    logits = model(batch["inputs"], batch.get("segment_ids"))
    ce = -token_logprobs(logits, batch["targets"])
    kd = kd_term(logits, batch)
    mix = batch.get("mix")
    per_token = kd if mix is None else (1 - mix[:, None]) * kd + mix[:, None] * ce
    mask = batch.get("loss_mask")
    mask = mx.ones_like(ce) if mask is None else mask.astype(mx.float32)
    agree = (mx.argmax(logits, axis=-1) == batch["teacher_ids"][..., 0]).astype(mx.float32)
    values = (ce, kd, agree)
    metrics = {name: mx.stop_gradient((v * mask).sum()) for name, v in zip(DISTILL_METRICS, values)}
    return (per_token * mask).sum(), mask.sum(), metrics


def afm(model: nn.Module, batch: Arrays) -> tuple[mx.array, mx.array, dict]:
    """AFM's distillation: cross-entropy against w x the teacher's top-1 + (1 - w) x the true token."""
    return distill(model, batch, lambda logits, b: afm_target_loss(
        logits, b["targets"], b["teacher_ids"][..., 0], b["afm_weight"]))  # fmt: skip


def soft(model: nn.Module, batch: Arrays) -> tuple[mx.array, mx.array, dict]:
    """Gemma 2's distillation: cross-entropy to the teacher's (top-k) distribution at a temperature."""
    return distill(model, batch, lambda logits, b: soft_target_loss(
        logits, b["teacher_ids"], b["teacher_logprobs"], b["temperature"]))  # fmt: skip


register_loss("afm", afm, reads=("inputs", "targets", "teacher_ids", "afm_weight"))
register_loss("soft", soft, reads=("inputs", "targets", "teacher_ids", "teacher_logprobs",
                                   "temperature"))  # fmt: skip


# ---- GRPO: cuda_model/losses.py's layout (one sampled answer per row, per-row advantages, clip
# range and aggregation weights; optional old_logprobs, ref_logprobs and beta) ---------------------
GRPO_READS = ("inputs", "targets", "loss_mask", "advantages", "epsilon_low", "epsilon_high",
              "token_weight", "row_count")  # fmt: skip
GRPO_METRICS = ("grpo/clip_ratio", "grpo/ratio", "grpo/entropy", "grpo/kl")


def grpo_token_loss(logps, old_logps, advantages, epsilon_low, epsilon_high, ref_logps=None, beta=None):
    """(B, T) per-token loss -min(r A, clip(r, 1 - low, 1 + high) A) [+ beta k3] and the ratio r."""
    ratio = mx.exp(logps - old_logps)
    A = advantages[:, None]
    clipped = mx.clip(ratio, 1 - epsilon_low[:, None], 1 + epsilon_high[:, None])
    loss = -mx.minimum(ratio * A, clipped * A)
    if ref_logps is not None:
        delta = ref_logps - logps
        loss = loss + beta[:, None] * (mx.exp(delta) - delta - 1)
    return loss, ratio


def grpo(model: nn.Module, batch: Arrays) -> tuple[mx.array, mx.array, dict]:
    """The clipped surrogate of each answer token, aggregated by token_weight / row_count."""
    x = model(batch["inputs"], None).astype(mx.float32)
    logp_all = x - mx.logsumexp(x, axis=-1, keepdims=True)
    logps = mx.take_along_axis(logp_all, batch["targets"][..., None].astype(mx.int32), -1)[..., 0]
    old = batch["old_logprobs"] if "old_logprobs" in batch else mx.stop_gradient(logps)
    ref = batch.get("ref_logprobs")
    A, low, high = batch["advantages"], batch["epsilon_low"], batch["epsilon_high"]
    per_token, ratio = grpo_token_loss(logps, old, A, low, high, ref, batch.get("beta"))
    mask = batch["loss_mask"].astype(mx.float32)
    loss = (batch["token_weight"] * (per_token * mask).sum(-1)).sum()
    weight = batch["row_count"] / mx.maximum(mask.sum(-1), 1.0)  # a metric's token mean per answer
    clipped = ((ratio < 1 - low[:, None]) & (A[:, None] < 0)) | ((ratio > 1 + high[:, None]) & (A[:, None] > 0))
    entropy = -(mx.exp(logp_all) * logp_all).sum(-1)
    values = {"grpo/clip_ratio": clipped.astype(mx.float32), "grpo/ratio": ratio, "grpo/entropy": entropy}
    if ref is not None:
        delta = ref - logps
        values["grpo/kl"] = mx.exp(delta) - delta - 1
    metrics = {name: mx.stop_gradient((weight * (v * mask).sum(-1)).sum()) for name, v in values.items()}
    return loss, batch["row_count"].sum(), metrics


register_loss("grpo", grpo, reads=GRPO_READS)
