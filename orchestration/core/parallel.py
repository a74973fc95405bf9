"""Data parallelism, framework-free: which rows of a global batch a rank trains on, and which kind
of parallelism a stage gets.

Every rank builds the same MixtureLoader with the same seed and cursor, draws the same GLOBAL batch
and keeps only its share of the rows. The data order, the cursor in the checkpoint and the update
(gradients summed over all ranks, divided by the global batch's counted tokens) are then those of a
single worker, so a stage resumes exactly with any worker count. Packing a global batch costs each
rank a few milliseconds (the loader packs >100M tokens/s); what each rank trains on is disjoint.
"""

from __future__ import annotations

import numpy as np

from orchestration.core.batch import Batch
from hanyeong.errors import ConfigError

PARALLELISMS = ("auto", "ddp", "fsdp")
FSDP_FROM_PARAMS = 1_000_000_000  # auto: shard weights, gradients and AdamW at this size and above


def rank_rows(batch: Batch, rank: int, world: int) -> Batch:
    """Rank `rank`'s rows of a global batch: np.array_split's share (sizes differ by at most one)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a group of {world}")
    if world == 1:
        return batch
    rows = np.array_split(np.arange(batch.inputs.shape[0]), world)[rank]
    lo, hi = (int(rows[0]), int(rows[-1]) + 1) if len(rows) else (0, 0)

    def part(array):
        return None if array is None else array[lo:hi]

    return Batch(part(batch.inputs), part(batch.targets), part(batch.loss_mask), part(batch.segment_ids))


def resolve_parallelism(name: str, backend: str, params: int, where: str = "stage") -> str:
    """'ddp' or 'fsdp' for a multi-worker stage: auto shards models of FSDP_FROM_PARAMS and more
    (torch only: the MLX backend replicates weights on every Mac)."""
    if name not in PARALLELISMS:
        raise ConfigError(f"{where}.parallelism must be one of {', '.join(PARALLELISMS)}, got {name!r}")
    if backend == "mlx":
        if name == "fsdp":
            raise ConfigError(f"{where}.parallelism = 'fsdp' needs the torch backend; MLX stages run "
                              "data-parallel ('ddp') across Macs")  # fmt: skip
        return "ddp"
    if name == "auto":
        return "fsdp" if params >= FSDP_FROM_PARAMS else "ddp"
    return name
