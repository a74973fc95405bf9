"""The reward model of the PyTorch backend (spec.head 'score'): the Bradley-Terry loss against TRL's
RewardTrainer.compute_loss (margin and centering included), rewards read at the last answer token
whatever the padding, the checkpoint's score.weight, the head drawn onto a language model's
weights, and a reward model that cannot be asked for logits."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

from cuda_model import losses
from hanyeong.errors import ConfigError, DataError
from orchestration.core import checkpoint
from orchestration.core.batch import Batch
from orchestration.core.optim import OptimConfig
from tests.cuda_model.conftest import VOCAB, perturbed, tiny


def trl_reward_loss(chosen, rejected, margin=None, center=None, metrics=None):
    """TRL's RewardTrainer.compute_loss (installed trl) on given rewards: a stub trainer and a stub
    model whose output logits are [chosen; rejected] as a [2B, 1] column, as LlamaForSequenceClassification
    returns them."""
    from trl import RewardTrainer

    rows = 2 * chosen.shape[0]
    logits = torch.cat([chosen, rejected])[:, None]
    accelerator = SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x)
    trainer = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=accelerator,
                              args=SimpleNamespace(center_rewards_coefficient=center), _total_train_tokens=0,
                              _tp_size=1, _metrics={"train": defaultdict(list) if metrics is None else metrics})  # fmt: skip
    inputs = {"input_ids": torch.zeros(rows, 3, dtype=torch.long), "attention_mask": torch.ones(rows, 3, dtype=torch.long)}
    if margin is not None:
        inputs["margin"] = margin
    model = lambda **_: SimpleNamespace(logits=logits)  # noqa: E731
    return RewardTrainer.compute_loss(trainer, model, inputs)


def ours(chosen, rejected, margin=None, center=None):
    """Our loss as the step sees it: the sum of per-pair losses over the number of pairs."""
    c = None if center is None else torch.full_like(chosen, center)
    return losses.bradley_terry_loss(chosen, rejected, margin, c).sum() / chosen.shape[0]


def loss_and_grads(fn, chosen, rejected):
    c, r = chosen.clone().requires_grad_(True), rejected.clone().requires_grad_(True)
    loss = fn(c, r)
    loss.backward()
    return loss.item(), c.grad, r.grad


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("with_margin", "center"), [(False, None), (True, None), (False, 0.01), (True, 0.5)])
def test_loss_and_gradients_equal_trl(seed, with_margin, center):
    rng = np.random.default_rng(seed)
    chosen, rejected = (torch.from_numpy(rng.normal(0, 2, 6).astype(np.float32)) for _ in range(2))
    margin = torch.from_numpy(rng.uniform(-1, 2, 6).astype(np.float32)) if with_margin else None
    want = loss_and_grads(lambda c, r: trl_reward_loss(c, r, margin, center), chosen, rejected)
    got = loss_and_grads(lambda c, r: ours(c, r, margin, center), chosen, rejected)
    assert got[0] == pytest.approx(want[0], abs=1e-6, rel=1e-6)
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def reward_batch(seed: int, rows: int = 3, T: int = 12, vocab: int = VOCAB) -> dict[str, np.ndarray]:
    """Pairs in the reward layout (cuda_model/losses.py): whole sequences of random lengths, a shared
    prompt of 3 tokens, the answer mask 1 from the prompt's end to the sequence's, [PAD] 0 after."""
    rng = np.random.default_rng(seed)
    batch = {}
    for prefix in ("", "rejected_"):
        tokens = rng.integers(1, vocab, (rows, T))
        mask = np.zeros((rows, T), np.float32)
        for row, n in enumerate(rng.integers(4, T + 1, rows)):
            tokens[row, n:] = 0
            mask[row, 3:n] = 1.0
        batch[f"{prefix}inputs"], batch[f"{prefix}mask" if prefix else "loss_mask"] = tokens, mask
    batch["rejected_inputs"][:, :3] = batch["inputs"][:, :3]  # the same prompt
    batch["targets"] = np.zeros_like(batch["inputs"])
    return batch


def as_tensors(batch: dict) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.asarray(v, np.int64 if v.dtype.kind == "i" else np.float32)) for k, v in batch.items()}


@pytest.fixture(scope="module")
def reward_model():
    from cuda_model.backend import TorchBackend

    return perturbed(TorchBackend("cpu").init(tiny(head="score"), seed=3), seed=3)


def naive_rewards(model, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The score head at EVERY position (as transformers computes it), then the last answer token's."""
    per_position = model.score(model.model(tokens))[..., 0]  # (B, T)
    last = [int(torch.nonzero(row)[-1]) for row in mask]
    return per_position[torch.arange(len(last)), torch.tensor(last)]


