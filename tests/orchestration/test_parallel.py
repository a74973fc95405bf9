"""Data-parallel rows: the ranks' rows put back together are the global batch, each row once, in
order, shares differing by at most one row; which parallelism a stage gets from what its backend
declares."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestration.core.batch import Batch
from hanyeong.errors import ConfigError
from orchestration.core.backends import Capabilities, capabilities
from orchestration.core.parallel import check_parallelism, rank_rows, resolve_parallelism
from tests.orchestration.test_batch import batches


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


@given(batch=batches(), world=st.integers(1, 9))
def test_every_array_of_any_shape_is_split_across_the_ranks(batch, world):
    parts = [rank_rows(batch, r, world) for r in range(world)]
    for name, value in batch.arrays().items():  # extras included, whatever their names and shapes
        joined = np.concatenate([p[name] for p in parts])
        assert joined.dtype == value.dtype
        np.testing.assert_array_equal(joined, value)
    assert all(list(p.arrays()) == list(batch.arrays()) for p in parts)


def test_a_rank_outside_the_group_is_refused():
    batch = Batch.from_tokens(np.zeros((4, 3), np.int32))
    with pytest.raises(ValueError, match="rank 2 is not in a group of 2"):
        rank_rows(batch, 2, 2)


def test_auto_shards_large_models_where_the_backend_shards():
    torch, mlx = capabilities("torch"), capabilities("mlx")
    big = torch.shard_from_params
    assert resolve_parallelism("auto", torch, big - 1) == "ddp"
    assert resolve_parallelism("auto", torch, big) == "fsdp"
    assert resolve_parallelism("ddp", torch, 10**10) == "ddp"
    assert resolve_parallelism("auto", mlx, 10**10) == "ddp"  # MLX never shards: shard_from_params None
    with pytest.raises(ConfigError, match=r"^stage 1: parallelism = 'fsdp': the backend trains a group with 'ddp' only"):
        resolve_parallelism("fsdp", mlx, 10, "stage 1")
    with pytest.raises(ConfigError, match=r"^s: parallelism must be one of auto, ddp, fsdp, got 'tp'"):
        resolve_parallelism("tp", torch, 10, "s")


def test_a_backend_that_declares_one_parallelism_gets_only_that_one():
    replicated = Capabilities(parallelisms=("ddp",), shard_from_params=None, launcher="ring",
                              device_resource=None, device_required=False, takes_gpus=False)  # fmt: skip
    sharded = replace(replicated, parallelisms=("ddp", "fsdp"), shard_from_params=100)
    assert resolve_parallelism("auto", replicated, 10**12) == "ddp"
    assert resolve_parallelism("auto", sharded, 100) == "fsdp"
    check_parallelism("auto", replicated)
    with pytest.raises(ConfigError, match="'fsdp'"):
        check_parallelism("fsdp", replicated)
    with pytest.raises(ConfigError, match="launcher must be one of ray_train, ring"):
        replace(replicated, launcher="mpi")
    with pytest.raises(ConfigError, match="parallelisms must be some of ddp, fsdp"):
        replace(replicated, parallelisms=("tp",))
