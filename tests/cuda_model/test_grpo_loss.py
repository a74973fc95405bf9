"""The grpo loss (cuda_model/losses.py) against TRL's GRPOTrainer._compute_loss on the same
log-probs, old and reference log-probs, advantages and masks, for each aggregation; and its laws:
with one update per generation the ratio is exactly 1 and the gradient is the policy gradient."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cuda_model import losses
from orchestration.core.grpo import aggregation_weights
from tests.cuda_model.conftest import VOCAB, perturbed, tiny

B, T, MAX_NEW = 6, 12, 16
TRL_LOSS = {"token_mean": "dapo", "seq_mean_token_mean": "grpo", "dr_grpo": "dr_grpo"}


def rollout(seed: int, aggregation: str, beta: float = 0.04, old_noise: float = 0.3):
    """A batch in the grpo layout: a 3-token prompt, answers of random length (the last of one
    token: a metric's per-answer token mean reaches its floor of one), old log-probs off the
    current ones by up to `old_noise` (so ratios leave the clip range), advantages of both signs."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, (B, T + 1))
    mask = np.zeros((B, T), np.float32)
    for row in range(B):
        mask[row, 2 : 2 + int(rng.integers(1, T - 2 + 1))] = 1.0
    mask[-1, 3:] = 0.0
    weight, count = aggregation_weights(aggregation, mask, MAX_NEW)
    return {"inputs": torch.from_numpy(tokens[:, :-1]), "targets": torch.from_numpy(tokens[:, 1:]),
            "loss_mask": torch.from_numpy(mask),
            "advantages": torch.from_numpy(rng.normal(0, 1, B).astype(np.float32)),
            "epsilon_low": torch.full((B,), 0.2), "epsilon_high": torch.full((B,), 0.28),
            "token_weight": torch.from_numpy(weight), "row_count": torch.from_numpy(count),
            "beta": torch.full((B,), beta), "noise": rng.uniform(-old_noise, old_noise, (B, T)),
            "ref_noise": rng.normal(0, 0.5, (B, T))}  # fmt: skip


def with_old_and_ref(model, batch):
    """The batch with old_logprobs and ref_logprobs near the model's own (no gradient)."""
    with torch.no_grad():
        logps = -F.cross_entropy(model(batch["inputs"], None).transpose(1, 2), batch["targets"], reduction="none")
    out = {k: v for k, v in batch.items() if not k.endswith("noise")}
    out["old_logprobs"] = (logps + torch.from_numpy(batch["noise"])).float()
    out["ref_logprobs"] = (logps + torch.from_numpy(batch["ref_noise"])).float()
    return out


def trl_loss(model, batch, loss_type: str, beta: float, metrics: dict | None = None):
    """TRL's GRPOTrainer._compute_loss (installed trl) with a stub trainer whose per-token log-probs
    and entropies are the model's over every target (a completion of T tokens after an empty prompt)."""
    from trl import GRPOTrainer

    logp_all = F.log_softmax(model(batch["inputs"], None).float(), dim=-1)
    logps = logp_all.gather(-1, batch["targets"][..., None])[..., 0]
    entropies = -(logp_all.exp() * logp_all).sum(-1)
    accelerator = SimpleNamespace(num_processes=1, reduce=lambda x, reduction: x, gather=lambda x: x)
    args = SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1)
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, entropies, None), aux_loss_enabled=False,
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        args=args, loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28, use_vllm=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, max_completion_length=MAX_NEW,
        accelerator=accelerator, _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list) if metrics is None else metrics})  # fmt: skip
    mask = batch["loss_mask"]
    inputs = {"prompt_ids": torch.zeros(B, 0, dtype=torch.long), "prompt_mask": torch.zeros(B, 0, dtype=torch.long),
              "completion_ids": batch["targets"], "completion_mask": mask, "advantages": batch["advantages"],
              "old_per_token_logps": batch["old_logprobs"], "ref_per_token_logps": batch["ref_logprobs"],
              "num_items_in_batch": mask.sum()}  # fmt: skip
    return GRPOTrainer._compute_loss(trainer, None, inputs)


def ours(model, batch):
    loss, count, metrics = losses.grpo(model, batch)
    return loss / count, {k: (v / count).item() for k, v in metrics.items()}


@pytest.fixture(scope="module")
def model():
    from cuda_model.backend import TorchBackend

    return perturbed(TorchBackend("cpu").init(tiny(), seed=0), seed=1)


