"""MLXBackend.logprobs_at against its own logprobs and against the torch backend's logprobs_at on
the same checkpoint."""

# ruff: noqa: E402  (the imports below follow the importorskip that guards them)

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")  # skip the module, before any mlx import, where mlx is missing

from orchestration.core.batch import Batch
from tests.check_model import random_tokens
from tests.mlx_model.conftest import VOCAB, tiny
from tests.mlx_model.test_parity import perturbed


def test_logprobs_at_matches_logprobs_and_torch(backend, torch_backend, tmp_path):
    spec = tiny()
    torch_backend.save(perturbed(torch_backend.init(spec, seed=2)), tmp_path / "ckpt")
    theirs, ours = torch_backend.load(tmp_path / "ckpt"), backend.load(tmp_path / "ckpt")
    tokens = random_tokens(spec, (2, 12))
    tokens[1, 7:] = 0  # right padding: row 1 is 7 tokens
    rows, positions = np.array([0, 0, 1, 1, 1]), np.array([2, 10, 5, 5, 5])
    ids = tokens[rows, positions + 1]
    ids[-2:] = [3, VOCAB - 1]  # more answers at row 1's position 5
    got = backend.logprobs_at(ours, tokens, rows, positions, ids)
    logp = backend.logprobs(ours, Batch.from_tokens(tokens))  # (2, 11): log p(tokens[:, 1:])
    assert got.dtype == np.float32 and np.abs(got).max() > 1.0
    np.testing.assert_allclose(got[:3], logp[rows[:3], positions[:3]], atol=1e-5)
    # fp32 on the CPU, both: summation order only (logits agree to <= 5e-6, test_parity.py)
    np.testing.assert_allclose(got, torch_backend.logprobs_at(theirs, tokens, rows, positions, ids), atol=5e-5)
