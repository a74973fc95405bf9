"""TorchBackend.logprobs_at: the log-softmax at chosen positions, what logprobs gives there, with
the output layer run only at those positions."""

from __future__ import annotations

import numpy as np
import torch

from orchestration.core.batch import Batch
from tests.check_model import random_tokens
from tests.cuda_model.conftest import VOCAB, perturbed, tiny


def test_logprobs_at_reads_the_log_softmax_where_asked(backend, monkeypatch):
    spec = tiny()
    model = perturbed(backend.init(spec, seed=1))
    tokens = random_tokens(spec, (3, 10))
    tokens[2, 6:] = 0  # right padding: row 2 is 6 tokens
    logp = backend.logprobs(model, Batch.from_tokens(tokens))  # (3, 9): log p(tokens[:, 1:])
    rows, positions = np.array([0, 0, 1, 2, 2, 2]), np.array([3, 8, 0, 4, 4, 4])
    ids = tokens[rows, positions + 1]
    ids[-2:] = [7, VOCAB - 1]  # two more answers at row 2's position 4
    heads = []  # rows of every output-layer (vocab-wide) matmul
    linear = torch.nn.functional.linear

    def watched(x, weight, *rest):
        if weight.shape[0] == VOCAB:
            heads.append(x.reshape(-1, x.shape[-1]).shape[0])
        return linear(x, weight, *rest)

    monkeypatch.setattr(torch.nn.functional, "linear", watched)
    got = backend.logprobs_at(model, tokens, rows, positions, ids)
    assert got.dtype == np.float32 and heads == [4]  # the distinct (row, position) pairs only
    np.testing.assert_allclose(got[:4], logp[rows[:4], positions[:4]], atol=1e-5)
    full = torch.log_softmax(torch.from_numpy(backend.logits(model, tokens[2:, :5]))[0, 4], -1).numpy()
    np.testing.assert_allclose(got[3:], full[ids[3:]], atol=1e-5)
    assert np.abs(got).max() > 1.0  # perturbed weights: not a near-uniform distribution
    assert backend.logprobs_at(model, tokens, rows[:0], positions[:0], ids[:0]).shape == (0,)
