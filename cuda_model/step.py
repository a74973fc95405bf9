"""One optimizer step: micro-batches, backward, clip, AdamW, with the shared LR schedule.

The global batch is split along B into `optim.grad_accum_steps` micro-batches; their summed losses
are backpropagated as they are and the accumulated gradients divided once by the number of counted
targets of the whole global batch, so any split gives the update of one big batch. bf16 autocast on
CUDA (fp32 master weights and moments), plain fp32 on the CPU.

Data parallel (`parallel` 'ddp' or 'fsdp', cuda_model/parallel.py): each rank gets its rows of the
global batch. DDP/FSDP average the gradients over the ranks; the step multiplies by the world size
and divides by the counted targets of ALL ranks (one all-reduce of [loss sum, count, tokens]), so
the update, the loss and the token count are those of the single process on the whole batch.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from cuda_model import losses
from cuda_model import parallel as par
from cuda_model.losses import LossFn, Tensors, get_loss
from cuda_model.model import Model
from orchestration.core.checkpoint import ADAM_MOMENTS, optimizer_key
from hanyeong.errors import CheckpointError, DataError
from orchestration.core.optim import OptimConfig, decays, lr_at

ENV_COMPILE = "HANYEONG_TORCH_COMPILE"  # "1": torch.compile the loss (forward) function
ENV_FUSED = "HANYEONG_FUSED_ADAMW"  # "1"/"0": fused AdamW kernel (default: on CUDA only)
ENV_FSDP_BF16 = "HANYEONG_FSDP_BF16"  # "1"/"0": FSDP gathers bf16 parameters, reduces fp32 (default: on CUDA)


def env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    return default if value == "" else value not in ("0", "false", "no", "off")


def precision(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (tensor cores); nothing on the CPU, where bf16 is slower and less exact."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class TrainState:
    """Everything a run needs to continue: the model, AdamW around it, and the counters."""

    model: Model
    optimizer: torch.optim.AdamW
    optim: OptimConfig
    seed: int = 0
    step: int = 0
    """Optimizer steps taken; the LR of the next one is lr_at(optim, step)."""
    tokens_seen: int = 0
    """Input tokens trained on (B·T summed over steps)."""
    data_cursor: Any = None
    """Where the data loader is; it fills this, JSON-serialisable."""
    compile: bool = False
    losses: dict[str, LossFn] = field(default_factory=dict)  # by name, compiled when `compile`
    parallel: str | None = None
    """None, or 'ddp' / 'fsdp': one rank of the default process group (FSDP: `model` is sharded)."""
    wrapped: torch.nn.Module | None = None
    """The DDP / FSDP LossModule around `model` (cuda_model/parallel.py) when `parallel`."""
    world: int = 1
    rank: int = 0
    activation_checkpointing: bool = False
    """Each block's activations are recomputed in the backward pass (model.py): the same losses and
    gradients for less memory and about a third more compute; not part of a checkpoint."""
    carried_steps: int = 0
    """AdamW steps of the earlier stage(s) whose moments this state carries on (a stage's
    carry_optimizer): AdamW's bias corrections count them, the LR schedule does not."""


