"""Data parallelism for the MLX backend over `mx.distributed` (the ring backend across Macs).

Every rank holds the whole model and AdamW. A step sums, over the ranks, the gradients of each
rank's summed losses together with the summed loss and the counted targets, then divides by the
GLOBAL count: the update is the single worker's on the whole global batch, and because the ring's
all-reduce hands every rank the same reduced bytes, the ranks' weights stay identical.

The group is the one `orchestration/cluster/workers_mlx.py` initialised in this process
(`mx.distributed.init(backend="ring", strict=True)` with MLX_RANK and MLX_HOSTFILE set);
`mx.distributed.init()` returns it again, or a group of one in a process that joined none.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from hanyeong.errors import CheckpointError, ConfigError

CHUNK_BYTES = 32 * 1024**2  # one all_sum per ~32 MiB of gradients (nn.average_gradients' grouping)


def world_group() -> Any:
    """The mx.distributed group of this process: the launcher's ring, else a group of one."""
    return mx.distributed.init()


def data_parallel_group(parallel: str | None) -> Any | None:
    """The group a training state reduces over for `parallel`, or None (train alone)."""
    if parallel is None:
        return None
    if parallel == "fsdp":
        raise ConfigError("the MLX backend trains data-parallel only (parallel = 'ddp'): every Mac "
                          "holds the whole model; use the torch backend for FSDP")
    if parallel != "ddp":
        raise ConfigError(f"parallel must be 'ddp', 'fsdp' or None, got {parallel!r}")
    group = world_group()
    return group if group.size() > 1 else None


def all_sum_flat(arrays: list[mx.array], group: Any, chunk_bytes: int = CHUNK_BYTES) -> list[mx.array]:
    """`arrays` (any shapes; summed in fp32) summed over the group in few all_sums: consecutive
    arrays are flattened into chunks of about `chunk_bytes` (one ring all-reduce per small tensor
    would be bound by latency)."""
    out: list[mx.array] = []
    chunk: list[mx.array] = []
    size = 0

    def flush() -> None:
        if not chunk:
            return
        total = mx.distributed.all_sum(mx.concatenate([a.reshape(-1) for a in chunk]), group=group)
        bounds = [0]
        for a in chunk:
            bounds.append(bounds[-1] + a.size)
        out.extend(total[lo:hi].reshape(a.shape) for a, lo, hi in zip(chunk, bounds, bounds[1:]))
        chunk.clear()

    for a in arrays:
        chunk.append(a.astype(mx.float32))
        size += a.size * 4
        if size >= chunk_bytes:
            flush()
            size = 0
    flush()
    return out


def broadcast_weights(model, group: Any) -> None:
    """Give every rank rank 0's weights (an all_sum where the other ranks add zeros), as torch DDP
    does when it wraps a model: seeded inits agree anyway, but not necessarily across MLX versions."""
    params = tree_flatten(model.parameters())
    mine = [p if group.rank() == 0 else mx.zeros_like(p) for _, p in params]
    summed = all_sum_flat(mine, group)
    model.update(tree_unflatten([(name, s.astype(p.dtype)) for (name, p), s in zip(params, summed)]))
    mx.eval(model.parameters())


def check_same_position(step: int, tokens_seen: int, group: Any) -> None:
    """Every rank must start from the same step and token count: a rank that found no checkpoint
    where rank 0 found one (the stage directory not shared between Macs) is refused here, before
    the ranks' data and collectives part ways. Every rank calls it on init and on load alike."""
    mine = mx.array([step, tokens_seen, -step, -tokens_seen], mx.int64)
    top = mx.distributed.all_max(mine, group=group).tolist()
    high, low = top[:2], [-top[2], -top[3]]
    if high != low:
        raise CheckpointError(f"rank {group.rank()} of {group.size()} is at step {step} "
                              f"({tokens_seen:,} tokens) but the ranks range over steps {low[0]}..{high[0]}: every Mac must see the "
                              "run directory (checkpoints, data, tokenizer) at the same path, e.g. on shared "
                              "storage")  # fmt: skip


def barrier(group: Any) -> None:
    """Return when every rank of the group has reached this point."""
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))
