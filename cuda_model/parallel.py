"""Data parallelism for the PyTorch backend: joining a process group, and the model wrapped for
DistributedDataParallel ("ddp") or FSDP2 ("fsdp": weights, gradients and AdamW sharded).

Joining: the launcher (orchestration/cluster/train_group.py) has rank 0 call the backend's
open_rendezvous(host) -> `listen`, ships the address to the other ranks, and every rank calls
join_group -> `init_group`. Rank 0 serves the TCPStore on its node's address only (never 0.0.0.0,
where torch's own rendezvous listens), so a local Ray on 127.0.0.1 stays on loopback.

The model stays single-device code (model.py). Parallelism is applied from outside, as torchtitan
does: `wrap` puts a `LossModule` around the Model, whose forward(batch, loss_fn) is the loss, and
hands THAT to DDP or fully_shard (one shard group per TransformerBlock, then the root), so the
losses keep calling model.model(...) and model.head_weight() inside the wrapped forward.

DDP and FSDP average gradients over the ranks; cuda_model/step.py rescales them so the update is
the single-process update on the whole global batch (see train_step there). Checkpoints are the
single-worker format: `full_tensor` gathers a sharded tensor, `shard_like` cuts a full one back.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket

import torch
import torch.distributed as dist
from torch import nn

from cuda_model import CAPABILITIES
from cuda_model.model import Model, TransformerBlock
from hanyeong.errors import ConfigError

TIMEOUT_S = 1800  # a collective waits this long for a rank (Ray Train's TorchConfig default)


def world() -> tuple[int, int]:
    """(rank, size) of the default process group; (0, 1) when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ---- joining a group ------------------------------------------------------------------------------


def listen(host: str) -> tuple[int, int]:
    """Rank 0: a socket listening on `host` only (never 0.0.0.0, which is where torch's own TCPStore
    binds), for `init_group` to serve the rendezvous store on; returns (fd, port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    return sock.detach(), port  # the store owns the descriptor from here on


def pin_interfaces(host: str) -> None:
    """Make gloo and NCCL bind the network interface that carries `host` (unless the user chose):
    gloo would take the hostname's address, NCCL the first non-loopback interface."""
    try:
        import psutil
    except ImportError:
        return
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == host for a in addresses):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", name)
            os.environ.setdefault("NCCL_SOCKET_IFNAME", name)
            return


def init_group(rank: int, size: int, host: str, port: int, listen_fd: int | None = None,
               device: torch.device | str = "cpu", timeout_s: float = TIMEOUT_S) -> None:  # fmt: skip
    """Join the default process group: gloo on the CPU, NCCL on CUDA. Rank 0 serves the store on
    `listen_fd` (from `listen(host)`), the others connect to host:port."""
    pin_interfaces(host)
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, size, is_master=rank == 0, timeout=timeout, wait_for_workers=False,
                          master_listen_fd=listen_fd if rank == 0 else None)  # fmt: skip
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout)


def leave_group() -> None:
    """Leave the default process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---- wrapping -------------------------------------------------------------------------------------


class LossModule(nn.Module):
    """The model with its loss as forward, so DDP / FSDP see one forward per micro-batch."""

    def __init__(self, model: Model):
        super().__init__()
        self.model = model

    def forward(self, batch, loss_fn):
        return loss_fn(self.model, batch)  # (summed loss, counted targets)


def wrap(model: Model, parallel: str, mixed_precision: bool = False) -> nn.Module:
    """The LossModule around `model`, data-parallel over the default group. FSDP shards `model`'s
    parameters in place (they become DTensors, under the same names); with `mixed_precision` it
    gathers them in bf16 for compute and reduce-scatters gradients in fp32 (the sharded fp32
    parameters, gradients and AdamW moments stay the masters), halving the all-gather traffic."""
    if parallel not in CAPABILITIES.parallelisms:
        raise ConfigError(f"parallel must be one of {', '.join(CAPABILITIES.parallelisms)}, got {parallel!r}")
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError(f"parallel = {parallel!r} needs a torch.distributed process group; launch the "
                          "stage through the runner (orchestration/cluster/train_group.py)")  # fmt: skip
    device = next(model.parameters()).device
    module = LossModule(model)
    if parallel == "ddp":
        ids = None
        if device.type == "cuda":
            ids = [torch.cuda.current_device() if device.index is None else device.index]
        # buffers are the RoPE tables, equal everywhere: no broadcast each forward
        return nn.parallel.DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    blocks, root = {}, {}
    if mixed_precision:
        blocks = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)}
        # the root's inputs are the batch: token ids, masks and fp32 reference log-probs stay as they are
        root = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                                  cast_forward_inputs=False)}  # fmt: skip
    for block in model.model.layers:
        assert isinstance(block, TransformerBlock)
        fully_shard(block, mesh=mesh, **blocks)
    fully_shard(module, mesh=mesh, **root)  # the root: embedding, final norm, head
    return module


def syncing(wrapped: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Forward + backward of a micro-batch; gradients are reduced over the ranks only when `sync`
    (the last micro-batch of a step), the others accumulate locally."""
    if isinstance(wrapped, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if sync else wrapped.no_sync()
    wrapped.set_requires_gradient_sync(sync)  # FSDP2
    return contextlib.nullcontext()


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum of each value over the ranks (fp64, so token counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ---- sharded tensors ------------------------------------------------------------------------------


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for a DTensor: every rank calls it, in the same order)."""
    return t.full_tensor() if is_sharded(t) else t


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` (the same on every rank) cut as `like` is: each rank keeps its shard, no communication."""
    full = full.to(device=like.device, dtype=like.dtype)
    if not is_sharded(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)
