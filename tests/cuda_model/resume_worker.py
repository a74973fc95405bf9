"""Run in a fresh interpreter by test_step.py: load a training checkpoint, train M steps, save.

python -m tests.cuda_model.resume_worker CKPT_IN CKPT_OUT M
"""

from __future__ import annotations

import sys

import numpy as np

from orchestration.core.batch import Batch
from orchestration.core.spec import ModelSpec

B, T = 4, 12


def batch_at(spec: ModelSpec, step: int) -> Batch:
    """The global batch of optimizer step `step`: a pure function of the step, like a data cursor."""
    rng = np.random.default_rng(1000 + step)
    mask = (rng.random((B, T + 1)) < 0.8).astype(np.float32)
    return Batch.from_tokens(rng.integers(0, spec.vocab_size, (B, T + 1)), loss_mask=mask)


def train(backend, state, steps: int) -> None:
    for _ in range(steps):
        backend.train_step(state, batch_at(state.model.spec, state.step))


def main(ckpt_in: str, ckpt_out: str, steps: int) -> None:
    from cuda_model.backend import TorchBackend

    backend = TorchBackend("cpu")
    state = backend.load_train_state(ckpt_in)
    train(backend, state, steps)
    backend.save(state.model, ckpt_out, state)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
