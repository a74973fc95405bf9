"""One optimizer step: micro-batches, value_and_grad, clip, AdamW, with the shared LR schedule.

The global batch is split along B into `optim.grad_accum_steps` micro-batches; the gradients of
their summed losses are added up and divided once by the number of counted targets of the whole
global batch, so any split gives the update of one big batch. The whole step (every micro-batch,
clipping and the AdamW update) is one `mx.compile`d function over the model and moment arrays.

DATA PARALLEL (a state with a `group`, mlx_model/parallel.py): each rank steps on its rows of the
global batch; the summed gradients, summed loss and counted targets are all_summed over the ranks
inside the compiled step before the one division, so the update is the single worker's.

AdamW is written out rather than taken from `mlx.optimizers`: it is torch.optim.AdamW's update
step for step (lerp'd first moment, bias corrections from the step count, eps added after the
bias-corrected sqrt, decoupled decay p *= 1 - lr·wd), so moments saved by either backend mean the
same thing and a run moves between them mid-training.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from mlx_model.losses import Arrays, check_reads, get_loss
from mlx_model.model import Model
from mlx_model.parallel import all_sum_flat
from orchestration.core.batch import Batch
from orchestration.core.checkpoint import ADAM_MOMENTS, optimizer_key
from hanyeong.errors import CheckpointError, DataError
from orchestration.core.optim import OptimConfig, decays, lr_at

ENV_COMPILE = "HANYEONG_MLX_COMPILE"  # "0": run the step eagerly (debugging); default compiled


class AdamW:
    """torch.optim.AdamW over a model's parameters, keyed by checkpoint name.

    state["exp_avg"][name] = m, state["exp_avg_sq"][name] = v, fp32 (B, ...) like the parameter.
    """

    def __init__(self, model: Model, optim: OptimConfig):
        self.optim = optim
        params = tree_flatten(model.trainable_parameters())
        self.decayed = {name: decays(name, optim) for name, _ in params}
        self.state: dict[str, dict[str, mx.array]] = {
            moment: {name: mx.zeros(p.shape, mx.float32) for name, p in params}
            for moment in ADAM_MOMENTS
        }

    def hyper(self, step: int, carried: int = 0) -> mx.array:
        """[lr, lr/bias_correction1, sqrt(bias_correction2), 1 - lr·wd] for optimizer step `step`
        (0-based) of the schedule, after `carried` steps of moments carried on from an earlier stage,
        in float64 then fp32, as torch computes its Python scalars; an array, so the compiled step
        is not retraced when they change."""
        b1, b2 = self.optim.betas
        t = carried + step + 1  # torch increments its step count before the update
        lr = lr_at(self.optim, step)
        return mx.array(
            [lr, lr / (1 - b1**t), math.sqrt(1 - b2**t), 1 - lr * self.optim.weight_decay],
            mx.float32,
        )

    def update(self, model: Model, grads: dict[str, mx.array], hyper: mx.array) -> None:
        """Apply one AdamW step with (already clipped) flat gradients."""
        (b1, b2), eps = self.optim.betas, self.optim.eps
        step_size, bc2_sqrt, decay = hyper[1], hyper[2], hyper[3]
        m_all, v_all = self.state["exp_avg"], self.state["exp_avg_sq"]
        new = []
        for name, p in tree_flatten(model.trainable_parameters()):
            g = grads[name]
            if self.decayed[name]:
                p = p * decay
            m = m_all[name] + (1 - b1) * (g - m_all[name])  # torch: exp_avg.lerp_(grad, 1 - beta1)
            v = b2 * v_all[name] + (1 - b2) * g * g
            p = p - step_size * m / (mx.sqrt(v) / bc2_sqrt + eps)
            m_all[name], v_all[name] = m, v  # in place: the compiled step's outputs are these dicts
            new.append((name, p))
        model.update(tree_unflatten(new))


@dataclass
class TrainState:
    """Everything a run needs to continue: the model, AdamW around it, and the counters."""

    model: Model
    optimizer: AdamW
    optim: OptimConfig
    seed: int = 0
    step: int = 0
    """Optimizer steps taken; the LR of the next one is lr_at(optim, step)."""
    tokens_seen: int = 0
    """Input tokens trained on (B·T summed over steps)."""
    data_cursor: Any = None
    """Where the data loader is; it fills this, JSON-serialisable."""
    compile: bool = True
    steps: dict[str, Any] = field(default_factory=dict)  # loss name -> (compiled) step function
    group: Any = None
    """The mx.distributed group of a data-parallel state (None: alone); see mlx_model/parallel.py."""
    activation_checkpointing: bool = False
    """Each block's activations are recomputed when differentiating (model.py): the same losses and
    gradients for less memory and about a third more compute; not part of a checkpoint."""
    carried_steps: int = 0
    """AdamW steps of the earlier stage(s) whose moments this state carries on (a stage's
    carry_optimizer): the bias corrections count them, the LR schedule does not."""


def env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    return default if value == "" else value not in ("0", "false", "no", "off")


def init_train_state(
    model: Model,
    optim: OptimConfig,
    seed: int = 0,
    compile: bool | None = None,
    group: Any = None,
    activation_checkpointing: bool = False,
) -> TrainState:
    """Step 0 around `model`: zero moments; compile defaults to HANYEONG_MLX_COMPILE (on). With
    `activation_checkpointing`, the model's blocks are recomputed in the gradient pass."""
    compile = env_flag(ENV_COMPILE, True) if compile is None else compile
    model.model.activation_checkpointing = activation_checkpointing  # read when a step is traced
    return TrainState(model, AdamW(model, optim), optim, seed=seed, compile=compile, group=group,
                      activation_checkpointing=activation_checkpointing)  # fmt: skip


