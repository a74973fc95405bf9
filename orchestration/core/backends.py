"""The backend protocol, what each backend declares it supports, and the registry that imports a
backend only when it is asked for.

A backend is an object with functions over plain values: numpy arrays in and out, a model object it
alone understands, and checkpoints in the shared format (orchestration/core/checkpoint.py).

    from orchestration.core.backends import get_backend
    b = get_backend("torch")            # or "mlx"
    model = b.load("runs/x/ckpt")       # a checkpoint directory
    logits = b.logits(model, tokens)    # tokens: int numpy [B, T] -> float32 numpy [B, T, vocab]

Orchestration never imports a backend package by hand: `capabilities(name)` reads the package's
`CAPABILITIES` (its __init__ imports no framework), `get_backend(name, device)` imports its backend
module. A worker group is started by the launcher the capabilities name and joined through the
backend (`bind_device`, `open_rendezvous`, `join_group`, `leave_group`), so the process group,
the ring and the device stay the backend's business.
"""

from __future__ import annotations

import importlib
import importlib.util
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from hanyeong.errors import ConfigError, DataError
from orchestration.core.batch import Batch
from orchestration.core.optim import OptimConfig
from orchestration.core.parallel import GROUP_PARALLELISMS
from orchestration.core.spec import ModelSpec

# name -> package: CAPABILITIES in its __init__ (no framework), the backend object in its `backend`
# module, imported lazily so one backend never needs the other's framework
BACKENDS = {"torch": "cuda_model", "mlx": "mlx_model"}
LAUNCHERS = ("ray_train", "ring")  # orchestration/cluster/train_group.py, ring_group.py


@dataclass(frozen=True)
class Capabilities:
    """What a backend supports, declared without importing its framework (the package __init__)."""

    parallelisms: tuple[str, ...]
    """Data parallelisms it trains a group with: 'ddp' (replicated weights), 'fsdp' (sharded)."""
    shard_from_params: int | None
    """parallelism = 'auto' picks 'fsdp' from this many parameters on; None: never."""
    launcher: str
    """How its worker group is started: 'ray_train' (Ray Train workers) or 'ring' (a placement
    group of actors, every rank opening an endpoint of the ring)."""
    device_resource: str | None
    """The Ray resource naming a worker's device: 'GPU', or a custom one ('apple_silicon')."""
    device_required: bool
    """Every worker needs a device_resource (MLX: a Mac per rank); else when asked or present."""
    takes_gpus: bool
    """[stage.resources] gpus may be set (the number of device_resource per worker)."""

    def __post_init__(self) -> None:
        if not self.parallelisms or not set(self.parallelisms) <= set(GROUP_PARALLELISMS):
            raise ConfigError(f"parallelisms must be some of {', '.join(GROUP_PARALLELISMS)}, "
                              f"got {self.parallelisms!r}")  # fmt: skip
        if self.launcher not in LAUNCHERS:
            raise ConfigError(f"launcher must be one of {', '.join(LAUNCHERS)}, got {self.launcher!r}")
        if (self.device_required or self.takes_gpus) and not self.device_resource:
            raise ConfigError("device_resource must name the Ray resource of the device it requires "
                              "or takes")  # fmt: skip


