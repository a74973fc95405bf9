"""`check_model(backend, spec)`: the laws every backend's model must keep (STYLE rule 15).

Only the Backend protocol is used, so the MLX backend's tests can call the same function.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from orchestration.core.batch import Batch
from orchestration.core.checkpoint import parameter_names
from orchestration.core.optim import OptimConfig
from orchestration.core.spec import ModelSpec


def random_tokens(spec: ModelSpec, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, spec.vocab_size, shape, dtype=np.int64)


def check_model(backend, spec: ModelSpec, tmp_path: Path, atol: float = 1e-5) -> None:
    model = backend.init(spec, seed=0)
    tokens = random_tokens(spec, (2, 12))

    # logits: [B, T, vocab] float32
    logits = backend.logits(model, tokens)
    assert logits.shape == (2, 12, spec.vocab_size) and logits.dtype == np.float32
    assert np.isfinite(logits).all()

    # a batch of 2 is two batches of 1
    one_by_one = np.concatenate([backend.logits(model, tokens[i : i + 1]) for i in range(2)])
    np.testing.assert_allclose(logits, one_by_one, atol=atol, rtol=0)

    # save -> load gives the same logits, and the file holds the Hugging Face names
    backend.save(model, tmp_path / "ckpt")
    loaded = backend.load(tmp_path / "ckpt")
    np.testing.assert_array_equal(backend.logits(loaded, tokens), logits)
    from safetensors.numpy import load_file

    stored = load_file(tmp_path / "ckpt" / "model.safetensors")
    assert {k: v.shape for k, v in stored.items()} == parameter_names(spec)
    assert all(v.dtype == np.float32 for v in stored.values())

    # one step lowers the loss on a repeated batch
    batch = Batch.from_tokens(random_tokens(spec, (2, 13), seed=1))
    state = backend.init_train_state(model, OptimConfig(lr=1e-2, warmup_steps=0, total_steps=10))
    before = backend.eval_loss(model, batch)
    metrics = backend.train_step(state, batch)
    assert {"loss", "grad_norm", "lr", "tokens"} <= set(metrics)
    assert abs(metrics["loss"] - before) < 1e-4  # the step's loss is of the weights before it
    assert backend.eval_loss(model, batch) < before
