"""MLX against PyTorch on the same checkpoint: logits, greedy generation, and a training run that
moves between the backends mid-way (weights, AdamW moments, counters)."""

# ruff: noqa: E402  (the imports below follow the importorskip that guards them)

from __future__ import annotations

import json

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")  # skip the module, before any mlx import, where mlx is missing

from mlx.utils import tree_flatten

from mlx_model.step import init_train_state
from orchestration.core.batch import Batch
from orchestration.core.optim import OptimConfig, decays
from orchestration.core.spec import RopeScaling
from tests.check_model import random_tokens
from tests.mlx_model.conftest import tiny

SPECS = {
    "tied-gqa": tiny(),  # tied embeddings, 2 kv heads for 4 query heads
    "untied-mha": tiny(tie_embeddings=False, n_kv_heads=4, rope_theta=500_000.0),
    # llama3 scaling with a short original context: all three frequency bands in play
    "llama3-rope": tiny(rope_scaling=RopeScaling(original_max_position_embeddings=16)),
}


def perturbed(model, seed: int = 0):
    """A torch model with weights x5 and norm weights drawn from U(0.5, 1.5): attention scores are
    O(1), so attention (and RoPE) moves the logits by O(0.1-1), not O(1e-3) as at init."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5, generator=generator) if name.endswith("norm.weight") else p.mul_(5.0)
    return model


@pytest.mark.parametrize("spec", list(SPECS.values()), ids=list(SPECS))
def test_logits_and_greedy_generation_match_torch(backend, torch_backend, tmp_path, spec):
    torch_backend.save(perturbed(torch_backend.init(spec, seed=5)), tmp_path / "ckpt")
    theirs, ours = torch_backend.load(tmp_path / "ckpt"), backend.load(tmp_path / "ckpt")
    tokens = random_tokens(spec, (2, 32))
    segments = np.repeat([[0] * 12 + [1] * 20], 2, axis=0)
    for seg in (None, segments):
        expected = torch_backend.logits(theirs, tokens, segment_ids=seg)
        # measured on the CPU: <= 5e-6 (fp32, logits up to ~4); keys unrotated in one layer: 0.3-0.9
        assert np.abs(backend.logits(ours, tokens, segment_ids=seg) - expected).max() <= 5e-5
    assert np.abs(expected).max() > 1.0  # not two near-zero arrays
    prompts = [[5, 6, 7, 8, 9], [3], [40, 41, 42]]
    assert backend.generate(ours, prompts, 8) == torch_backend.generate(theirs, prompts, 8)


@pytest.mark.parametrize("loss", ["causal_lm", "sft"])
def test_packed_and_masked_losses_match_torch(backend, torch_backend, tmp_path, loss):
    """The language-model losses read segment_ids (packed documents see only themselves) and
    loss_mask (causal_lm's padding, sft's answers) as torch's do."""
    spec = tiny()
    torch_backend.save(perturbed(torch_backend.init(spec, seed=5)), tmp_path / "ckpt")
    theirs, ours = torch_backend.load(tmp_path / "ckpt"), backend.load(tmp_path / "ckpt")
    tokens = random_tokens(spec, (2, 33), seed=3)
    mask = (np.random.default_rng(3).random(tokens.shape) < 0.6).astype(np.float32)
    segments = np.repeat([[0] * 12 + [1] * 21], 2, axis=0)
    packed = Batch.from_tokens(tokens, loss_mask=mask, segment_ids=segments)
    expected = torch_backend.eval_loss(theirs, packed, loss=loss)
    # measured on the CPU: <= 8.3e-7 over 6 seeds (fp32, losses ~ 6)
    assert backend.eval_loss(ours, packed, loss=loss) == pytest.approx(expected, abs=2e-5)
    for other in (Batch.from_tokens(tokens, loss_mask=mask), Batch.from_tokens(tokens, loss_mask=np.ones_like(mask),
                                                                               segment_ids=segments)):  # fmt: skip
        assert abs(torch_backend.eval_loss(theirs, other, loss=loss) - expected) > 1e-3  # each array matters


def test_torch_loads_what_mlx_saves(backend, torch_backend, tmp_path):
    spec = tiny(tie_embeddings=False)
    model = backend.init(spec, seed=2)
    backend.save(model, tmp_path / "ckpt")
    tokens = random_tokens(spec, (2, 16))
    theirs = torch_backend.logits(torch_backend.load(tmp_path / "ckpt"), tokens)
    assert np.abs(backend.logits(model, tokens) - theirs).max() <= 1e-4


OPTIM = OptimConfig(
    lr=1e-2, warmup_steps=2, total_steps=6, weight_decay=0.1, grad_clip=0.5, grad_accum_steps=2
)


def run(first, second, start, batches, tmp_path) -> tuple[list[float], object]:
    """Three steps on `first`, checkpoint, three more on `second`: losses and the final model."""
    state = first.init_train_state(first.load(start), OPTIM)
    losses = [first.train_step(state, b)["loss"] for b in batches[:3]]
    first.save(state.model, tmp_path / f"{first.name}-{second.name}", state)
    state = second.load_train_state(tmp_path / f"{first.name}-{second.name}")
    assert (state.step, state.tokens_seen) == (3, 3 * batches[0].inputs.size)
    losses += [second.train_step(state, b)["loss"] for b in batches[3:]]
    return losses, state.model


