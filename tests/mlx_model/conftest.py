"""Fixtures of the MLX backend tests: the backend, the torch one to compare with, tiny specs.

MLX on Linux runs on its CPU build with a reference BLAS (~25x slower than torch), so every model
here is `tiny` with a small vocabulary and sequences of at most 32 tokens.
"""

from __future__ import annotations

import importlib.util

import pytest

from orchestration.core.presets import PRESETS

# No importorskip here: a skip raised by a conftest named on the command line aborts pytest, so
# each test module skips itself when mlx is not importable.

VOCAB = 300  # a small vocabulary keeps the embedding and the head cheap


def tiny(**changes):
    """The `tiny` preset (4 heads, 2 kv heads, tied) with a small vocabulary."""
    return PRESETS["tiny"].replace(vocab_size=VOCAB, **changes)


@pytest.fixture
def backend():
    from mlx_model.backend import MLXBackend

    return MLXBackend()


@pytest.fixture
def torch_backend():
    """The PyTorch backend on the CPU, to compare with (skipped where torch is not installed)."""
    pytest.importorskip("torch")
    if importlib.util.find_spec("cuda_model.backend") is None:
        pytest.skip("cuda_model/backend.py is not there yet")
    from cuda_model.backend import TorchBackend

    return TorchBackend("cpu")


def perturbed(model, seed: int = 0):
    """`model` with weights x5 and norm weights drawn from U(0.5, 1.5) (as tests/cuda_model/conftest.py
    `perturbed`): attention and RoPE move the logits by O(0.1-1), not ~1e-3 as at init."""
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten, tree_unflatten

    rng = np.random.default_rng(seed)
    model.update(tree_unflatten([
        (name, mx.array(rng.uniform(0.5, 1.5, p.shape), mx.float32) if name.endswith("norm.weight") else p * 5.0)
        for name, p in tree_flatten(model.parameters())
    ]))  # fmt: skip
    return model
