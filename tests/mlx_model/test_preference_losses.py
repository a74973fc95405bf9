"""MLX's preference losses equal PyTorch's on the same checkpoint and pair batch (and one training
step on each moves them alike)."""

# ruff: noqa: E402  (the imports below follow the importorskip that guards them)

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from orchestration.core.batch import Batch
from orchestration.core.optim import OptimConfig
from tests.mlx_model.conftest import VOCAB, tiny


def pair_batch(seed: int, rows: int = 4, length: int = 16) -> Batch:
    """Pairs in the layout of cuda_model/losses.py: a shared 5-token prompt, answers of random length."""
    rng = np.random.default_rng(seed)
    chosen = rng.integers(0, VOCAB, (rows, length + 1)).astype(np.int32)
    rejected = rng.integers(0, VOCAB, (rows, length + 1)).astype(np.int32)
    rejected[:, :5] = chosen[:, :5]
    mask = np.zeros((2 * rows, length), np.float32)
    for row in range(2 * rows):
        mask[row, 4 : 4 + int(rng.integers(1, length - 4 + 1))] = 1.0
    mask[[0, rows]] = 0.0
    mask[[0, rows], 4] = 1.0  # pair 0: one-token answers (the length floor of 1 is reached)
    rejected[-1], mask[-1] = chosen[-1], mask[rows - 1]  # the last pair: one answer twice (a tie, no accuracy)
    extras = {"rejected_inputs": rejected[:, :-1], "rejected_targets": rejected[:, 1:],
              "rejected_mask": mask[rows:], "ref_chosen_logps": rng.normal(-40, 3, rows).astype(np.float32),
              "ref_rejected_logps": rng.normal(-40, 3, rows).astype(np.float32),
              "beta": np.full(rows, 0.1, np.float32), "label_smoothing": np.full(rows, 0.1, np.float32),
              "sft_weight": np.full(rows, 0.2, np.float32)}  # fmt: skip
    extras["ref_rejected_logps"][-1] = extras["ref_chosen_logps"][-1]
    return Batch(chosen[:, :-1], chosen[:, 1:], loss_mask=mask[:rows], extras=extras)


@pytest.mark.parametrize("optional", ["with", "without"], ids=["sft-smoothing", "plain"])
@pytest.mark.parametrize("name", ["dpo", "ipo", "simper"])
def test_mlx_loss_equals_torch(backend, torch_backend, tmp_path, name, optional):
    """With the optional arrays (sft_weight, label_smoothing) and without them."""
    torch_backend.save(torch_backend.init(tiny(), seed=3), tmp_path / "ckpt")
    theirs, ours = torch_backend.load(tmp_path / "ckpt"), backend.load(tmp_path / "ckpt")
    batch = pair_batch(0)
    if optional == "without":
        del batch.extras["sft_weight"], batch.extras["label_smoothing"]
    expected = torch_backend.eval_loss(theirs, batch, loss=name)
    assert backend.eval_loss(ours, batch, loss=name) == pytest.approx(expected, abs=1e-4)
    optim = OptimConfig(lr=1e-2, warmup_steps=0, total_steps=2, grad_accum_steps=2)
    a = torch_backend.init_train_state(theirs, optim)
    b = backend.init_train_state(ours, optim)
    for _ in range(2):
        ma, mb = torch_backend.train_step(a, batch, loss=name), backend.train_step(b, batch, loss=name)
        assert mb["loss"] == pytest.approx(ma["loss"], abs=1e-4)
        assert mb["counted_tokens"] == ma["counted_tokens"] == 4  # pairs
        assert set(mb) == set(ma) >= {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                                      "logps/chosen", "logps/rejected", "lengths/chosen", "lengths/rejected"}  # fmt: skip
        for key in ma:
            assert mb[key] == pytest.approx(ma[key], rel=1e-4, abs=1e-3), key  # the loss's metrics, step means
    after = torch_backend.eval_loss(a.model, batch, loss=name)
    assert after < expected  # the step lowered it
    assert backend.eval_loss(b.model, batch, loss=name) == pytest.approx(after, abs=1e-4)
