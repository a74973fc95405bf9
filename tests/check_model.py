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
from hanyeong.errors import DataError
from tokenizer.specials import NAMED_SPECIALS, SPECIAL_BLOCK


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


# ---- the open batch: extras reach a registered loss ---------------------------------------------

WEIGHTED = "test_row_weighted"  # a loss the backend tests register: reads a per-row weight extra


def extras_batch(spec: ModelSpec, rows: int = 5) -> Batch:
    """A batch with extras of three kinds: a per-row float weight, int pairs [B, 3, 2], flags."""
    rng = np.random.default_rng(3)
    return Batch.from_tokens(random_tokens(spec, (rows, 9), seed=3),
                             row_weight=rng.random(rows).astype(np.float64),
                             pairs=rng.integers(0, spec.vocab_size, (rows, 3, 2), dtype=np.int16),
                             flags=rng.random((rows, 4)) < 0.5)  # fmt: skip


def check_extras_reach_the_loss(backend, spec: ModelSpec, seen: list[dict[str, np.ndarray]],
                                id_dtype: type, compile: bool | None = None) -> None:  # fmt: skip
    """Train a step on `WEIGHTED` (registered by the caller; it appends each micro-batch it gets, as
    numpy, to `seen`) with grad_accum_steps=2: the extras arrive unchanged, split in rows; a batch
    without the array the loss reads is a DataError naming both before anything moves."""
    batch = extras_batch(spec)
    model = backend.init(spec, seed=0)
    state = backend.init_train_state(model, OptimConfig(grad_accum_steps=2, total_steps=4),
                                     compile=compile)
    backend.train_step(state, batch, loss=WEIGHTED)
    assert [micro["inputs"].shape[0] for micro in seen] == [3, 2]  # torch.tensor_split's sizes
    for name, value in batch.arrays().items():
        kind = value.dtype.kind
        expected = id_dtype if kind in "iu" else np.float32 if kind == "f" else np.bool_
        assert all(micro[name].dtype == expected for micro in seen), name
        np.testing.assert_array_equal(np.concatenate([m[name] for m in seen]),
                                      value.astype(expected), err_msg=name)  # fmt: skip
    seen.clear()
    without = Batch.from_tokens(random_tokens(spec, (5, 9)), pairs=batch["pairs"])
    for call in (lambda: backend.train_step(state, without, loss=WEIGHTED),
                 lambda: backend.eval_loss(model, without, loss=WEIGHTED)):  # fmt: skip
        try:
            call()
        except DataError as err:
            assert f"the {WEIGHTED} loss needs batch.row_weight" in str(err), err
        else:
            raise AssertionError("a batch without row_weight was not refused")
    assert not seen and state.step == 1  # refused before the loss ran


# ---- the step's counters, and a batch too small to split ----------------------------------------


def batch_counting(spec: ModelSpec, counted: int) -> Batch:
    """A 4 x 9 batch whose loss mask counts `counted` of its targets, picked at random."""
    tokens = random_tokens(spec, (4, 9), seed=5)
    targets = np.zeros(tokens.shape[0] * (tokens.shape[1] - 1), np.float32)
    targets[np.random.default_rng(counted).choice(targets.size, counted, replace=False)] = 1.0
    mask = np.zeros(tokens.shape, np.float32)  # over the tokens; the targets' is its [:, 1:]
    mask[:, 1:] = targets.reshape(tokens.shape[0], -1)
    return Batch.from_tokens(tokens, loss_mask=mask)


def check_step_counters(backend, spec: ModelSpec) -> None:
    """`step` counts updates and `tokens_seen` every input token, whatever each batch's shape."""
    state = backend.init_train_state(backend.init(spec, seed=0), OptimConfig(total_steps=4))
    for rows, width in ((2, 9), (3, 5)):
        backend.train_step(state, Batch.from_tokens(random_tokens(spec, (rows, width), seed=rows)))
    assert (state.step, state.tokens_seen) == (2, 2 * 8 + 3 * 4)


def check_too_few_rows_are_refused(backend, spec: ModelSpec) -> None:
    """A batch with fewer rows than micro-batches is one DataError, before anything moves."""
    state = backend.init_train_state(backend.init(spec, seed=0), OptimConfig(grad_accum_steps=3, total_steps=2))
    try:
        backend.train_step(state, Batch.from_tokens(random_tokens(spec, (2, 9), seed=0)))
    except DataError as err:
        assert "a batch of 2 rows cannot be split into grad_accum_steps=3 micro-batches" in str(err), err
    else:
        raise AssertionError("a batch of 2 rows was split into 3 micro-batches")
    assert (state.step, state.tokens_seen) == (0, 0)


# ---- generation never samples a special id it was not told -------------------------------------

EOS, UNK, THOUGHT, END_THOUGHT = (
    NAMED_SPECIALS.index(t) for t in ("[EOS]", "[UNK]", "<thought>", "</thought>")
)


def biased_toward_specials(spec: ModelSpec) -> dict[str, np.ndarray]:
    """Weights for an untied model whose logits favour the special block by ~e^20: the final norm
    keeps one hidden unit h0, the head gives even special ids +20·h0 and odd ones -20·h0, so
    whatever the sign of h0 some special id leads and every content id (logit 0) trails."""
    norm = np.zeros(spec.d_model, np.float32)
    norm[0] = 1.0
    head = np.zeros((spec.vocab_size, spec.d_model), np.float32)
    head[0:SPECIAL_BLOCK:2, 0], head[1:SPECIAL_BLOCK:2, 0] = 20.0, -20.0
    return {"model.norm.weight": norm, "lm_head.weight": head}


def check_generation_never_samples_specials(backend, plain, biased, rows: int, seeds: int) -> None:
    """No special id comes out of generate unless it is a stop or an allowed id: sampled over
    `seeds` seeds at temperature 1 (top_p 1 and 0.9) and greedy, from a random model (`plain`)
    and one that strongly prefers the special block (`biased`); unmasked, `biased` emits only
    specials."""
    prompts = [[SPECIAL_BLOCK + 256 + i] for i in range(rows)]
    raw = backend.generate(biased, prompts, 4, suppress_ids=())
    assert all(t < SPECIAL_BLOCK for row in raw for t in row), raw  # the bias works
    for model in (plain, biased):
        for seed in range(seeds):
            for top_p in (1.0, 0.9):
                out = backend.generate(model, prompts, 6, temperature=1.0, top_p=top_p, seed=seed)
                assert min(t for row in out for t in row) >= SPECIAL_BLOCK, (seed, top_p, out)
        greedy = backend.generate(model, prompts, 6)
        assert min(t for row in greedy for t in row) >= SPECIAL_BLOCK, greedy
    # a stop id of the block is sampled and ends its row; allowed ids (thought tags) are content
    stopped = backend.generate(biased, prompts, 6, stop_ids=[EOS, UNK])  # one even, one odd id
    assert all(row in ([EOS], [UNK]) for row in stopped), stopped
    thinking = backend.generate(biased, prompts, 3, allow_ids=[THOUGHT, END_THOUGHT])
    assert {t for row in thinking for t in row} <= {THOUGHT, END_THOUGHT}, thinking
