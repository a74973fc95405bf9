"""The PyTorch backend on a CUDA GPU against the CPU (fp32 reference). Skipped without CUDA.

Tolerances come from measured error, not convenience:
- fp32 on the GPU against the CPU: 1e-4. Matmuls run in true fp32 (PyTorch leaves TF32 off for them),
  so the two differ by summation order only: ~5e-6 between two fp32 implementations (torch and MLX on
  the CPU) at the perturbed weights used here, whose logits reach ~4.
- bf16 autocast against fp32: a multiple of E, the error of the same computation under the CPU's
  bf16 autocast, measured in the test itself on the same weights and tokens. Both round matmul inputs
  and outputs to bf16 (8 significant bits) and accumulate in fp32, so E is the size of the GPU's error;
  the factor 3 leaves room for the GPU's own kernels (flash attention rounds its probabilities to bf16).
  Measured on the CPU (2 cores, torch 2.13): E = 3-5e-3 at init (logits <= 1.5, rms error 5e-4) and
  3-4e-2 at the perturbed weights (logits <= 4, rms 7e-3); a train step's loss 1e-5 -> 1.3e-3 over
  three steps (relative 3e-4).
- What that resolves: keys left unrotated in one layer move the perturbed logits by 0.58-0.81, five
  times the bf16 bound; at init they move them by only 2-3e-3, below E itself: no bf16 comparison can
  see a RoPE bug at init weights, so the logits are compared at perturbed ones (where the old
  `atol=2e-2` at init was 5-19x the shift).
- The compiled head kernel against the eager one: both compute softmax - onehot in fp32 and round it
  to bf16, so they differ by at most one bf16 ulp (relative 2^-7).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from orchestration.core.batch import Batch
from orchestration.core.optim import OptimConfig
from tests.check_model import check_model, random_tokens
from tests.cuda_model.conftest import perturbed, tiny

GPU_MARKS = (
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
)
pytestmark = list(GPU_MARKS)

FP32_ATOL = 1e-4  # 20x the fp32 difference between two implementations (module docstring)
BF16_FACTOR = 3  # the GPU's bf16 error against fp32 is at most this many times the CPU autocast's


@pytest.fixture
def gpu():
    from cuda_model.backend import TorchBackend

    return TorchBackend("cuda")


def cpu_bf16_error(model, tokens: np.ndarray, segments: np.ndarray | None = None) -> float:
    """max |logits under the CPU's bf16 autocast - fp32 logits| of a CPU model: the yardstick E."""
    x = torch.from_numpy(tokens)
    s = None if segments is None else torch.from_numpy(segments)
    with torch.no_grad():
        fp32 = model(x, s)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(x, s).float()
    return (bf16 - fp32).abs().max().item()


def test_check_model_on_cuda(backend, gpu, tmp_path):
    # check_model compares a batch of 2 with two batches of 1 (its model: seed 0, tokens (2, 12)).
    # Under bf16 the shapes pick different kernels; each result lies within ~E of fp32, so the two
    # lie within 2E of each other, x1.5 for the GPU's kernels.
    spec = tiny(tie_embeddings=False)
    error = cpu_bf16_error(backend.init(spec, seed=0), random_tokens(spec, (2, 12)))
    check_model(gpu, spec, tmp_path, atol=3 * error)


@pytest.mark.parametrize("tied", [True, False])
def test_cuda_logits_match_cpu(backend, gpu, tied):
    spec = tiny(tie_embeddings=tied)
    cpu_model, gpu_model = backend.init(spec, seed=4), gpu.init(spec, seed=4)
    for a, b in zip(cpu_model.state_dict().values(), gpu_model.state_dict().values()):
        assert torch.equal(a, b.cpu())  # seeded init is device-independent
    gpu_model.load_state_dict(perturbed(cpu_model).state_dict())  # where attention matters
    tokens = random_tokens(spec, (2, 64))
    segments = np.repeat(np.arange(4), 16)[None].repeat(2, 0)
    for seg in (None, segments):
        expected = backend.logits(cpu_model, tokens, seg)
        assert np.abs(expected).max() > 1.0  # not near-zero logits
        with torch.no_grad():  # fp32 on the GPU: no autocast
            x = torch.from_numpy(tokens).cuda()
            s = None if seg is None else torch.from_numpy(seg).cuda()
            fp32 = gpu_model(x, s).cpu().numpy()
        np.testing.assert_allclose(fp32, expected, atol=FP32_ATOL, rtol=0)
        bf16 = gpu.logits(gpu_model, tokens, seg)  # the backend's default on CUDA: bf16 autocast
        assert bf16.dtype == np.float32
        bound = BF16_FACTOR * cpu_bf16_error(cpu_model, tokens, seg)
        assert np.abs(bf16 - expected).max() <= bound


