"""The PyTorch backend on a CUDA GPU against the CPU (fp32 reference). Skipped without CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from orchestration.core.batch import Batch
from orchestration.core.optim import OptimConfig
from tests.check_model import check_model, random_tokens
from tests.cuda_model.conftest import tiny

GPU_MARKS = (
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
)
pytestmark = list(GPU_MARKS)


@pytest.fixture
def gpu():
    from cuda_model.backend import TorchBackend

    return TorchBackend("cuda")


def test_check_model_on_cuda(gpu, tmp_path):
    check_model(
        gpu, tiny(tie_embeddings=False), tmp_path, atol=2e-2
    )  # bf16 autocast: batch shapes change kernels


@pytest.mark.parametrize("tied", [True, False])
def test_cuda_logits_match_cpu(backend, gpu, tied):
    spec = tiny(tie_embeddings=tied)
    cpu_model, gpu_model = backend.init(spec, seed=4), gpu.init(spec, seed=4)
    for a, b in zip(cpu_model.state_dict().values(), gpu_model.state_dict().values()):
        assert torch.equal(a, b.cpu())  # seeded init is device-independent
    tokens = random_tokens(spec, (2, 64))
    segments = np.repeat(np.arange(4), 16)[None].repeat(2, 0)
    for seg in (None, segments):
        expected = backend.logits(cpu_model, tokens, seg)
        with torch.no_grad():  # fp32 on the GPU: no autocast
            x = torch.from_numpy(tokens).cuda()
            s = None if seg is None else torch.from_numpy(seg).cuda()
            fp32 = gpu_model(x, s).cpu().numpy()
        np.testing.assert_allclose(fp32, expected, atol=1e-4, rtol=0)
        bf16 = gpu.logits(gpu_model, tokens, seg)  # the backend's default on CUDA: bf16 autocast
        assert bf16.dtype == np.float32
        assert np.abs(bf16 - expected).max() <= 0.02 * np.abs(expected).max() + 1e-3


@pytest.mark.parametrize("compile", [False, True])
def test_cuda_train_step_follows_the_cpu_one(backend, gpu, compile):
    spec = tiny()
    optim = OptimConfig(lr=1e-2, total_steps=10, grad_accum_steps=2)
    batch = Batch.from_tokens(random_tokens(spec, (4, 33), seed=2))
    losses = []
    for b, kwargs in ((backend, {}), (gpu, {"compile": compile, "fused": True})):
        state = b.init_train_state(b.init(spec, seed=0), optim, **kwargs)
        losses.append([b.train_step(state, batch)["loss"] for _ in range(3)])
    cpu, cuda = losses
    assert cuda[-1] < cuda[0]
    np.testing.assert_allclose(cuda, cpu, rtol=2e-2)


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
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(compiled[1].float(), eager[1].float(), rtol=0, atol=1e-2)