def arrays(batch: Batch) -> Arrays:
    """Every array of a Batch as an mx array, by name: ids int32, floats float32, bools bool; absent
    fields are absent keys (mx.compile takes a tree of arrays, not None)."""
    out = {}
    for name, array in batch.arrays().items():
        kind = array.dtype.kind
        dtype = mx.int32 if kind in "iu" else mx.float32 if kind == "f" else None
        out[name] = mx.array(array) if dtype is None else mx.array(array, dtype)
    return out


def split(batch: Batch, n: int, world: int = 1) -> list[Arrays]:
    """n micro-batches along B of every array, names unread (sizes differ by at most one, first
    ones larger: torch.tensor_split).

    A rank of `world` holds about 1/world of the global batch: it takes ceil(n / world) micro-batches
    (the global batch's micro-batch size), as many as it has rows, none when it has no row."""
    B = batch.rows
    if world > 1:
        n = min(-(-n // world), B)
    if B < n:
        raise DataError(
            f"a batch of {B} rows cannot be split into grad_accum_steps={n} micro-batches"
        )
    return [arrays(part) for part in batch.split(n)] if n else []


def clip(grads: dict[str, mx.array], max_norm: float) -> tuple[dict[str, mx.array], mx.array]:
    """Scale grads to global L2 norm <= max_norm (0: leave them), as torch's clip_grad_norm_.

    Returns the clipped grads and the norm before clipping."""
    norm = mx.sqrt(sum((g.astype(mx.float32) ** 2).sum() for g in grads.values()))
    if max_norm <= 0:
        return grads, norm
    coef = mx.minimum(max_norm / (norm + 1e-6), 1.0)
    return {k: g * coef for k, g in grads.items()}, norm


def build_step(state: TrainState, loss: str):
    """(micro-batches, hyper) -> (summed loss, counted targets, grad norm, the loss's summed metrics);
    updates model, moments."""
    model, optimizer, fn = state.model, state.optimizer, get_loss(loss)
    loss_and_grad = nn.value_and_grad(model, fn)

    group = state.group

    def step(micros: list[Arrays], hyper: mx.array) -> tuple[mx.array, mx.array, mx.array, dict]:
        total, count, grads, extra = mx.array(0.0), mx.array(0.0), None, {}
        for micro in micros:
            (summed, n, *metrics), g = loss_and_grad(model, micro)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            total, count = total + summed, count + n
            for name, value in (metrics[0] if metrics else {}).items():  # a loss's own summed metrics
                extra[name] = extra.get(name, mx.array(0.0)) + value
        if grads is None:  # a rank with no row of this batch still takes part in the sums
            grads = tree_map(mx.zeros_like, model.trainable_parameters())
        flat = dict(tree_flatten(grads))
        if group is not None:  # sums over the ranks: one ring all-reduce per ~32 MiB
            *summed, total, count = all_sum_flat([*flat.values(), total, count], group)
            flat = dict(zip(flat, summed))
        # mean over the global batch's counted targets; an all-masked batch gives zero gradients
        flat = {k: g / mx.maximum(count, 1.0) for k, g in flat.items()}
        flat, norm = clip(flat, state.optim.grad_clip)
        optimizer.update(model, flat, hyper)
        return total, count, norm, extra

    if not state.compile:
        return step
    captured = [model.state, optimizer.state]
    return mx.compile(step, inputs=captured, outputs=captured)


def train_step(state: TrainState, batch: Batch, loss: str = "causal_lm") -> dict[str, float]:
    """One optimizer step on a global Batch (a data-parallel state: this rank's rows of it); returns
    the global batch's loss, grad_norm, lr, tokens, counted_tokens. A batch without an array the
    loss reads is a DataError before anything is computed."""
    check_reads(loss, batch.arrays())
    if loss not in state.steps:
        state.steps[loss] = build_step(state, loss)
    hyper = state.optimizer.hyper(state.step, state.carried_steps)
    world = 1 if state.group is None else state.group.size()
    micros = split(batch, state.optim.grad_accum_steps, world)
    total, count, norm, extra = state.steps[loss](micros, hyper)
    tokens = mx.array(int(batch.inputs.size), mx.int64)
    if state.group is not None:
        tokens = mx.distributed.all_sum(tokens, group=state.group)
    names = sorted(extra)
    if state.group is not None and names:  # a loss's metrics, summed over the ranks
        summed = mx.distributed.all_sum(mx.stack([extra[k] for k in names]), group=state.group)
        extra = dict(zip(names, summed))
    mx.eval(total, count, norm, tokens, extra, state.model.parameters(), state.optimizer.state)
    tokens = int(tokens.item())
    lr = lr_at(state.optim, state.step)
    state.step += 1
    state.tokens_seen += tokens
    n = count.item()
    means = {name: extra[name].item() / max(n, 1.0) for name in names}  # the loss's metrics
    return {"loss": total.item() / max(n, 1.0), "grad_norm": norm.item(), "lr": lr,
            "tokens": float(tokens), "counted_tokens": n, **means}  # fmt: skip


# ---- optimizer state in the checkpoint's framework-neutral layout ------------------------------


def optimizer_tensors(state: TrainState) -> dict[str, mx.array]:
    """AdamW moments as fp32 arrays under optimizer_key(name, moment) (zeros before step 1)."""
    return {optimizer_key(name, moment): value.astype(mx.float32)
            for moment, values in state.optimizer.state.items() for name, value in values.items()}  # fmt: skip


def load_optimizer_tensors(state: TrainState, tensors: dict[str, mx.array], where: str) -> None:
    """Put saved moments into the AdamW of `state` (whose step counter is already set)."""
    current = state.optimizer.state
    expected = {optimizer_key(n, m) for m in ADAM_MOMENTS for n in current[m]}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise CheckpointError(f"{where}: optimizer moments do not match the model: "
                              f"missing {missing[:3]}, unexpected {extra[:3]}")  # fmt: skip
    for moment in ADAM_MOMENTS:
        for name, old in current[moment].items():
            value = tensors[optimizer_key(name, moment)]
            if tuple(value.shape) != tuple(old.shape):
                raise CheckpointError(f"{where}: {name} moments have shape {tuple(value.shape)}")
            current[moment][name] = value.astype(mx.float32)
    mx.eval(current)