def test_the_registered_loss_is_trl_on_the_last_answer_tokens_rewards(reward_model):
    batch = as_tensors(reward_batch(0))
    batch["margin"] = torch.tensor([0.5, 0.0, -1.0])
    batch["center_coefficient"] = torch.full((3,), 0.01)
    summed, count, metrics = losses.get_loss("reward")(reward_model, batch)
    with torch.no_grad():
        c = naive_rewards(reward_model, batch["inputs"], batch["loss_mask"])
        r = naive_rewards(reward_model, batch["rejected_inputs"], batch["rejected_mask"])
    logged = defaultdict(list)
    want = trl_reward_loss(c, r, batch["margin"], 0.01, metrics=logged)
    assert count.item() == 3 and (summed / count).item() == pytest.approx(want.item(), abs=1e-6)
    assert (metrics["rewards/accuracies"] / count).item() == pytest.approx(logged["accuracy"][-1])
    assert (metrics["rewards/margins"] / count).item() == pytest.approx(logged["margin"][-1], abs=1e-6)
    assert (metrics["rewards/chosen"] / count).item() == pytest.approx(c.mean().item(), abs=1e-6)
    assert c.abs().max() > 0.5  # perturbed weights: rewards far from 0


def test_rewards_do_not_depend_on_padding(backend, reward_model):
    batch = reward_batch(1, rows=4, T=16)
    tokens = batch["inputs"]
    lengths = (tokens > 0).sum(-1)  # ids 1.. up to each row's end, [PAD] 0 after
    got = backend.rewards(reward_model, tokens, lengths)
    assert got.dtype == np.float32 and got.shape == (4,)
    garbage = np.where(tokens > 0, tokens, 7)  # other ids after each row's end
    wider = np.concatenate([garbage, np.full((4, 5), 9)], axis=1)
    np.testing.assert_allclose(backend.rewards(reward_model, wider, lengths), got, atol=1e-5, rtol=0)
    alone = np.concatenate([backend.rewards(reward_model, tokens[i : i + 1], lengths[i : i + 1]) for i in range(4)])
    np.testing.assert_allclose(alone, got, atol=1e-5, rtol=0)
    with pytest.raises(DataError, match="row 1 has length 17, outside 1..16"):
        backend.rewards(reward_model, tokens, np.array([3, 17, 2, 2]))


@settings(max_examples=30, deadline=None)
@given(rewards=st.lists(st.floats(-20, 20), min_size=2, max_size=2))
def test_swapping_chosen_and_rejected_negates_the_difference(rewards):
    """L(c, r) - L(r, c) = -(r_c - r_r) (log s(z) - log s(-z) = z); equal rewards give log 2."""
    c, r = (torch.tensor([v], dtype=torch.float64) for v in rewards)
    difference = losses.bradley_terry_loss(c, r) - losses.bradley_terry_loss(r, c)
    assert difference.item() == pytest.approx(-(c - r).item(), abs=1e-9)
    assert losses.bradley_terry_loss(c, c).item() == pytest.approx(math.log(2))


