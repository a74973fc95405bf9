"""Data parallelism for the MLX backend over `mx.distributed` (the ring backend across Macs).

Every rank holds the whole model and AdamW. A step sums, over the ranks, the gradients of each
rank's summed losses together with the summed loss and the counted targets, then divides by the
GLOBAL count: the update is the single worker's on the whole global batch, and because the ring's
all-reduce hands every rank the same reduced bytes, the ranks' weights stay identical.

Joining: the launcher (orchestration/cluster/ring_group.py) has every rank open an endpoint
(`endpoint`: an address of its node and a free port), lists them in rank order, and every rank
joins the ring with `join_ring` (`mx.distributed.init(backend="ring", strict=True)` with MLX_RANK
and MLX_HOSTFILE set). `mx.distributed.init()` returns that group again afterwards, or a group of
one in a process that joined none.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from hanyeong.errors import CheckpointError, ConfigError
from mlx_model import CAPABILITIES

CHUNK_BYTES = 32 * 1024**2  # one all_sum per ~32 MiB of gradients (nn.average_gradients' grouping)
RING_IP_ENV = "HANYEONG_MLX_RING_IP"  # a node's address for the ring, where not Ray's node IP


# ---- joining the ring ---------------------------------------------------------------------------


def endpoint(host: str) -> str:
    """'ip:port' this rank will listen on: a port free now on `host`, or on HANYEONG_MLX_RING_IP
    where the node's environment sets it (e.g. a Thunderbolt bridge); the ring binds it a moment later."""
    ip = os.environ.get(RING_IP_ENV) or host
    with socket.socket() as s:
        s.bind((ip, 0))
        return f"{ip}:{s.getsockname()[1]}"


def ring_hostfile(addresses: list[tuple[str, int]]) -> list[list[str]]:
    """MLX_HOSTFILE's content for the ring backend: rank r listens on addresses[r] = (ip, port).

    A JSON list with one list of "ip:port" per rank (mlx.launch writes the same); rank r connects to
    rank r+1's address and accepts rank r-1's connection, so each port must be reachable from the
    previous rank's Mac."""
    if len(addresses) < 2:
        raise ConfigError(f"a ring needs at least 2 ranks, got {len(addresses)}")
    out = []
    for rank, (ip, port) in enumerate(addresses):
        if not ip or ":" in ip or not isinstance(port, int) or not 0 < port < 65536:
            raise ConfigError(f"rank {rank}: {ip!r}:{port!r} is not an IPv4 address and TCP port "
                              "for the ring")  # fmt: skip
        out.append([f"{ip}:{port}"])
    if len({a[0] for a in out}) != len(out):
        raise ConfigError(f"two ranks would listen on the same address: {out}")
    return out


def rank_env(rank: int, hostfile_path: str | Path) -> dict[str, str]:
    """The environment `mx.distributed.init(backend="ring")` reads: this rank and the hostfile."""
    if rank < 0:
        raise ConfigError(f"rank must be >= 0, got {rank}")
    return {"MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile_path)}


def join_ring(rank: int, size: int, endpoints: list[str]) -> None:
    """Join the ring of `endpoints` ('ip:port' of every rank, in rank order) as `rank`; returns once
    every rank is connected (MLX waits for them forever: the launcher bounds the wait)."""
    addresses = [(e.rpartition(":")[0], int(e.rpartition(":")[2])) for e in endpoints]
    hostfile = ring_hostfile(addresses)
    with tempfile.NamedTemporaryFile("w", prefix="ring-", suffix=".json", delete=False) as f:
        json.dump(hostfile, f)
    os.environ.update(rank_env(rank, f.name))  # the process's: it joins one ring for its life
    try:
        group = mx.distributed.init(backend="ring", strict=True)
    finally:
        os.unlink(f.name)
    if (group.rank(), group.size()) != (rank, size):
        raise ConfigError(f"the ring made this rank {group.rank()} of {group.size()}, expected {rank} of {size}")


def world_group() -> Any:
    """The mx.distributed group of this process: the launcher's ring, else a group of one."""
    return mx.distributed.init()


def data_parallel_group(parallel: str | None) -> Any | None:
    """The group a training state reduces over for `parallel`, or None (train alone)."""
    if parallel is None:
        return None
    if parallel not in CAPABILITIES.parallelisms:
        raise ConfigError(f"parallel must be one of {', '.join(CAPABILITIES.parallelisms)} or None on "
                          f"the MLX backend (every Mac holds the whole model), got {parallel!r}")  # fmt: skip
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
