"""GRPO's numbers outside the loss: group-relative advantages and how the loss is aggregated.

Both backends' `grpo` loss (cuda_model/losses.py, mlx_model/losses.py) read what this module makes,
as per-row arrays of the batch, so the choice of aggregation never reaches a framework:

    advantages    [B]  (r - mean of the row's group) / (std + 1e-4): `group_advantages`
    token_weight  [B]  what each counted token's loss is multiplied by
    row_count     [B]  the row's share of the count the step divides the summed loss by

The three aggregations the field uses, and their length bias (Dr. GRPO, Liu et al. 2025; DAPO, Yu
et al. 2025):

    token_mean           sum over every answer token / tokens in the batch (DAPO; TRL "dapo", "bnpo").
                         Each token weighs the same, so a long answer weighs more than a short one.
    seq_mean_token_mean  each answer's token mean, then the mean over answers (the original GRPO;
                         TRL "grpo"). A token of a short answer weighs more than one of a long
                         answer: a wrong answer's penalty shrinks as it grows, so wrong answers drift
                         longer.
    dr_grpo              sum over every answer token / (answers x max_new_tokens) (Dr. GRPO; TRL
                         "dr_grpo"). A constant divisor: no length bias, smaller gradients.

Written as `token_weight` and `row_count`, each is one sum over the micro-batches and ranks of a
step: sum_b token_weight_b * sum_t loss_bt / sum_b row_count_b.
"""

from __future__ import annotations

import numpy as np

from hanyeong.errors import ConfigError

SCALES = ("group", "batch", "none")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "dr_grpo")
STD_EPSILON = 1e-4  # TRL's: a group whose rewards barely differ is not blown up without bound


def group_advantages(rewards: np.ndarray, group_size: int, scale: str = "group") -> tuple[np.ndarray, np.ndarray]:
    """(advantages [N], zero_std [N / group_size] bool) of rewards [N], the answers of one prompt
    consecutive (group_size each).

    advantage = r - mean of its group, divided by the group's std (`group`), the batch's std
    (`batch`: Hu et al.'s REINFORCE++ / TRL's scale_rewards='batch'), or nothing (`none`: Dr. GRPO),
    std with Bessel's correction plus 1e-4, as TRL computes it. A group whose rewards are all
    equal has advantages exactly 0 (it carries no signal, and float rounding of its mean must not
    invent one); `zero_std` marks those groups."""
    if scale not in SCALES:
        raise ConfigError(f"scale_rewards must be one of {', '.join(SCALES)}, got {scale!r}")
    rewards = np.asarray(rewards, np.float64)
    if group_size < 2 or rewards.ndim != 1 or len(rewards) % group_size:
        raise ConfigError(f"rewards must be whole groups of size >= 2, got {rewards.shape} in groups of {group_size}")
    groups = rewards.reshape(-1, group_size)
    zero_std = (groups == groups[:, :1]).all(axis=1)
    advantages = groups - groups.mean(axis=1, keepdims=True)
    if scale == "group":
        advantages = advantages / (groups.std(axis=1, ddof=1, keepdims=True) + STD_EPSILON)
    elif scale == "batch":
        advantages = advantages / (rewards.std(ddof=1) + STD_EPSILON)
    advantages[zero_std] = 0.0
    return advantages.reshape(-1).astype(np.float32), zero_std


def aggregation_weights(aggregation: str, loss_mask: np.ndarray, max_new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(token_weight [B], row_count [B]) of `aggregation` for answers whose counted tokens are
    loss_mask [B, T] (see the module doc)."""
    lengths = np.asarray(loss_mask, np.float32).sum(axis=1)
    ones = np.ones_like(lengths)
    if aggregation == "token_mean":
        return ones, lengths
    if aggregation == "seq_mean_token_mean":
        return 1.0 / np.maximum(lengths, 1.0), ones
    if aggregation == "dr_grpo":
        return ones, np.full_like(lengths, float(max_new_tokens))
    raise ConfigError(f"loss_aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}")