class Backend(Protocol):
    name: str
    capabilities: Capabilities

    def init(self, spec: ModelSpec, seed: int = 0) -> Any:
        """A model with freshly initialised weights, the same for the same seed."""

    def load(self, path: str | Path) -> Any:
        """The model of a checkpoint directory (weights only; see load_train_state)."""

    def save(self, model: Any, path: str | Path, state: Any | None = None) -> None:
        """Write a checkpoint atomically: weights, plus optimizer and trainer state when given.
        On a parallel state every rank calls it; rank 0 writes, and all return once it is written."""

    def logits(self, model: Any, tokens: np.ndarray) -> np.ndarray:
        """int [B, T] -> float32 [B, T, vocab]."""

    def logprobs(self, model: Any, batch: Batch) -> np.ndarray:
        """float32 [B, T]: log-probability of each target token."""

    def logprobs_at(self, model: Any, tokens: np.ndarray, rows: np.ndarray, positions: np.ndarray,
                    ids: np.ndarray) -> np.ndarray:  # fmt: skip
        """float32 [N]: log p(ids[i] | tokens[rows[i], : positions[i] + 1]), the log-softmax of the
        logits at (rows[i], positions[i]) read at ids[i]. tokens int [B, T] (right padding: a
        position never sees what follows it); rows, positions, ids int [N]. The output layer runs
        only at the distinct (row, position) pairs asked for, never [B, T, vocab]: several ids at
        one position (the answers A-D after a shared prompt) cost one projection."""

    def eval_loss(self, model: Any, batch: Batch, loss: str = "causal_lm") -> float:
        """Mean loss per counted target token, no gradient."""

    def rewards(self, model: Any, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """float32 [B]: a reward model's (spec.head 'score') score of each sequence, read at its last
        token tokens[b, lengths[b] - 1]. tokens int [B, T], right padded (a position never sees
        what follows it, so the padding's ids do not matter); lengths int [B] in 1..T. What
        transformers' LlamaForSequenceClassification gives for the same rows padded with
        pad_token_id. A language model is a ConfigError."""

    def generate(self, model: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 stop_ids: Sequence[int] = (), allow_ids: Sequence[int] = (),
                 suppress_ids: Sequence[int] | None = None, row_seeds: Sequence[int] | None = None,
                 top_k: int = 0) -> list[list[int]]:
        """New tokens for each prompt (KV cache): greedy at temperature 0, else sampling (top_k, then
        top_p). Never samples a special id but the stop and allowed ones (core/generation.py). With
        `row_seeds` (generation.sample_key per row) a row's tokens depend on its key and its prompt
        only, not on the batch; else one stream from `seed`."""

    def init_train_state(self, model: Any, optim: OptimConfig, seed: int = 0,
                         parallel: str | None = None, activation_checkpointing: bool = False) -> Any:
        """Optimizer and counters around `model`, at step 0. `parallel` ('ddp', or 'fsdp' on torch):
        one rank of the data-parallel group the process belongs to (see `world`).
        `activation_checkpointing`: train_step recomputes each transformer block's activations in
        the backward pass (torch.utils.checkpoint / mx.checkpoint) instead of keeping them, with the
        same losses and gradients; evaluation and generation never recompute. run_stage passes
        the keys only when set (parallel with workers > 1, activation_checkpointing when true)."""

    def load_train_state(self, path: str | Path, parallel: str | None = None,
                         activation_checkpointing: bool = False) -> Any:
        """Model, optimizer and counters of a training checkpoint, ready to continue (every rank
        of a group loads the same checkpoint); activation_checkpointing as in init_train_state (a
        training setting that no checkpoint records: a run may resume with it switched)."""

    def carry_optimizer(self, state: Any, path: str | Path) -> None:
        """Put the AdamW moments of training checkpoint `path` (same parameters) into `state` at
        step 0, with their step count, which the bias corrections go on from and the LR schedule
        does not (a stage's carry_optimizer)."""

    def world(self) -> tuple[int, int]:
        """(rank, size) of the data-parallel group this process is in; (0, 1) alone."""

    # ---- a worker group: the launcher calls these in each worker process, in this order ----------

    def bind_device(self, accelerator: bool, cpus: float) -> str | None:
        """Bind this process to the device the launcher gave it: its accelerator (`accelerator`:
        the worker holds its device_resource), else the CPU, with `cpus` threads. Returns the
        device to build the backend with: get_backend(name, device=...) (None: the default)."""

    def open_rendezvous(self, host: str) -> dict:
        """This rank's part of the rendezvous, opened on `host` (its node's address): torch's rank 0
        serves the process group's store there; every ring rank opens its endpoint. Plain values
        (the launcher ships them to the other ranks), valid until join_group."""

    def join_group(self, rank: int, size: int, rendezvous: dict) -> None:
        """Join the data-parallel group as `rank` of `size`; world() says so afterwards.
        `rendezvous` as the launcher assembles it: 'ray_train', rank 0's open_rendezvous;
        'ring', {"ranks": [every rank's open_rendezvous, in rank order]}."""

    def leave_group(self) -> None:
        """Leave the group joined (nothing where the framework cannot: the process ends with it)."""

    def train_step(self, state: Any, batch: Batch, loss: str = "causal_lm") -> dict[str, float]:
        """One optimizer step on a global batch (split into optim.grad_accum_steps micro-batches).

        On a parallel state `batch` is this rank's rows of the global batch
        (orchestration/core/parallel.rank_rows); gradients are summed over the ranks so the update is
        that of the whole batch, and the metrics are the global batch's.
        Returns at least loss, grad_norm, lr and tokens.
        """


_BUILT: dict[tuple[str, str], Backend] = {}  # (name, device) -> the backend built for it


def get_backend(name: str, device: str | None = None) -> Backend:
    """The backend called `name` ('torch', 'mlx', or 'auto'), on `device` ('cpu', 'cuda:1', ...;
    None: the backend's default device); importing it is deferred to here. One object per
    (name, device), built on the first call; nothing changes it afterwards."""
    name = known(name)
    try:
        module = importlib.import_module(f"{BACKENDS[name]}.backend")
    except ImportError as err:
        hint = "pip install 'mlx[cpu]' on Linux, 'mlx' on macOS" if name == "mlx" else "pip install torch"
        raise ConfigError(f"backend {name!r} needs {err.name or err}: {hint}") from None
    if device is None:
        return module.BACKEND  # on the default device, built with the module
    if (name, device) not in _BUILT:
        _BUILT[name, device] = type(module.BACKEND)(device=device)  # its class, on `device`
    return _BUILT[name, device]


def capabilities(name: str) -> Capabilities:
    """What backend `name` supports, without importing its framework."""
    return importlib.import_module(BACKENDS[known(name)]).CAPABILITIES


def known(name: str) -> str:
    """`name`, or the default backend for 'auto'; ConfigError listing the known ones."""
    if name == "auto":
        name = default_backend()
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; known: auto, {', '.join(BACKENDS)}")
    return name


def default_backend() -> str:
    """MLX on Apple silicon, else PyTorch (CUDA when there is a GPU, the CPU otherwise)."""
    if platform.system() == "Darwin" and platform.machine() == "arm64" and importlib.util.find_spec("mlx"):
        return "mlx"
    return "torch"


def check_lengths(tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """`lengths` as int64 [B] after checking it against tokens [B, T] (rewards' arguments): one per
    row, each in 1..T; a DataError says which is not."""
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    if tokens.ndim != 2 or lengths.shape != (tokens.shape[0],):
        raise DataError(f"rewards: tokens must be [B, T] and lengths [B], got {tokens.shape} and "
                        f"{lengths.shape}")  # fmt: skip
    bad = np.flatnonzero((lengths < 1) | (lengths > tokens.shape[1]))
    if len(bad):
        raise DataError(f"rewards: row {bad[0]} has length {lengths[bad[0]]}, outside "
                        f"1..{tokens.shape[1]}")  # fmt: skip
    return lengths.astype(np.int64)
