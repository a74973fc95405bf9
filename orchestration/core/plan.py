"""What training a spec on a token budget costs: parameters, FLOPs, memory per device, wall clock.

FLOPs follow the EXAONE 3.5 report's convention, 6·N·D; the attention term at the sequence length
is shown beside it (and counted in the wall-clock estimate, as MFU is measured against it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hanyeong.errors import ConfigError
from orchestration.core.spec import ModelSpec

# Dense bf16 peak FLOP/s (no sparsity) and memory per device, from the vendors' data sheets.
GPUS: dict[str, tuple[float, float]] = {
    "h100": (989e12, 80e9),
    "h200": (989e12, 141e9),
    "b200": (2250e12, 180e9),
    "a100": (312e12, 80e9),
    "l40s": (362e12, 48e9),
}

_COUNT = re.compile(r"^\s*(\d+(?:\.\d+)?(?:e\d+)?)\s*([kmbt]?)\s*$", re.IGNORECASE)


def parse_count(text: str | float | int, what: str = "tokens") -> float:
    """'9T', '6.5T', '252M', '1e12', 4096 -> a number (decimal units; B = billion)."""
    if isinstance(text, (int, float)):
        return float(text)
    match = _COUNT.match(text)
    if not match:
        raise ConfigError(f"{what}: cannot read {text!r} as a count (e.g. 9T, 252M, 1e12)")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[match.group(2).lower()]
    return float(match.group(1)) * scale


@dataclass(frozen=True)
class PlanConfig:
    """The run being planned."""

    tokens: float
    """Training tokens."""
    seq_len: int | None = None
    """Sequence length (default: the spec's max_seq_len)."""
    gpus: int = 1
    """Devices; weights, grads and optimizer state are sharded over them (FSDP)."""
    gpu: str = "h100"
    """Device kind, for its peak FLOP/s and memory (see GPUS)."""
    mfu: float = 0.4
    """Model FLOPs utilisation assumed for the wall-clock estimate."""
    micro_batch: int = 1
    """Sequences per device per micro-batch (activation memory)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass, as the backends do with it on:
    activation memory of the blocks' inputs only, and a second forward of the blocks to pay for."""
    shards: int | None = None
    """Devices the weights, grads and optimizer state are sharded over (None: gpus; 1: replicated,
    as under DDP)."""

    def __post_init__(self) -> None:
        if self.gpu not in GPUS:
            raise ConfigError(f"unknown gpu {self.gpu!r}; known: {', '.join(GPUS)}")
        if not 0 < self.mfu <= 1:
            raise ConfigError(f"mfu must be in (0, 1], got {self.mfu}")
        if self.tokens <= 0 or self.gpus < 1 or self.micro_batch < 1 or (self.shards or 1) < 1:
            raise ConfigError("tokens must be positive, gpus, micro_batch and shards at least 1")


def plan(spec: ModelSpec, config: PlanConfig) -> dict:
    """Everything `hanyeong model plan` prints, as one JSON-ready dict."""
    seq_len = config.seq_len or spec.max_seq_len
    peak, device_memory = GPUS[config.gpu]
    flops = spec.training_flops(config.tokens)
    attention = spec.attention_flops_per_token(seq_len) * config.tokens
    memory = spec.memory_bytes(seq_len, config.micro_batch, config.shards or config.gpus,
                               activation_checkpointing=config.activation_checkpointing)  # fmt: skip
    recompute = 0.0  # not model FLOPs (MFU leaves it out), but the devices spend the time
    if config.activation_checkpointing:  # the blocks' forward again: 2 FLOPs/weight, 1/3 of attention
        recompute = 2.0 * spec.n_layers * spec.block_parameter_count() * config.tokens + attention / 3
    seconds = (flops + attention + recompute) / (config.gpus * peak * config.mfu)
    return {
        "spec": spec.to_dict(),
        "parameters": spec.parameter_count(),
        "parameters_without_embeddings": spec.parameter_count(embeddings=False),
        "tokens": config.tokens,
        "seq_len": seq_len,
        "training_flops": flops,
        "attention_flops": attention,
        "recompute_flops": recompute,
        "activation_checkpointing": config.activation_checkpointing,
        "micro_batch": config.micro_batch,
        "flops_per_token": spec.flops_per_token(seq_len),
        "memory_per_device_bytes": memory,
        "device": {"gpu": config.gpu, "count": config.gpus, "peak_flops": peak, "memory_bytes": device_memory},
        "fits": memory["total"] <= device_memory,
        "mfu": config.mfu,
        "wall_clock_seconds": seconds,
        "gpu_hours": seconds * config.gpus / 3600,
    }


def describe(result: dict) -> list[str]:
    """The plan as lines a person reads."""
    memory = result["memory_per_device_bytes"]
    device = result["device"]
    days = result["wall_clock_seconds"] / 86_400
    lines = [
        f"parameters      {result['parameters'] / 1e9:,.3f} B ({result['parameters_without_embeddings'] / 1e9:,.3f} B without embeddings)",
        f"tokens          {result['tokens']:.3g} at sequence {result['seq_len']:,}",
        f"training FLOPs  {result['training_flops']:.3g} (6·N·D)   + attention {result['attention_flops']:.3g}"
        + (f"   + recompute {result['recompute_flops']:.3g}" if result["activation_checkpointing"] else ""),
        f"memory/device   {_gib(memory['total'])}: weights {_gib(memory['weights'])}, grads "
        f"{_gib(memory['grads'])}, optimizer {_gib(memory['optimizer'])}, activations "
        f"{_gib(memory['activations'])}{' (checkpointed)' if result['activation_checkpointing'] else ''}  "
        f"({'fits' if result['fits'] else 'does NOT fit'} in "
        f"{device['memory_bytes'] / 1e9:.0f} GB {device['gpu']})",
        f"wall clock      {days:,.1f} days on {device['count']:,} × {device['gpu']} at {result['mfu']:.0%} MFU "
        f"({result['gpu_hours']:,.0f} GPU-hours)",
    ]
    if not result["fits"]:
        lines.append("hint            shard over more devices (--gpus), add --activation-checkpointing, lower "
                     "--micro-batch, or plan a shorter --seq-len")
    return lines


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.0f} MiB"
