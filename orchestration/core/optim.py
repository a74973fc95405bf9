"""Optimizer and learning-rate schedule settings, shared by both backends so a run can move between them.

The schedule is a plain function of the step, so the PyTorch and MLX backends (and a resumed run)
compute exactly the same learning rate. Its length, `total_steps`, is given by whoever runs it: a
recipe stage derives it from its token budget (`StageConfig.train_optim`), so its `[stage.optim]`
table leaves it out; a script sets it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from hanyeong.errors import ConfigError
from orchestration.core.config import build

SCHEDULES = ("cosine", "wsd", "constant")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with decoupled weight decay, a warmup, a decay shape, clipping and accumulation."""

    lr: float = 3e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """The schedule ends at lr * min_lr_ratio."""
    warmup_steps: int = 0
    """Linear warmup from 0 to lr over this many optimizer steps."""
    total_steps: int | None = None
    """Optimizer steps the schedule spans; after it the LR stays at its end value. None: not known
    yet (a recipe's [stage.optim]: the stage derives it); `lr_at` needs it."""
    schedule: str = "cosine"
    """'cosine' (warmup + cosine decay), 'wsd' (warmup-stable-decay: flat, then a linear decay over
    the last decay_fraction, so a later stage can anneal) or 'constant' (warmup, then flat)."""
    decay_fraction: float = 0.2
    """wsd only: the share of total_steps spent decaying."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW moment decays."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay (AdamW), on matrices only unless decay_norms_and_embeddings."""
    decay_norms_and_embeddings: bool = False
    """Also decay RMSNorm weights and the token embedding (most recipes do not)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 turns clipping off."""
    grad_accum_steps: int = 1
    """Micro-batches whose gradients are summed into one optimizer step."""

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.total_steps is not None and self.total_steps < 1:
            raise ConfigError(f"total_steps must be >= 1, got {self.total_steps}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.total_steps is not None and self.warmup_steps > self.total_steps:
            raise ConfigError(
                f"warmup_steps ({self.warmup_steps:,}) exceeds total_steps ({self.total_steps:,})"
            )
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError(f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas}")
        for name in ("weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.eps > 0:
            raise ConfigError(f"eps must be > 0, got {self.eps}")
        if self.grad_accum_steps < 1:
            raise ConfigError(f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "optim") -> OptimConfig:
        """From a table (a recipe's [stage.optim], trainer_state.json's "optim")."""
        return build(cls, data, where)


def lr_at(config: OptimConfig, step: int) -> float:
    """Learning rate for optimizer step `step` (0-based) of a schedule over config.total_steps."""
    peak, floor = config.lr, config.lr * config.min_lr_ratio
    # 1) linear warmup; step 0 gets lr/warmup so the first update is not zero
    if step < config.warmup_steps:
        return peak * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return peak
    if config.total_steps is None:
        raise ConfigError(
            f"optim.total_steps is not set: the {config.schedule} schedule needs its length"
        )
    step = min(step, config.total_steps)
    if config.schedule == "cosine":
        # 2) cosine from peak to floor over the rest
        span = max(1, config.total_steps - config.warmup_steps)
        progress = (step - config.warmup_steps) / span
        return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))
    # 3) warmup-stable-decay: flat at peak, then linear to floor over the last decay_fraction
    decay_steps = max(1, round(config.total_steps * config.decay_fraction))
    decay_start = config.total_steps - decay_steps
    if step < decay_start:
        return peak
    return peak + (floor - peak) * (step - decay_start) / decay_steps


def decays(name: str, config: OptimConfig) -> bool:
    """Whether weight decay applies to the parameter called `name` (a checkpoint name)."""
    if config.decay_norms_and_embeddings:
        return True
    return not (name.endswith("norm.weight") or name == "model.embed_tokens.weight")
