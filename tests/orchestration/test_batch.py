"""The open Batch: named extras of any [B, ...] shape ride along every split; bad ones refused."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from orchestration.core.batch import Batch

DTYPES = st.sampled_from([np.int32, np.int64, np.float32, np.float64, np.bool_, np.uint8])


@st.composite
def batches(draw) -> Batch:
    """Any batch: B rows of T tokens, optional fields or not, 0-3 extras of any [B, ...] shape."""
    B, T = draw(st.integers(0, 9)), draw(st.integers(1, 6))
    tokens = np.arange(B * (T + 1)).reshape(B, T + 1)
    mask = (tokens % 3 == 0) if draw(st.booleans()) else None
    segments = tokens // 4 if draw(st.booleans()) else None
    names = draw(st.lists(st.sampled_from(["ref_logprobs", "rewards", "pairs", "teacher", "w"]),
                          unique=True, max_size=3))  # fmt: skip
    extras = {}
    for name in names:
        tail = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3))
        extras[name] = draw(hnp.arrays(draw(DTYPES), (B, *tail)))
    return Batch.from_tokens(tokens, loss_mask=mask, segment_ids=segments, **extras)


def same(a: Batch, b: Batch) -> None:
    assert list(a.arrays()) == list(b.arrays())
    for name, value in a.arrays().items():
        assert b[name].dtype == value.dtype and b[name].shape == value.shape
        np.testing.assert_array_equal(b[name], value)


@given(batch=batches(), n=st.integers(1, 12))
def test_split_parts_put_together_are_the_batch(batch, n):
    parts = batch.split(n)
    sizes = [p.rows for p in parts]
    assert len(parts) == n and sum(sizes) == batch.rows and sizes == sorted(sizes, reverse=True)
    assert max(sizes) - min(sizes) <= 1  # torch.tensor_split's sizes: the first B % n one larger
    joined = {k: np.concatenate([p[k] for p in parts]) for k in batch.arrays()}
    same(batch, Batch.from_arrays(joined))


@given(batch=batches())
def test_arrays_and_from_arrays_are_inverse(batch):
    same(batch, Batch.from_arrays(batch.arrays()))


def test_fields_and_extras_by_name():
    tokens = np.arange(12).reshape(2, 6)
    batch = Batch.from_tokens(tokens, rewards=np.array([0.5, -1.0]))
    assert list(batch.arrays()) == ["inputs", "targets", "rewards"]
    assert "rewards" in batch and "inputs" in batch and "loss_mask" not in batch
    np.testing.assert_array_equal(batch["targets"], tokens[:, 1:])
    with pytest.raises(KeyError, match="'loss_mask'.*inputs, targets, rewards"):
        batch["loss_mask"]


@pytest.mark.parametrize(("extras", "message"), [
    ({"rewards": np.zeros(3)}, r"'rewards' must be \[B=2, ...\], got \(3,\)"),
    ({"scalar": np.float32(1.0)}, r"'scalar' must be \[B=2, ...\], got \(\)"),
    ({"loss_mask": np.ones((2, 5))}, "would shadow"),
])  # fmt: skip
def test_extras_of_the_wrong_rows_or_names_are_refused(extras, message):
    with pytest.raises(ValueError, match=message):
        Batch(np.zeros((2, 5), np.int32), np.zeros((2, 5), np.int32), extras=extras)