def cpu_losses(backend, spec, optim, batch, monkeypatch, bf16: bool) -> np.ndarray:
    """Three train steps on the CPU, in fp32 or under the CPU's bf16 autocast (the GPU's rounding)."""
    from cuda_model import step

    with monkeypatch.context() as m:
        if bf16:
            m.setattr(step, "precision", lambda device: torch.autocast("cpu", dtype=torch.bfloat16))
        state = backend.init_train_state(backend.init(spec, seed=0), optim)
        return np.array([backend.train_step(state, batch)["loss"] for _ in range(3)])


@pytest.mark.parametrize("compile", [False, True])
def test_cuda_train_step_follows_the_cpu_one(backend, gpu, compile, monkeypatch):
    spec = tiny()
    optim = OptimConfig(lr=1e-2, total_steps=10, grad_accum_steps=2)
    batch = Batch.from_tokens(random_tokens(spec, (4, 33), seed=2))
    cpu = cpu_losses(backend, spec, optim, batch, monkeypatch, bf16=False)
    emulated = cpu_losses(backend, spec, optim, batch, monkeypatch, bf16=True)
    state = gpu.init_train_state(gpu.init(spec, seed=0), optim, compile=compile, fused=True)
    cuda = np.array([gpu.train_step(state, batch)["loss"] for _ in range(3)])
    assert cuda[-1] < cuda[0] - 0.2  # the steps move the loss (by ~0.56 on the CPU)
    # bf16 error grows with the steps (weights drift apart): bound every step by the largest
    bound = BF16_FACTOR * np.abs(emulated - cpu).max()
    assert np.abs(cuda - cpu).max() <= bound, (cuda, cpu, bound)


def test_cuda_checkpoint_loads_on_cpu(backend, gpu, tmp_path):
    spec = tiny()
    model = gpu.init(spec, seed=3)
    state = gpu.init_train_state(model, OptimConfig(total_steps=4))
    gpu.train_step(state, Batch.from_tokens(random_tokens(spec, (2, 9))))
    gpu.save(model, tmp_path / "c", state)
    resumed = backend.load_train_state(tmp_path / "c")
    assert resumed.step == 1
    for a, b in zip(model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a.cpu(), b)
    again = gpu.load_train_state(tmp_path / "c")  # fused AdamW: its step counter moves to the GPU
    assert gpu.train_step(again, Batch.from_tokens(random_tokens(spec, (2, 9))))["loss"] > 0
    out = gpu.generate(model, [[1, 2, 3], [4]], max_new_tokens=5, temperature=0.8, top_p=0.9)
    assert [len(o) for o in out] == [5, 5]


@pytest.mark.parametrize("masked", [False, True])
def test_compiled_head_kernel_matches_the_eager_one(masked):
    from cuda_model import losses

    generator = torch.Generator(device="cuda").manual_seed(0)
    logits = (3 * torch.randn(300, 1000, device="cuda", generator=generator)).bfloat16()
    targets = torch.randint(0, 1000, (300,), device="cuda", generator=generator)
    mask = (torch.rand(300, device="cuda", generator=generator) < 0.5).float() if masked else None
    eager = losses.chunk_nll_grad(
        logits, targets, mask
    )  # bf16 logits: copied to fp32, not overwritten
    compiled = torch.compile(losses.chunk_nll_grad_fusable, dynamic=False)(logits, targets, mask)
    # the summed nll: fp32 sums of 300 terms in another order
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=0)
    # softmax - onehot, fp32 rounded to bf16 by each: equal, or one bf16 ulp apart (<= 2^-7 |x|)
    ulp = torch.finfo(torch.bfloat16).eps
    torch.testing.assert_close(compiled[1].float(), eager[1].float(), rtol=ulp, atol=1e-30)
