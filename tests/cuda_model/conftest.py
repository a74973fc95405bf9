"""Fixtures of the PyTorch backend tests: a CPU backend (also on a GPU machine) and tiny specs."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from orchestration.core.presets import PRESETS

VOCAB = 97  # a small vocabulary keeps the embedding and the head cheap


def tiny(**changes):
    """The `tiny` preset (4 heads, 2 kv heads, tied) with a small vocabulary."""
    return PRESETS["tiny"].replace(vocab_size=VOCAB, **changes)


@pytest.fixture
def backend():
    from cuda_model.backend import TorchBackend

    return TorchBackend("cpu")


def perturbed(model, seed: int = 0):
    """`model` with weights x5 and norm weights drawn from U(0.5, 1.5): logits and attention scores
    are O(1), so attention and RoPE move the logits by O(0.1-1), where at init they move them by ~1e-3,
    under the margins of greedy choices. Parity and generation checks compare at these weights."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5, generator=generator) if name.endswith("norm.weight") else p.mul_(5.0)
    return model
