"""The distillation losses (cuda_model/losses.py afm, soft) against their definitions: soft is
KL(teacher || student) + the teacher's entropy, its gradient softmax(student) - p_teacher at
temperature 1; top-k renormalises the teacher's k ids; afm is the cross-entropy against
w one-hot(teacher top-1) + (1 - w) one-hot(target); the mix, the loss mask and the count."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cuda_model import losses
from hanyeong.errors import DataError
from orchestration.core.batch import Batch
from tests.cuda_model.conftest import VOCAB, tiny

shapes = st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(2, 12))  # B, T, V


def random_logits(seed: int, B: int, T: int, V: int, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    student = torch.tensor(rng.normal(0, scale, (B, T, V)))  # float64 references; the losses compute in fp32
    teacher = torch.tensor(rng.normal(0, scale, (B, T, V)))
    return student, teacher


def full_teacher(teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All V ids, most likely first, and their log-probs: the teacher's whole distribution."""
    logp = torch.log_softmax(teacher, -1)
    values, ids = logp.sort(-1, descending=True)
    return ids, values


@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(0, 2**31 - 1))
def test_soft_is_kl_plus_the_teachers_entropy_and_its_gradient_is_q_minus_p(shape, seed):
    B, T, V = shape
    student, teacher = random_logits(seed, B, T, V)
    student.requires_grad_(True)
    ids, logprobs = full_teacher(teacher)
    loss = losses.soft_target_loss(student, ids, logprobs, torch.ones(B, dtype=torch.float64)).double()
    p, logp = torch.softmax(teacher, -1), torch.log_softmax(teacher, -1)
    logq = torch.log_softmax(student, -1)
    kl = (p * (logp - logq)).sum(-1)
    entropy = -(p * logp).sum(-1)
    torch.testing.assert_close(loss, kl + entropy, rtol=1e-6, atol=1e-5)
    loss.sum().backward()
    torch.testing.assert_close(student.grad, torch.softmax(student, -1).detach() - p, rtol=0, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(shapes, st.integers(0, 2**31 - 1), st.floats(0.25, 4.0), st.integers(1, 12))
def test_soft_at_a_temperature_and_top_k_is_the_renormalised_tempered_teacher(shape, seed, tau, k):
    B, T, V = shape
    k = min(k, V)
    student, teacher = random_logits(seed, B, T, V)
    ids, logprobs = full_teacher(teacher)
    ids, logprobs = ids[..., :k], logprobs[..., :k]
    loss = losses.soft_target_loss(student, ids, logprobs, torch.full((B,), tau, dtype=torch.float64))
    # by hand: the tempered teacher restricted to its top k, renormalised; the tempered student
    z = teacher / tau
    kept = torch.full_like(z, float("-inf")).scatter(-1, ids, z.gather(-1, ids))
    p = torch.softmax(kept, -1)
    expected = -(p * torch.log_softmax(student / tau, -1)).sum(-1) * tau**2
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(0, 2**31 - 1), st.floats(0.0, 1.0))
def test_afm_is_the_cross_entropy_against_the_mixed_target(shape, seed, w):
    B, T, V = shape
    student, teacher = random_logits(seed, B, T, V)
    targets = torch.tensor(np.random.default_rng(seed + 1).integers(0, V, (B, T)))
    top1 = teacher.argmax(-1)
    loss = losses.afm_target_loss(student, targets, top1, torch.full((B,), w, dtype=torch.float64))
    mixed = w * torch.nn.functional.one_hot(top1, V) + (1 - w) * torch.nn.functional.one_hot(targets, V)
    expected = -(mixed * torch.log_softmax(student, -1)).sum(-1)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-5)


