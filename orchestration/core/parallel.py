"""Data parallelism, framework-free: which rows of a global batch a rank trains on, and which kind
of parallelism a stage gets (from what its backend declares: orchestration/core/backends.py).

Every rank builds the same MixtureLoader with the same seed and cursor, draws the same GLOBAL batch
and keeps only its share of the rows. The data order, the cursor in the checkpoint and the update
(gradients summed over all ranks, divided by the global batch's counted tokens) are then those of a
single worker, so a stage resumes exactly with any worker count. Packing a global batch costs each
rank a few milliseconds (the loader packs >100M tokens/s); what each rank trains on is disjoint.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from hanyeong.errors import ConfigError
from orchestration.core.batch import Batch

if TYPE_CHECKING:
    from orchestration.core.backends import Capabilities

REPLICATED, SHARDED = "ddp", "fsdp"  # every rank holds the weights; weights, grads, AdamW sharded
GROUP_PARALLELISMS = (REPLICATED, SHARDED)  # what a backend may declare (Capabilities.parallelisms)
PARALLELISMS = ("auto", *GROUP_PARALLELISMS)  # what [[stage]] parallelism may say


def rank_rows(batch: Batch, rank: int, world: int) -> Batch:
    """Rank `rank`'s rows of every array of a global batch (extras too, unread): np.array_split's
    share (sizes differ by at most one)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a group of {world}")
    if world == 1:
        return batch
    rows = np.array_split(np.arange(batch.rows), world)[rank]
    lo, hi = (int(rows[0]), int(rows[-1]) + 1) if len(rows) else (0, 0)
    return batch.take(lo, hi)


def resolve_parallelism(name: str, capabilities: Capabilities, params: int,
                        where: str = "stage") -> str:  # fmt: skip
    """'ddp' or 'fsdp' for a multi-worker stage of a backend with these capabilities: 'auto' shards
    a model of capabilities.shard_from_params parameters or more (never where that is None)."""
    if name == "auto":
        shard_from = capabilities.shard_from_params
        name = SHARDED if shard_from is not None and params >= shard_from else REPLICATED
    check_parallelism(name, capabilities, where)
    return name


def check_parallelism(name: str, capabilities: Capabilities, where: str = "stage") -> None:
    """ConfigError unless `name` is 'auto' or a parallelism the backend trains a group with."""
    if name not in PARALLELISMS:
        raise ConfigError(f"{where}: parallelism must be one of {', '.join(PARALLELISMS)}, got {name!r}")
    if name != "auto" and name not in capabilities.parallelisms:
        runs = " or ".join(repr(p) for p in capabilities.parallelisms)
        raise ConfigError(f"{where}: parallelism = {name!r}: the backend trains a group with {runs} "
                          "only")  # fmt: skip
