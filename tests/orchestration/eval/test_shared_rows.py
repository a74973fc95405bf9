"""Requests whose model input is the same row run it once (scoring.loglikelihoods, as lm_eval's
Collator(group_by="contexts")) and score what one row per request scores, on a real checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

from orchestration.core.batch import Batch
from orchestration.eval import scoring
from orchestration.eval.tasks import TASKS, Selected, load_items
from tests.orchestration.eval.conftest import BENCHMARKS, needs_benchmarks

ITEMS = 8


def one_row_each(backend, model, requests, max_len: int, batch_size: int) -> list[float]:
    """The reference: a row per request, every target's log-probability (backend.logprobs), the
    continuation's summed; scoring.loglikelihoods did this before rows were shared."""
    rows = [(c + x)[-(max_len + 1) :] for c, x in requests]
    scored = [min(len(x), len(row) - 1) for (_, x), row in zip(requests, rows)]
    out = []
    for lo in range(0, len(rows), batch_size):
        chunk = rows[lo : lo + batch_size]
        inputs = np.zeros((len(chunk), max(map(len, chunk)) - 1), np.int64)
        targets = np.zeros_like(inputs)
        for r, row in enumerate(chunk):
            inputs[r, : len(row) - 1], targets[r, : len(row) - 1] = row[:-1], row[1:]
        logp = backend.logprobs(model, Batch(inputs, targets))
        for r, row in enumerate(chunk):
            n = scored[lo + r]
            out.append(float(np.sum(logp[r, len(row) - 1 - n : len(row) - 1], dtype=np.float64)))
    return out


class Counting:
    """The real backend, counting the forward passes and rows logprobs_at runs and the positions
    its output layer runs at."""

    def __init__(self, backend):
        self.backend, self.calls, self.rows, self.positions = backend, 0, 0, 0

    def logprobs_at(self, model, tokens, rows, positions, ids):
        self.calls, self.rows = self.calls + 1, self.rows + len(tokens)
        self.positions += len(set(zip(rows.tolist(), positions.tolist())))
        return self.backend.logprobs_at(model, tokens, rows, positions, ids)


@pytest.fixture(scope="module")
def torch_model(tiny_ckpt):
    from orchestration.core.backends import get_backend

    backend = get_backend("torch", device="cpu")
    return backend, backend.load(tiny_ckpt)


def task_requests(tokenizer, name: str) -> list[scoring.Request]:
    task = TASKS[name]
    items = load_items(Selected(task, BENCHMARKS / task.path, None), ITEMS)
    pairs = [(item.context, task.delimiter + choice) for item in items for choice in item.choices]
    return scoring.encode_pairs(tokenizer, pairs)


@needs_benchmarks
@pytest.mark.parametrize("max_len", [256, 40])  # 40: every KMMLU prompt left-truncated
def test_one_token_answers_share_a_row_and_score_the_same(torch_model, small_tokenizer, max_len):
    backend, model = torch_model
    requests = task_requests(small_tokenizer, "kmmlu")
    assert all(len(x) == 1 for _, x in requests)  # " A" ... " D": one token each
    counting = Counting(backend)
    shared = scoring.loglikelihoods(counting, model, requests, max_len, batch_size=3)
    np.testing.assert_allclose(shared, one_row_each(backend, model, requests, max_len, 3), rtol=1e-5, atol=1e-4)
    # a row and one output position per item, not per choice
    assert (counting.rows, counting.positions, counting.calls) == (ITEMS, ITEMS, -(-ITEMS // 3))


@needs_benchmarks
def test_multi_token_answers_keep_a_row_each_and_score_the_same(torch_model, small_tokenizer):
    backend, model = torch_model
    requests = task_requests(small_tokenizer, "kobest_copa")
    assert max(len(x) for _, x in requests) > 1
    counting = Counting(backend)
    shared = scoring.loglikelihoods(counting, model, requests, 256, batch_size=4)
    np.testing.assert_allclose(shared, one_row_each(backend, model, requests, 256, 4), rtol=1e-5, atol=1e-4)
    assert counting.rows == len(requests)  # the choices differ before their last token
    assert counting.positions == sum(len(x) for _, x in requests)  # the output layer: answers only


def test_rows_differing_only_in_the_last_target_are_shared_whatever_the_split(torch_model):
    """lm_eval's key, context + continuation[:-1]: one row for a context whose continuations
    share all but their last token, wherever the context ends; duplicates; empty continuations."""
    backend, model = torch_model
    ctx = [5, 17, 300, 42, 8, 99]
    requests = [(ctx, [7, 11]), (ctx, [7, 12]), (ctx + [7], [13]), (ctx, [7, 11]), (ctx[:3], [1, 2, 3]),
                (ctx, []), ([4], list(range(20, 60)))]  # fmt: skip
    counting = Counting(backend)
    for max_len, batch in ((100, 2), (8, 1)):  # 8: the long ones left-truncated
        shared = scoring.loglikelihoods(counting, model, requests, max_len, batch)
        np.testing.assert_allclose(shared, one_row_each(backend, model, requests, max_len, batch),
                                   rtol=1e-5, atol=1e-4)  # fmt: skip
        assert shared[5] == 0.0 and shared[0] == shared[3]
    assert counting.rows == 2 * 3  # ctx + [7]; ctx[:3] + [1, 2]; [4, 20, ..., 58]


def test_bits_per_byte_is_unchanged_by_sharing(torch_model, small_tokenizer, monkeypatch):
    backend, model = torch_model
    texts = ["한국어 문장입니다. 두 번째 문장도 있습니다.", "An English line, and another."]
    got = scoring.bits_per_byte(backend, model, small_tokenizer, texts, 12, 3, bos_id=1)
    monkeypatch.setattr(scoring, "loglikelihoods", one_row_each)
    want = scoring.bits_per_byte(backend, model, small_tokenizer, texts, 12, 3, bos_id=1)
    assert got["bits_per_byte"] == pytest.approx(want["bits_per_byte"], rel=1e-6)