def test_training_resumes_across_backends(backend, torch_backend, tmp_path):
    spec = tiny(tie_embeddings=False)
    torch_backend.save(torch_backend.init(spec, seed=1), tmp_path / "start")
    # two batches in turn, so the loss falls and the runs are compared while they move
    batches = [Batch.from_tokens(random_tokens(spec, (4, 17), seed=10 + i % 2)) for i in range(6)]
    runs = {(a.name, b.name): run(a, b, tmp_path / "start", batches, tmp_path)
            for a, b in [(torch_backend, torch_backend), (backend, backend),
                         (torch_backend, backend), (backend, torch_backend)]}  # fmt: skip
    reference = runs[("torch", "torch")][0]
    assert reference[-1] < reference[0] - 0.1  # the comparison is of a moving run
    for key, (losses, _) in runs.items():
        np.testing.assert_allclose(losses, reference, atol=1e-3, rtol=0, err_msg=str(key))
    # the same weights after six steps, whichever backend took which: moments and steps mean the same
    tokens = random_tokens(spec, (1, 16), seed=99)
    final = torch_backend.logits(runs[("torch", "torch")][1], tokens)
    for key in [("mlx", "mlx"), ("torch", "mlx")]:
        assert np.abs(backend.logits(runs[key][1], tokens) - final).max() < 1e-3, key
    assert np.abs(torch_backend.logits(runs[("mlx", "torch")][1], tokens) - final).max() < 1e-3


def test_trainer_state_has_the_torch_keys(backend, torch_backend, tmp_path):
    spec = tiny()
    batch = Batch.from_tokens(random_tokens(spec, (2, 9)))
    for b in (backend, torch_backend):
        state = b.init_train_state(b.init(spec), OptimConfig(total_steps=1000))
        b.train_step(state, batch)
        b.save(state.model, tmp_path / b.name, state)
    mine, theirs = (
        json.loads((tmp_path / n / "trainer_state.json").read_text()) for n in ("mlx", "torch")
    )
    assert set(mine) == set(theirs) and mine["backend"] == "mlx"
    same = set(mine) - {"backend", "rng"}  # step, tokens_seen, optim, data_cursor, seed
    assert {k: mine[k] for k in same} == {k: theirs[k] for k in same}


def test_adamw_update_is_torchs(backend):
    """Same weights, gradients, moments and step count: our AdamW step is torch.optim.AdamW's."""
    torch = pytest.importorskip("torch")
    # eps as large as sqrt(v), so where it is added shows
    optim = OptimConfig(lr=3e-3, betas=(0.9, 0.95), eps=1e-3, weight_decay=0.1, total_steps=1000)
    state = init_train_state(backend.init(tiny(), seed=0), optim, compile=False)
    rng = np.random.default_rng(0)
    params = {k: np.array(v) for k, v in tree_flatten(state.model.parameters())}
    grads = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
    moments = {
        k: (0.01 * rng.standard_normal(v.shape), 1e-4 * rng.random(v.shape))
        for k, v in params.items()
    }
    step = 4  # four steps taken: bias corrections of t = 5

    for k, (m, v) in moments.items():
        state.optimizer.state["exp_avg"][k] = mx.array(m, mx.float32)
        state.optimizer.state["exp_avg_sq"][k] = mx.array(v, mx.float32)
    state.optimizer.update(
        state.model, {k: mx.array(g) for k, g in grads.items()}, state.optimizer.hyper(step)
    )
    ours = {k: np.array(v) for k, v in tree_flatten(state.model.parameters())}

    tensors = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in params.items()}
    groups = [{"params": [p for k, p in tensors.items() if decays(k, optim) == d], "weight_decay": wd}
              for d, wd in ((True, optim.weight_decay), (False, 0.0))]  # fmt: skip
    adamw = torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps)
    for k, p in tensors.items():
        p.grad = torch.from_numpy(grads[k])
        m, v = moments[k]
        adamw.state[p] = {"step": torch.tensor(float(step)), "exp_avg": torch.from_numpy(m).float(),
                          "exp_avg_sq": torch.from_numpy(v).float()}  # fmt: skip
    adamw.step()
    for k, p in tensors.items():
        step_ours, step_torch = ours[k] - params[k], p.detach().numpy() - params[k]
        ulp = 2 * np.spacing(
            np.abs(params[k]).max()
        )  # the step of a weight near 1 is rounded to it
        np.testing.assert_allclose(step_ours, step_torch, rtol=1e-4, atol=ulp, err_msg=k)
        np.testing.assert_allclose(np.array(state.optimizer.state["exp_avg_sq"][k]),
                                   adamw.state[p]["exp_avg_sq"].numpy(), rtol=1e-5, err_msg=k)  # fmt: skip


def test_both_backends_have_the_same_losses_reading_the_same_arrays(torch_backend):
    """One recipe runs on either backend: each loss a stage names exists on both, reads the same
    arrays (a name that differs would make one backend refuse batches the other trains on) and
    reports metrics of the same names (TRL's: the logs and plots read them)."""
    import cuda_model.losses as torch_losses
    import mlx_model.losses as mlx_losses

    reads = {k: list(v) for k, v in mlx_losses.LOSS_READS.items()}
    assert reads == {k: list(v) for k, v in torch_losses.LOSS_READS.items()}
    for name in ("PAIR_METRICS", "REWARD_METRICS", "GRPO_METRICS"):
        assert getattr(mlx_losses, name) == getattr(torch_losses, name), name
