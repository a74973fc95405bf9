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
