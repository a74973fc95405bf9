"""Data-parallel rows: the ranks' rows put back together are the global batch, each row once, in
order, shares differing by at most one row; which parallelism a stage gets."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestration.core.batch import Batch
from hanyeong.errors import ConfigError
from orchestration.core.parallel import FSDP_FROM_PARAMS, rank_rows, resolve_parallelism


@given(rows=st.integers(1, 40), world=st.integers(1, 9), masked=st.booleans())
def test_the_ranks_rows_put_together_are_the_global_batch(rows, world, masked):
    tokens = np.arange(rows * 5).reshape(rows, 5)
    mask = (tokens % 3 == 0).astype(np.float32) if masked else None
    batch = Batch.from_tokens(tokens, loss_mask=mask, segment_ids=tokens // 7)
    parts = [rank_rows(batch, r, world) for r in range(world)]
    for name in ("inputs", "targets", "segment_ids") + (("loss_mask",) if masked else ()):
        joined = np.concatenate([getattr(p, name) for p in parts])
        np.testing.assert_array_equal(joined, getattr(batch, name))
    sizes = [p.inputs.shape[0] for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == rows
    assert all(p.loss_mask is None for p in parts) or masked


def test_a_rank_outside_the_group_is_refused():
    batch = Batch.from_tokens(np.zeros((4, 3), np.int32))
    with pytest.raises(ValueError, match="rank 2 is not in a group of 2"):
        rank_rows(batch, 2, 2)


def test_auto_shards_large_models_on_torch_only():
    assert resolve_parallelism("auto", "torch", FSDP_FROM_PARAMS - 1) == "ddp"
    assert resolve_parallelism("auto", "torch", FSDP_FROM_PARAMS) == "fsdp"
    assert resolve_parallelism("ddp", "torch", 10**10) == "ddp"
    assert resolve_parallelism("auto", "mlx", 10**10) == "ddp"
    with pytest.raises(ConfigError, match="needs the torch backend"):
        resolve_parallelism("fsdp", "mlx", 10, "stage 1")
