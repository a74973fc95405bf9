"""MLX's distillation losses (afm, soft) equal PyTorch's on the same checkpoint and batch, packed
rows, loss mask and mix included (<= 1e-4), and one training step on each moves them alike."""

# ruff: noqa: E402  (the imports below follow the importorskip that guards them)

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from orchestration.core.batch import Batch
from orchestration.core.optim import OptimConfig
from tests.mlx_model.conftest import VOCAB, tiny


def distill_batch(seed: int, rows: int = 2, length: int = 16, k: int = 8) -> Batch:
    """Two packed rows (two documents each), a loss mask, a random teacher's top-k, every setting."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, (rows, length + 1)).astype(np.int32)
    segments = (np.arange(length + 1) >= 7).astype(np.int32)[None].repeat(rows, 0)
    mask = (rng.random((rows, length + 1)) > 0.2).astype(np.float32)
    teacher = rng.normal(0, 3, (rows, length, VOCAB))
    logp = teacher - np.log(np.exp(teacher).sum(-1, keepdims=True))
    ids = np.argsort(-logp, axis=-1, kind="stable")[..., :k]
    extras = {"teacher_ids": ids.astype(np.int32), "teacher_logprobs": np.take_along_axis(logp, ids, -1).astype(np.float32),
              "afm_weight": np.full(rows, 0.9, np.float32), "temperature": np.full(rows, 1.5, np.float32),
              "mix": np.full(rows, 0.3, np.float32)}  # fmt: skip
    return Batch.from_tokens(tokens, loss_mask=mask, segment_ids=segments, **extras)


@pytest.mark.parametrize("name", ["afm", "soft"])
def test_mlx_distillation_equals_torch(backend, torch_backend, tmp_path, name):
    torch_backend.save(torch_backend.init(tiny(), seed=3), tmp_path / "ckpt")
    theirs, ours = torch_backend.load(tmp_path / "ckpt"), backend.load(tmp_path / "ckpt")
    batch = distill_batch(0)
    # the teacher's top-1 is the student's own argmax at every other position: agreement ~ 1/2
    student = torch_backend.logits(theirs, batch.inputs, segment_ids=batch.segment_ids).argmax(-1)
    batch.extras["teacher_ids"][:, ::2, 0] = student[:, ::2]
    expected = torch_backend.eval_loss(theirs, batch, loss=name)
    assert backend.eval_loss(ours, batch, loss=name) == pytest.approx(expected, abs=1e-4)
    optim = OptimConfig(lr=1e-2, warmup_steps=0, total_steps=1, grad_accum_steps=2)
    a, b = torch_backend.init_train_state(theirs, optim), backend.init_train_state(ours, optim)
    ma, mb = torch_backend.train_step(a, batch, loss=name), backend.train_step(b, batch, loss=name)
    assert mb["loss"] == pytest.approx(ma["loss"], abs=1e-4)
    assert mb["counted_tokens"] == ma["counted_tokens"] == batch.loss_mask.sum()
    assert set(mb) == set(ma) >= {"distill/ce", "distill/kd", "distill/agreement"}
    for key in ma:
        assert mb[key] == pytest.approx(ma[key], rel=1e-4, abs=1e-4), key
    assert 0.3 < ma["distill/agreement"] < 0.8
    after = torch_backend.eval_loss(a.model, batch, loss=name)
    assert after < expected
    assert backend.eval_loss(b.model, batch, loss=name) == pytest.approx(after, abs=1e-4)
