"""What a backend trains on: numpy arrays, so the data loader never depends on a framework.

A batch is open: beside the four token fields it carries any named arrays with a leading batch
axis (`extras`: a DPO pair's rejected tokens, reference log-probs, rewards, advantages, a teacher's
top-k, ...). Everything that moves a batch (rank_rows, the backends' conversions, gradient
accumulation) goes through `arrays()` / `from_arrays()` / `take()` and never reads a name; only a
loss reads the fields it declares (`register_loss(name, fn, reads)` in each backend's losses.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FIELDS = ("inputs", "targets", "loss_mask", "segment_ids")  # the named fields; extras are the rest


@dataclass
class Batch:
    """One micro-batch of B sequences of T tokens.

    inputs:     int32 [B, T]   token ids fed to the model
    targets:    int32 [B, T]   the next token of each position
    loss_mask:  float32 [B, T] 1 where the target counts (SFT: assistant tokens only); None = all
    segment_ids: int32 [B, T]  document index of each position in a packed row; attention never
                               crosses documents; None = one document per row
    extras:     name -> any array [B, ...]: what a further loss reads, passed through unread
    """

    inputs: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray | None = None
    segment_ids: np.ndarray | None = None
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.inputs.ndim != 2 or self.inputs.shape != self.targets.shape:
            raise ValueError(f"inputs and targets must both be [B, T], got {self.inputs.shape} and {self.targets.shape}")
        for name in ("loss_mask", "segment_ids"):
            value = getattr(self, name)
            if value is not None and value.shape != self.inputs.shape:
                raise ValueError(f"{name} must be [B, T] like inputs, got {value.shape}")
        self.extras = {name: np.asarray(value) for name, value in self.extras.items()}
        B = self.inputs.shape[0]
        for name, value in self.extras.items():
            if name in FIELDS:
                raise ValueError(f"extra array {name!r} would shadow the batch field of that name")
            if value.ndim == 0 or value.shape[0] != B:
                raise ValueError(f"extra array {name!r} must be [B={B}, ...], got {value.shape}")

    @property
    def rows(self) -> int:
        """B, the number of sequences."""
        return self.inputs.shape[0]

    def arrays(self) -> dict[str, np.ndarray]:
        """Every present array by name: the four fields (absent ones left out), then the extras."""
        named = {name: getattr(self, name) for name in FIELDS}
        return {**{k: v for k, v in named.items() if v is not None}, **self.extras}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Batch:
        """The inverse of arrays(): named fields by name, every other array an extra."""
        extras = {k: v for k, v in arrays.items() if k not in FIELDS}
        return cls(**{k: v for k, v in arrays.items() if k in FIELDS}, extras=extras)

    def __getitem__(self, name: str) -> np.ndarray:
        """A field or an extra by name; a KeyError names it and what the batch has."""
        arrays = self.arrays()
        if name not in arrays:
            raise KeyError(f"the batch has no array {name!r} (it has {', '.join(arrays)})")
        return arrays[name]

    def __contains__(self, name: object) -> bool:
        return name in self.arrays()

    def take(self, lo: int, hi: int) -> Batch:
        """Rows [lo, hi) of every array."""
        return Batch.from_arrays({k: v[lo:hi] for k, v in self.arrays().items()})

    def split(self, n: int) -> list[Batch]:
        """n parts along B, sizes as torch.tensor_split gives (the first B % n one row larger)."""
        if n < 1:
            raise ValueError(f"cannot split a batch into {n} parts")
        B = self.rows
        bounds = np.cumsum([0] + [B // n + (i < B % n) for i in range(n)])
        return [self.take(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]

    @classmethod
    def from_tokens(cls, tokens: np.ndarray, loss_mask: np.ndarray | None = None,
                    segment_ids: np.ndarray | None = None, **extras: np.ndarray) -> Batch:  # fmt: skip
        """From rows of T+1 tokens: inputs are the first T, targets the last T (masks are of
        targets). Extras are kept as they are (one per token is given as [B, T], aligned)."""
        tokens = np.asarray(tokens)
        return cls(
            inputs=tokens[:, :-1].astype(np.int32),
            targets=tokens[:, 1:].astype(np.int32),
            loss_mask=None if loss_mask is None else np.asarray(loss_mask, np.float32)[:, 1:],
            segment_ids=None if segment_ids is None else np.asarray(segment_ids, np.int32)[:, :-1],
            extras=extras,
        )