def build_optimizer(model: Model, optim: OptimConfig, fused: bool) -> torch.optim.AdamW:
    """AdamW with two groups: decayed matrices, undecayed norms and embeddings (optim.decays)."""
    named = list(model.named_parameters())  # checkpoint names: model.embed_tokens.weight, ...
    groups = [
        {"params": [p for n, p in named if decays(n, optim)], "weight_decay": optim.weight_decay},
        {"params": [p for n, p in named if not decays(n, optim)], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    kernel = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr_at(optim, 0), betas=optim.betas, eps=optim.eps, **kernel)


def init_train_state(
    model: Model,
    optim: OptimConfig,
    seed: int = 0,
    compile: bool | None = None,
    fused: bool | None = None,
    parallel: str | None = None,
    activation_checkpointing: bool = False,
    mixed_precision: bool | None = None,
) -> TrainState:
    """Step 0 around `model`; compile/fused/mixed_precision default to the env vars: fused AdamW
    (FSDP's sharded parameters too) and FSDP's bf16 mixed precision on CUDA only; the CPU stays
    fp32 and exact. With `parallel`, the model is wrapped (FSDP shards it in place) before AdamW is
    built over its parameters. With `activation_checkpointing`, the model's training forwards
    recompute each block in backward."""
    on_cuda = next(model.parameters()).device.type == "cuda"
    compile = env_flag(ENV_COMPILE, False) if compile is None else compile
    fused = env_flag(ENV_FUSED, on_cuda) if fused is None else fused
    if mixed_precision is None:
        mixed_precision = env_flag(ENV_FSDP_BF16, on_cuda) and parallel == "fsdp"
    if compile:
        losses.COMPILE_HEAD_KERNEL = True  # the fused head + loss's softmax kernel too
    model.model.activation_checkpointing = activation_checkpointing  # before FSDP wraps the blocks
    wrapped = par.wrap(model, parallel, mixed_precision) if parallel else None
    rank, world = par.world() if parallel else (0, 1)
    return TrainState(model, build_optimizer(model, optim, fused), optim, seed=seed, compile=compile,
                      parallel=parallel, wrapped=wrapped, world=world, rank=rank,
                      activation_checkpointing=activation_checkpointing)  # fmt: skip


def loss_function(state: TrainState, name: str) -> LossFn:
    if name not in state.losses:
        fn = get_loss(name)
        state.losses[name] = torch.compile(fn) if state.compile else fn
    return state.losses[name]


def split(batch: Tensors, n: int) -> list[Tensors]:
    """n micro-batches along B of every array, names unread (sizes differ by at most one when n
    does not divide B)."""
    B = batch["inputs"].shape[0]
    if B < n:
        raise DataError(
            f"a batch of {B} rows cannot be split into grad_accum_steps={n} micro-batches"
        )
    parts = {k: torch.tensor_split(v, n) for k, v in batch.items()}
    return [{k: v[i] for k, v in parts.items()} for i in range(n)]


def local_split(batch: Tensors, n: int) -> list[Tensors]:
    """A rank's rows in up to n micro-batches: fewer when it has fewer rows, one (empty) when it has
    none, so every rank takes part in the gradient reduction. The update does not depend on the split."""
    B = batch["inputs"].shape[0]
    return [batch] if B == 0 else split(batch, min(n, B))


def forward_backward(
    state: TrainState, batch: Tensors, loss: str
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Accumulate d(sum loss)/dw over the micro-batches; return summed loss, count and the loss's
    summed metrics (detached). On a parallel state the gradients are reduced over the ranks with
    the last micro-batch."""
    fn, device, wrapped = loss_function(state, loss), batch["inputs"].device, state.wrapped
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    extra: dict[str, torch.Tensor] = {}
    accum = state.optim.grad_accum_steps
    micros = split(batch, accum) if wrapped is None else local_split(batch, accum)
    for i, micro in enumerate(micros):
        last = i == len(micros) - 1
        with contextlib.nullcontext() if wrapped is None else par.syncing(wrapped, last):
            with precision(device):
                summed, n, *metrics = fn(state.model, micro) if wrapped is None else wrapped(micro, fn)
            summed.backward()  # outside autocast, as PyTorch recommends
        total, count = total + summed.detach().float(), count + n.detach().float()
        for name, value in (metrics[0] if metrics else {}).items():  # a loss's own summed metrics
            extra[name] = extra.get(name, 0.0) + value.detach().float()
    return total, count, extra


def train_step(state: TrainState, batch: Tensors, loss: str = "causal_lm") -> dict[str, float]:
    """One optimizer step on a global batch of tensors (on a parallel state: this rank's rows of
    it); returns the global batch's loss, grad_norm, lr, tokens and counted_tokens, and the means
    of the metrics the loss returns (cuda_model/losses.py). A batch without an array the loss reads
    is a DataError before anything is computed."""
    losses.check_reads(loss, batch)
    state.model.train()
    total, count, extra = forward_backward(state, batch, loss)
    params = [p for p in state.model.parameters() if p.grad is not None]
    grads = [p.grad for p in params]
    names, sums = sorted(extra), [float(extra[k]) for k in sorted(extra)]
    if state.wrapped is None:
        tokens, n, total = batch["inputs"].numel(), count.item(), total.item()
        # mean over the global batch's counted targets; an all-masked batch gives zero gradients
        torch._foreach_div_(grads, count.clamp(min=1.0))
    else:
        local = [total.item(), count.item(), float(batch["inputs"].numel()), *sums]
        total, n, tokens, *sums = par.all_sum(local, batch["inputs"].device)
        tokens = int(tokens)
        # DDP/FSDP averaged over the ranks: back to the sum, then the mean over ALL counted targets
        torch._foreach_mul_(grads, float(state.world))
        torch._foreach_div_(grads, max(n, 1.0))
    grad_norm = clip(params, grads, state.optim.grad_clip)
    lr = lr_at(state.optim, state.step)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.tokens_seen += tokens
    means = {name: value / max(n, 1.0) for name, value in zip(names, sums)}  # the loss's metrics
    return {"loss": total / max(n, 1.0), "grad_norm": grad_norm, "lr": lr,
            "tokens": float(tokens), "counted_tokens": n, **means}  # fmt: skip


def clip(params: list[torch.Tensor], grads: list[torch.Tensor], grad_clip: float) -> float:
    """Clip the gradients to a global norm of `grad_clip` (0: off; the norm is still computed and
    logged); returns the norm before clipping. FSDP's sharded norms are summed over the ranks."""
    max_norm = grad_clip or float("inf")
    if not any(par.is_sharded(g) for g in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True).item()
    norm = par.full_tensor(torch.nn.utils.get_total_norm(grads, foreach=True))
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    return norm.item()


# ---- optimizer state in the checkpoint's framework-neutral layout ------------------------------


def optimizer_tensors(state: TrainState, keep: bool = True) -> dict[str, torch.Tensor]:
    """AdamW moments as fp32 CPU tensors under optimizer_key(name, moment); zeros before step 1.
    Sharded (FSDP) moments are gathered whole, a collective every rank calls; a rank that does not
    write (`keep` False) drops each tensor once gathered."""
    out = {}
    for name, p in state.model.named_parameters():
        moments = state.optimizer.state.get(p, {})
        for moment in ADAM_MOMENTS:
            value = moments.get(moment)
            if value is None:
                value = torch.zeros(p.shape, dtype=p.dtype) if keep else None
            else:
                value = par.full_tensor(value.detach())
            if keep:
                out[optimizer_key(name, moment)] = value.float().cpu().contiguous()
    return out


def load_optimizer_tensors(state: TrainState, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Put saved moments into the AdamW of `state` (whose step counter is already set)."""
    named = dict(state.model.named_parameters())
    expected = {optimizer_key(n, m) for n in named for m in ADAM_MOMENTS}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise CheckpointError(f"{where}: optimizer moments do not match the model: "
                              f"missing {missing[:3]}, unexpected {extra[:3]}")  # fmt: skip
    if state.step + state.carried_steps == 0:
        return  # AdamW creates zero moments on its first step
    moments = {}
    for name, p in named.items():
        moments[name] = {m: tensors[optimizer_key(name, m)].to(p.dtype) for m in ADAM_MOMENTS}
        if tuple(moments[name]["exp_avg"].shape) != tuple(p.shape):
            raise CheckpointError(
                f"{where}: {name} moments have shape {tuple(moments[name]['exp_avg'].shape)}"
            )
        moments[name] = {m: par.shard_like(v, p) for m, v in moments[name].items()}  # FSDP: this rank's shard
    install_moments(state, moments)


def install_moments(state: TrainState, moments: dict[str, dict[str, torch.Tensor]]) -> None:
    """Make `moments` ({parameter name: {moment: tensor laid out as the parameter}}) AdamW's state
    after its `state.step + state.carried_steps` steps (its bias corrections count both)."""
    saved = state.optimizer.state_dict()  # params are indexed in group order
    index = {
        id(p): i for i, p in enumerate(p for g in state.optimizer.param_groups for p in g["params"])
    }
    for name, p in state.model.named_parameters():
        saved["state"][index[id(p)]] = {"step": torch.tensor(float(state.step + state.carried_steps)), **moments[name]}
    state.optimizer.load_state_dict(saved)  # moves moments (and the fused step) to the param device
