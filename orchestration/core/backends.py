"""The backend protocol, and the registry that imports a backend only when it is asked for.

A backend is a module-level object with functions over plain values: numpy arrays in and out, a
model object it alone understands, and checkpoints in the shared format (orchestration/core/checkpoint.py).

    from orchestration.core.backends import get_backend
    b = get_backend("torch")            # or "mlx"
    model = b.load("runs/x/ckpt")       # a checkpoint directory
    logits = b.logits(model, tokens)    # tokens: int numpy [B, T] -> float32 numpy [B, T, vocab]
"""

from __future__ import annotations

import importlib
import importlib.util
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from orchestration.core.batch import Batch
from hanyeong.errors import ConfigError
from orchestration.core.optim import OptimConfig
from orchestration.core.spec import ModelSpec

# name -> module that defines `BACKEND`; imported lazily so one backend never needs the other's framework
BACKENDS = {"torch": "cuda_model.backend", "mlx": "mlx_model.backend"}


class Backend(Protocol):
    name: str

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

    def eval_loss(self, model: Any, batch: Batch, loss: str = "causal_lm") -> float:
        """Mean loss per counted target token, no gradient."""

    def generate(self, model: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 stop_ids: Sequence[int] = ()) -> list[list[int]]:
        """New tokens for each prompt (KV cache): greedy at temperature 0, else nucleus sampling."""

    def init_train_state(self, model: Any, optim: OptimConfig, seed: int = 0,
                         parallel: str | None = None) -> Any:
        """Optimizer and counters around `model`, at step 0. `parallel` ('ddp', or 'fsdp' on torch):
        one rank of the data-parallel group the process belongs to (see `world`)."""

    def load_train_state(self, path: str | Path, parallel: str | None = None) -> Any:
        """Model, optimizer and counters of a training checkpoint, ready to continue (every rank
        of a group loads the same checkpoint)."""

    def world(self) -> tuple[int, int]:
        """(rank, size) of the data-parallel group this process is in; (0, 1) alone."""

    def train_step(self, state: Any, batch: Batch, loss: str = "causal_lm") -> dict[str, float]:
        """One optimizer step on a global batch (split into optim.grad_accum_steps micro-batches).

        On a parallel state `batch` is this rank's rows of the global batch
        (orchestration/parallel.rank_rows); gradients are summed over the ranks so the update is
        that of the whole batch, and the metrics are the global batch's.
        Returns at least loss, grad_norm, lr and tokens.
        """


def get_backend(name: str) -> Backend:
    """The backend called `name` ('torch', 'mlx', or 'auto'); importing it is deferred to here."""
    if name == "auto":
        name = default_backend()
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; known: auto, {', '.join(BACKENDS)}")
    try:
        module = importlib.import_module(BACKENDS[name])
    except ImportError as err:
        hint = "pip install 'mlx[cpu]' on Linux, 'mlx' on macOS" if name == "mlx" else "pip install torch"
        raise ConfigError(f"backend {name!r} needs {err.name or err}: {hint}") from None
    return module.BACKEND


def default_backend() -> str:
    """MLX on Apple silicon, else PyTorch (CUDA when there is a GPU, the CPU otherwise)."""
    if platform.system() == "Darwin" and platform.machine() == "arm64" and importlib.util.find_spec("mlx"):
        return "mlx"
    return "torch"