def test_a_step_lowers_the_loss_and_the_checkpoint_keeps_the_head(backend, tmp_path):
    spec = tiny(head="score", tie_embeddings=False)
    model = backend.init(spec, seed=0)
    batch = Batch.from_arrays(reward_batch(2, rows=4))
    state = backend.init_train_state(model, OptimConfig(lr=1e-2, warmup_steps=0, total_steps=10))
    before = backend.eval_loss(model, batch, loss="reward")
    metrics = backend.train_step(state, batch, loss="reward")
    assert metrics["loss"] == pytest.approx(before, abs=1e-5) and metrics["counted_tokens"] == 4
    assert {"rewards/chosen", "rewards/margins", "rewards/accuracies"} <= set(metrics)
    assert backend.eval_loss(model, batch, loss="reward") < before
    backend.save(model, tmp_path / "ckpt", state)
    stored = load_file(tmp_path / "ckpt" / "model.safetensors")
    assert stored["score.weight"].shape == (1, spec.d_model) and "lm_head.weight" not in stored
    assert checkpoint.load_spec(tmp_path / "ckpt").head == "score"
    resumed = backend.load_train_state(tmp_path / "ckpt")
    assert resumed.model.spec == spec
    np.testing.assert_array_equal(resumed.model.score.weight.detach().numpy(), stored["score.weight"])
    tokens, lengths = batch.inputs, np.array([5, 6, 7, 8])
    np.testing.assert_array_equal(backend.rewards(resumed.model, tokens, lengths), backend.rewards(model, tokens, lengths))


def test_a_language_models_checkpoint_gets_a_fresh_score_head(backend, tmp_path):
    """with_score_head: the LM head goes, the rest is kept bit for bit, score ~ N(0, 1/(d+1)), the
    same draw for the same seed; the first rewards are O(1)."""
    spec = tiny(tie_embeddings=False, d_model=256, n_heads=4)
    backend.save(backend.init(spec, seed=0), tmp_path / "lm")
    reward_spec = spec.replace(head="score")
    checkpoint.with_score_head(tmp_path / "lm", reward_spec, tmp_path / "rm", seed=5)
    lm, rm = load_file(tmp_path / "lm" / "model.safetensors"), load_file(tmp_path / "rm" / "model.safetensors")
    assert set(rm) == set(lm) - {"lm_head.weight"} | {"score.weight"}
    assert all(np.array_equal(rm[k], lm[k]) for k in rm if k != "score.weight")
    head = rm["score.weight"]
    assert head.shape == (1, 256) and head.std() == pytest.approx(1 / math.sqrt(257), rel=0.15)
    checkpoint.with_score_head(tmp_path / "lm", reward_spec, tmp_path / "again", seed=5)
    assert np.array_equal(load_file(tmp_path / "again" / "model.safetensors")["score.weight"], head)
    model = backend.load(tmp_path / "rm")
    rewards = backend.rewards(model, np.arange(1, 41).reshape(4, 10), np.full(4, 10))
    assert 0.1 < np.abs(rewards).mean() < 5


def test_a_reward_model_has_no_logits_and_a_language_model_no_rewards(backend):
    reward, lm = backend.init(tiny(head="score")), backend.init(tiny())
    tokens = np.ones((1, 4), np.int64)
    with pytest.raises(ConfigError, match="reward model.*no LM head"):
        backend.logits(reward, tokens)
    with pytest.raises(ConfigError, match="reward model.*no LM head"):
        backend.generate(reward, [[1, 2]], 3)
    with pytest.raises(ConfigError, match="language model.*no score head"):
        backend.rewards(lm, tokens, np.array([4]))


def test_the_spec_says_score_and_counts_the_head():
    spec = tiny(tie_embeddings=False)
    reward = spec.replace(head="score")
    assert "head" not in spec.to_dict() and reward.to_dict()["head"] == "score"
    assert reward.parameter_count() == spec.parameter_count() - spec.vocab_size * spec.d_model + spec.d_model
    assert sum(math.prod(s) for s in checkpoint.parameter_names(reward).values()) == reward.parameter_count()
    with pytest.raises(ConfigError, match="head must be one of lm, score, got 'value'"):
        spec.replace(head="value")
