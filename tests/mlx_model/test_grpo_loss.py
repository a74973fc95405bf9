"""MLX's grpo loss equals PyTorch's on the same checkpoint and rollout batch (old and reference
log-probs, both clip sides, each aggregation), and a training step on each moves them alike."""

# ruff: noqa: E402  (the imports below follow the importorskip that guards them)

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from orchestration.core.batch import Batch
from orchestration.core.grpo import aggregation_weights
from orchestration.core.optim import OptimConfig
from tests.mlx_model.conftest import VOCAB, tiny


def rollout_batch(seed: int, aggregation: str, rows: int = 4, length: int = 12) -> Batch:
    """Answers of random length after a 2-token prompt, the last of one token."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, (rows, length + 1)).astype(np.int32)
    mask = np.zeros((rows, length), np.float32)
    for row in range(rows):
        mask[row, 2 : 2 + int(rng.integers(1, length - 2 + 1))] = 1.0
    mask[-1, 3:] = 0.0  # a one-token answer: a metric's per-answer token mean reaches its floor of one
    weight, count = aggregation_weights(aggregation, mask, 16)
    extras = {"advantages": rng.normal(0, 1, rows).astype(np.float32),
              "epsilon_low": np.full(rows, 0.2, np.float32), "epsilon_high": np.full(rows, 0.28, np.float32),
              "token_weight": weight, "row_count": count, "beta": np.full(rows, 0.04, np.float32)}  # fmt: skip
    return Batch(tokens[:, :-1], tokens[:, 1:], loss_mask=mask, extras=extras)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "dr_grpo"])
def test_mlx_grpo_equals_torch(backend, torch_backend, tmp_path, aggregation):
    torch_backend.save(torch_backend.init(tiny(), seed=3), tmp_path / "ckpt")
    theirs, ours = torch_backend.load(tmp_path / "ckpt"), backend.load(tmp_path / "ckpt")
    batch = rollout_batch(0, aggregation)
    batch.extras["advantages"][0] = 0.0  # a group whose answers all scored alike: never clipped
    logps = torch_backend.logprobs(theirs, Batch(batch.inputs, batch.targets))
    rng = np.random.default_rng(1)
    batch.extras["old_logprobs"] = (logps + rng.uniform(-0.4, 0.4, logps.shape)).astype(np.float32)
    batch.extras["ref_logprobs"] = (logps + rng.normal(0, 0.5, logps.shape)).astype(np.float32)
    expected = torch_backend.eval_loss(theirs, batch, loss="grpo")
    assert backend.eval_loss(ours, batch, loss="grpo") == pytest.approx(expected, abs=1e-4)
    optim = OptimConfig(lr=1e-2, warmup_steps=0, total_steps=2, grad_accum_steps=2)
    a, b = torch_backend.init_train_state(theirs, optim), backend.init_train_state(ours, optim)
    for _ in range(2):
        ma, mb = torch_backend.train_step(a, batch, loss="grpo"), backend.train_step(b, batch, loss="grpo")
        assert mb["loss"] == pytest.approx(ma["loss"], abs=1e-4)
        assert mb["counted_tokens"] == ma["counted_tokens"]
        assert set(mb) == set(ma) >= {"grpo/clip_ratio", "grpo/ratio", "grpo/entropy", "grpo/kl"}
        for key in ma:
            assert mb[key] == pytest.approx(ma[key], rel=1e-4, abs=1e-4), key
    assert 0 < ma["grpo/clip_ratio"] < 1  # both clip sides are exercised
    after = torch_backend.eval_loss(a.model, batch, loss="grpo")
    assert backend.eval_loss(b.model, batch, loss="grpo") == pytest.approx(after, abs=1e-4)


def test_on_policy_with_a_zero_clip_range_clips_nothing(backend, torch_backend):
    """On policy (no old_logprobs) the ratio is exactly 1: with epsilon = epsilon_high = 0 it sits on
    both clip bounds, which clip only strictly beyond them (TRL's is_low_clipped / is_high_clipped)."""
    from cuda_model.losses import grpo as torch_grpo
    from mlx_model.losses import grpo as mlx_grpo
    from mlx_model.step import arrays

    batch = rollout_batch(0, "token_mean")
    batch.extras["epsilon_low"] = batch.extras["epsilon_high"] = np.zeros(batch.rows, np.float32)
    torch_model, mlx_model = torch_backend.init(tiny(), seed=3), backend.init(tiny(), seed=3)
    assert torch_grpo(torch_model, torch_backend.tensors(batch))[2]["grpo/clip_ratio"].item() == 0.0
    assert mlx_grpo(mlx_model, arrays(batch))[2]["grpo/clip_ratio"].item() == 0.0
