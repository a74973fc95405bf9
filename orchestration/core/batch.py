"""What a backend trains on: numpy arrays, so the data loader never depends on a framework."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Batch:
    """One micro-batch of B sequences of T tokens.

    inputs:     int32 [B, T]   token ids fed to the model
    targets:    int32 [B, T]   the next token of each position
    loss_mask:  float32 [B, T] 1 where the target counts (SFT: assistant tokens only); None = all
    segment_ids: int32 [B, T]  document index of each position in a packed row; attention never
                               crosses documents; None = one document per row
    """

    inputs: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray | None = None
    segment_ids: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.inputs.ndim != 2 or self.inputs.shape != self.targets.shape:
            raise ValueError(f"inputs and targets must both be [B, T], got {self.inputs.shape} and {self.targets.shape}")
        for name in ("loss_mask", "segment_ids"):
            value = getattr(self, name)
            if value is not None and value.shape != self.inputs.shape:
                raise ValueError(f"{name} must be [B, T] like inputs, got {value.shape}")

    @classmethod
    def from_tokens(cls, tokens: np.ndarray, loss_mask: np.ndarray | None = None,
                    segment_ids: np.ndarray | None = None) -> Batch:
        """From rows of T+1 tokens: inputs are the first T, targets the last T (masks are of targets)."""
        tokens = np.asarray(tokens)
        return cls(
            inputs=tokens[:, :-1].astype(np.int32),
            targets=tokens[:, 1:].astype(np.int32),
            loss_mask=None if loss_mask is None else np.asarray(loss_mask, np.float32)[:, 1:],
            segment_ids=None if segment_ids is None else np.asarray(segment_ids, np.int32)[:, :-1],
        )

    @property
    def n_tokens(self) -> int:
        """Target tokens that count toward the loss."""
        return int(self.inputs.size if self.loss_mask is None else self.loss_mask.sum())
