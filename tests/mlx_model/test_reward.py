"""The reward model on MLX against PyTorch: the same checkpoint gives the same rewards, the same
Bradley-Terry loss and metrics, and one training step moves the weights alike; what MLX saves,
torch loads as a reward model (score.weight)."""

# ruff: noqa: E402  (the imports below follow the importorskip that guards them)

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")  # skip the module, before any mlx import, where mlx is missing

from hanyeong.errors import ConfigError
from orchestration.core.batch import Batch
from orchestration.core.optim import OptimConfig
from tests.mlx_model.conftest import VOCAB, tiny
from tests.mlx_model.test_parity import perturbed

SPECS = {"tied": tiny(head="score"), "untied-mha": tiny(head="score", tie_embeddings=False, n_kv_heads=4)}


def reward_batch(seed: int, rows: int = 3, T: int = 16) -> Batch:
    """Pairs in the reward layout (cuda_model/losses.py): whole sequences, [PAD] 0 after each, the
    answer mask 1 from a shared 3-token prompt's end to the sequence's; a margin and centering."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for prefix in ("", "rejected_"):
        tokens = rng.integers(1, VOCAB, (rows, T))
        mask = np.zeros((rows, T), np.float32)
        for row, n in enumerate(rng.integers(4, T + 1, rows)):
            tokens[row, n:] = 0
            mask[row, 3:n] = 1.0
        arrays[f"{prefix}inputs"], arrays[f"{prefix}mask" if prefix else "loss_mask"] = tokens, mask
    arrays["rejected_inputs"][:, :3] = arrays["inputs"][:, :3]
    # the last pair: one answer twice, a tie (accuracy counts only a strictly higher chosen reward)
    arrays["rejected_inputs"][-1], arrays["rejected_mask"][-1] = arrays["inputs"][-1], arrays["loss_mask"][-1]
    arrays["targets"] = np.zeros_like(arrays["inputs"])
    arrays["margin"] = rng.uniform(-0.5, 0.5, rows).astype(np.float32)
    arrays["center_coefficient"] = np.full(rows, 0.01, np.float32)
    return Batch.from_arrays(arrays)


@pytest.mark.parametrize("optional", ["with", "without"], ids=["margin-center", "plain"])
@pytest.mark.parametrize("spec", list(SPECS.values()), ids=list(SPECS))
def test_rewards_and_loss_match_torch(backend, torch_backend, tmp_path, spec, optional):
    """With TRL's optional margin and center_rewards_coefficient, and without them."""
    torch_backend.save(perturbed(torch_backend.init(spec, seed=4)), tmp_path / "ckpt")
    theirs, ours = torch_backend.load(tmp_path / "ckpt"), backend.load(tmp_path / "ckpt")
    batch = reward_batch(0)
    if optional == "without":
        del batch.extras["margin"], batch.extras["center_coefficient"]
    tokens = np.concatenate([batch.inputs, batch["rejected_inputs"]])
    lengths = (tokens > 0).sum(-1)
    expected = torch_backend.rewards(theirs, tokens, lengths)
    # measured on the CPU: <= 2.2e-6 (fp32, rewards up to ~8)
    assert np.abs(backend.rewards(ours, tokens, lengths) - expected).max() <= 2e-5
    assert np.abs(expected).max() > 1.0  # not two near-zero arrays
    # measured: <= 1.3e-6
    assert backend.eval_loss(ours, batch, "reward") == pytest.approx(torch_backend.eval_loss(theirs, batch, "reward"), abs=1e-5)


def test_a_training_step_moves_both_alike(backend, torch_backend, tmp_path):
    """One AdamW step from the same weights on the same pairs: the same loss and metrics, and the same
    weights after it (score head included); what MLX saves, torch loads as a reward model."""
    spec = SPECS["tied"]
    torch_backend.save(torch_backend.init(spec, seed=1), tmp_path / "start")
    optim = OptimConfig(lr=1e-2, warmup_steps=0, total_steps=4)
    batch = reward_batch(1, rows=4)
    theirs = torch_backend.init_train_state(torch_backend.load(tmp_path / "start"), optim)
    ours = backend.init_train_state(backend.load(tmp_path / "start"), optim)
    expected, got = torch_backend.train_step(theirs, batch, "reward"), backend.train_step(ours, batch, "reward")
    assert set(got) == set(expected) >= {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"}
    for key in expected:
        assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-5), key
    backend.save(ours.model, tmp_path / "mlx")
    torch_backend.save(theirs.model, tmp_path / "torch")
    lengths = (batch.inputs > 0).sum(-1)
    a = torch_backend.rewards(torch_backend.load(tmp_path / "mlx"), batch.inputs, lengths)
    b = torch_backend.rewards(torch_backend.load(tmp_path / "torch"), batch.inputs, lengths)
    assert np.abs(a - b).max() <= 5e-5  # measured: <= 4.6e-6 (one AdamW step, lr 1e-2)


def test_a_reward_model_has_no_logits(backend):
    with pytest.raises(ConfigError, match="reward model.*no LM head"):
        backend.logits(backend.init(SPECS["tied"]), np.ones((1, 4), np.int64))
    with pytest.raises(ConfigError, match="language model.*no score head"):
        backend.rewards(backend.init(tiny()), np.ones((1, 4), np.int64), np.array([4]))