@pytest.mark.parametrize("aggregation", sorted(TRL_LOSS))
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_and_gradients_equal_trl(model, aggregation, beta):
    batch = with_old_and_ref(model, rollout(0, aggregation, beta))
    if beta == 0.0:  # KL off: no reference read (the stage passes none)
        batch.pop("ref_logprobs"), batch.pop("beta")
    mine, _ = ours(model, batch)
    grads_mine = torch.autograd.grad(mine, list(model.parameters()))
    theirs = trl_loss(model, {**batch, "ref_logprobs": batch.get("ref_logprobs")}, TRL_LOSS[aggregation], beta)
    grads_theirs = torch.autograd.grad(theirs, list(model.parameters()))
    assert mine.item() == pytest.approx(theirs.item(), abs=1e-5)
    for a, b in zip(grads_mine, grads_theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_per_token_losses_equal_trl(model):
    """Each token's loss alone: TRL's token-mean over a mask holding that one token."""
    batch = with_old_and_ref(model, rollout(1, "token_mean"))
    with torch.no_grad():
        logps = F.log_softmax(model(batch["inputs"], None).float(), -1).gather(-1, batch["targets"][..., None])[..., 0]
        per_token, _ = losses.grpo_token_loss(logps, batch["old_logprobs"], batch["advantages"], batch["epsilon_low"],
                                              batch["epsilon_high"], batch["ref_logprobs"], batch["beta"])  # fmt: skip
        checked = 0
        for b, t in zip(*np.nonzero(batch["loss_mask"].numpy())):
            one = torch.zeros(B, T)
            one[b, t] = 1.0
            theirs = trl_loss(model, {**batch, "loss_mask": one}, "bnpo", 0.04)
            assert per_token[b, t].item() == pytest.approx(theirs.item(), abs=1e-5)
            checked += 1
    assert checked == int(batch["loss_mask"].sum())


def test_metrics_equal_trls_token_means(model):
    batch = with_old_and_ref(model, rollout(2, "token_mean", old_noise=0.6))
    logged = defaultdict(list)
    trl_loss(model, batch, "dapo", 0.04, metrics=logged)
    _, metrics = ours(model, batch)
    assert metrics["grpo/clip_ratio"] == pytest.approx(logged["clip_ratio/region_mean"][0], abs=1e-6)
    assert 0 < metrics["grpo/clip_ratio"] < 1  # the old log-probs' noise put some ratios outside the clip
    assert metrics["grpo/entropy"] == pytest.approx(logged["entropy"][0], rel=1e-5)
    assert metrics["grpo/kl"] == pytest.approx(logged["kl"][0], rel=1e-5)


@pytest.mark.parametrize("aggregation", sorted(TRL_LOSS))
def test_one_update_per_generation_is_the_policy_gradient(model, aggregation):
    """Without old_logprobs the ratio is exactly 1, nothing is clipped, and the gradient is
    -sum_b w_b A_b sum_t grad log p / count (the clip and the ratio's value drop out)."""
    batch = {k: v for k, v in rollout(3, aggregation, beta=0.0).items() if not k.endswith("noise") and k != "beta"}
    loss, metrics = ours(model, batch)
    assert metrics["grpo/ratio"] == pytest.approx(1.0, abs=1e-6) and metrics["grpo/clip_ratio"] == 0.0
    logps = F.log_softmax(model(batch["inputs"], None).float(), -1).gather(-1, batch["targets"][..., None])[..., 0]
    with torch.no_grad():
        _, ratio = losses.grpo_token_loss(logps, logps, batch["advantages"], batch["epsilon_low"],
                                                  batch["epsilon_high"])  # fmt: skip
    assert torch.equal(ratio, torch.ones_like(ratio))
    surrogate = -(batch["token_weight"] * batch["advantages"] * (logps * batch["loss_mask"]).sum(-1)).sum()
    surrogate = surrogate / batch["row_count"].sum()
    expected = torch.autograd.grad(surrogate, list(model.parameters()))
    for a, b in zip(torch.autograd.grad(loss, list(model.parameters())), expected):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_zero_advantage_answers_give_no_gradient(model):
    batch = {k: v for k, v in rollout(4, "token_mean", beta=0.0).items() if not k.endswith("noise") and k != "beta"}
    batch["advantages"] = torch.zeros(B)
    loss, _ = ours(model, batch)
    assert all(float(g.abs().max()) == 0.0 for g in torch.autograd.grad(loss, list(model.parameters())))


def test_step_reads_and_counts(backend):
    """Through the backend: a batch without advantages is refused naming the array; the step's
    counted_tokens is the aggregation's count (answer tokens for token_mean)."""
    from hanyeong.errors import DataError
    from orchestration.core.batch import Batch
    from orchestration.core.optim import OptimConfig

    raw = rollout(5, "token_mean", beta=0.0)
    extras = {k: raw[k].numpy() for k in ("advantages", "epsilon_low", "epsilon_high", "token_weight", "row_count")}
    batch = Batch(raw["inputs"].numpy().astype(np.int32), raw["targets"].numpy().astype(np.int32),
                  loss_mask=raw["loss_mask"].numpy(), extras=extras)  # fmt: skip
    state = backend.init_train_state(backend.init(tiny(), seed=0), OptimConfig(lr=1e-3, warmup_steps=0, total_steps=2,
                                                                                grad_accum_steps=2))  # fmt: skip
    metrics = backend.train_step(state, batch, loss="grpo")
    assert metrics["counted_tokens"] == int(raw["loss_mask"].sum())
    assert metrics["grpo/ratio"] == pytest.approx(1.0, abs=1e-6)
    missing = Batch(batch.inputs, batch.targets, loss_mask=batch.loss_mask,
                    extras={k: v for k, v in extras.items() if k != "advantages"})  # fmt: skip
    with pytest.raises(DataError, match="batch.advantages"):
        backend.train_step(state, missing, loss="grpo")