class FixedLogits(torch.nn.Module):
    """A 'model' whose logits are a given tensor (the loss's bookkeeping, not a network)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, inputs, segment_ids=None):
        return self.logits


def distill_batch(seed: int, B: int = 2, T: int = 6, V: int = 11, k: int = 4, mix: float | None = 0.25,
                  masked: bool = True) -> tuple[dict, torch.Tensor, torch.Tensor]:  # fmt: skip
    """A batch dict of the distillation layout, the student logits, and the teacher's logits."""
    student, teacher = random_logits(seed, B, T, V)
    ids, logprobs = full_teacher(teacher)
    rng = np.random.default_rng(seed)
    batch = {"inputs": torch.zeros(B, T, dtype=torch.long), "targets": torch.tensor(rng.integers(0, V, (B, T))),
             "teacher_ids": ids[..., :k], "teacher_logprobs": logprobs[..., :k].float(),
             "afm_weight": torch.full((B,), 0.9), "temperature": torch.full((B,), 2.0)}  # fmt: skip
    if mix is not None:
        batch["mix"] = torch.full((B,), mix)
    if masked:
        batch["loss_mask"] = torch.tensor(rng.integers(0, 2, (B, T)), dtype=torch.float32)
    return batch, student.float(), teacher


@pytest.mark.parametrize("name", ["afm", "soft"])
@pytest.mark.parametrize("mix", [None, 0.25])
def test_the_loss_mixes_the_ordinary_loss_and_counts_the_masked_targets(name, mix):
    batch, student, _ = distill_batch(0, mix=mix)
    total, count, metrics = losses.get_loss(name)(FixedLogits(student), batch)
    ce = -torch.log_softmax(student, -1).gather(-1, batch["targets"][..., None])[..., 0]
    if name == "afm":
        kd = losses.afm_target_loss(student, batch["targets"], batch["teacher_ids"][..., 0], batch["afm_weight"])
    else:
        kd = losses.soft_target_loss(student, batch["teacher_ids"], batch["teacher_logprobs"], batch["temperature"])
    m = mix or 0.0
    mask = batch["loss_mask"]
    assert count.item() == mask.sum().item()
    torch.testing.assert_close(total, (((1 - m) * kd + m * ce) * mask).sum(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(metrics["distill/ce"], (ce * mask).sum(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(metrics["distill/kd"], (kd * mask).sum(), rtol=1e-6, atol=1e-5)
    agree = (student.argmax(-1) == batch["teacher_ids"][..., 0]).float()
    assert metrics["distill/agreement"].item() == (agree * mask).sum().item()


def test_without_a_mask_every_target_counts_and_a_batch_without_the_teacher_is_refused():
    batch, student, _ = distill_batch(1, masked=False)
    _, count, _ = losses.get_loss("soft")(FixedLogits(student), batch)
    assert count.item() == 2 * 6
    with pytest.raises(DataError, match=r"the soft loss needs batch.teacher_logprobs"):
        losses.check_reads("soft", [k for k in batch if k != "teacher_logprobs"])
    with pytest.raises(DataError, match=r"the afm loss needs batch.teacher_ids"):
        losses.check_reads("afm", ["inputs", "targets", "afm_weight"])


def test_a_model_trains_on_the_distillation_losses(backend):
    """Through the backend: both losses step a tiny model and lower their own value."""
    from orchestration.core.optim import OptimConfig

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB, (2, 17)).astype(np.int32)
    teacher = torch.log_softmax(torch.tensor(rng.normal(0, 3, (2, 16, VOCAB))), -1)
    values, ids = teacher.sort(-1, descending=True)
    extras = {"teacher_ids": ids[..., :8].numpy().astype(np.int32),
              "teacher_logprobs": values[..., :8].numpy().astype(np.float32),
              "afm_weight": np.full(2, 0.9, np.float32), "temperature": np.full(2, 1.0, np.float32)}  # fmt: skip
    batch = Batch.from_tokens(tokens, segment_ids=np.zeros_like(tokens), **extras)
    for name in ("afm", "soft"):
        model = backend.init(tiny(), seed=0)
        state = backend.init_train_state(model, OptimConfig(lr=1e-2, warmup_steps=0, total_steps=3))
        before = backend.eval_loss(model, batch, loss=name)
        for _ in range(3):
            metrics = backend.train_step(state, batch, loss=name)
        assert {"distill/ce", "distill/kd", "distill/agreement"} <= set(metrics)
        assert backend.eval_loss(model, batch, loss=name) < before
