"""The MLX model: the shared laws, checkpoint names, fast kernels against naive code, KV cache,
document mask, accumulation, init."""

# ruff: noqa: E402  (the imports below follow the importorskip that guards them)

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")  # skip the module, before any mlx import, where mlx is missing

from mlx.utils import tree_flatten

from mlx_model.model import RoPE
from orchestration.core.batch import Batch
from orchestration.core.checkpoint import parameter_names
from orchestration.core.optim import OptimConfig
from orchestration.core.spec import RopeScaling
from mlx_model.losses import LOSS_READS, LOSSES, register_loss, token_logprobs
from tests.check_model import (WEIGHTED, biased_toward_specials, check_extras_reach_the_loss,
                               check_generation_never_samples_specials, check_model, extras_batch,
                               random_tokens)  # fmt: skip
from tests.mlx_model.conftest import tiny


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("n_kv_heads", [2, 4])
def test_check_model(backend, tmp_path, tied, n_kv_heads):
    check_model(backend, tiny(tie_embeddings=tied, n_kv_heads=n_kv_heads), tmp_path)


@pytest.mark.parametrize("tied", [True, False])
def test_parameters_are_the_checkpoint_layout(backend, tied):
    spec = tiny(tie_embeddings=tied)
    params = [(k, tuple(v.shape)) for k, v in tree_flatten(backend.init(spec).parameters())]
    assert params == list(parameter_names(spec).items())  # same names, same order, no RoPE tables
    assert sum(np.prod(s) for _, s in params) == spec.parameter_count()


def test_init_is_seeded(backend):
    spec = tiny()
    a, b, c = (dict(tree_flatten(backend.init(spec, seed=s).parameters())) for s in (3, 3, 4))
    for name, x in a.items():
        assert mx.array_equal(x, b[name]), name
        if name.endswith("norm.weight"):
            assert mx.array_equal(x, mx.ones_like(x))
        else:
            assert not mx.array_equal(x, c[name]), name
    o_proj = np.array(a["model.layers.0.self_attn.o_proj.weight"])
    assert o_proj.std() == pytest.approx(0.02 / np.sqrt(2 * spec.n_layers), rel=0.1)


def naive_rope(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """The Hugging Face rotate-half formula in float64: x (B, H, T, hd), positions (B, T)."""
    angles = positions[:, None, :, None] * inv_freq  # (B, 1, T, hd/2)
    emb = np.concatenate([angles, angles], axis=-1)
    x1, x2 = np.split(x, 2, axis=-1)
    return x * np.cos(emb) + np.concatenate([-x2, x1], axis=-1) * np.sin(emb)


@pytest.mark.parametrize(
    "scaling", [None, RopeScaling(original_max_position_embeddings=16)], ids=["plain", "llama3"]
)
def test_rope_kernel_and_positions_path_equal_the_formula(scaling):
    spec = tiny(rope_scaling=scaling, rope_theta=500_000.0)
    rope, inv_freq = RoPE(spec), spec.rope_inv_freq()
    x = np.random.default_rng(0).standard_normal((2, 3, 9, spec.head_dim)).astype(np.float32)
    offsets = np.array([0, 7])
    positions = offsets[:, None] + np.arange(9)  # (B, T)
    expected = naive_rope(x.astype(np.float64), positions, inv_freq)
    fast = rope(mx.array(x), mx.array(offsets, mx.int32))  # mx.fast.rope with per-row offsets
    by_hand = rope(mx.array(x), mx.array(positions, mx.int32))  # the (B, T) positions path
    np.testing.assert_allclose(np.array(fast), expected, atol=2e-6)
    np.testing.assert_allclose(np.array(by_hand), expected, atol=2e-6)


def naive_greedy(backend, model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding recomputing the full logits each step: what the KV cache must reproduce."""
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(int(backend.logits(model, np.array([tokens]))[0, -1].argmax()))
    return tokens[len(prompt) :]


@pytest.mark.parametrize("tied", [True, False])
def test_kv_cache_generation_equals_recomputing(backend, tied):
    from tests.mlx_model.conftest import perturbed

    model = perturbed(backend.init(tiny(tie_embeddings=tied), seed=1))  # attention decides the tokens
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3], [40, 41, 42]]  # ragged: left padding must be invisible
    got = backend.generate(model, prompts, max_new_tokens=6)
    assert got == [naive_greedy(backend, model, p, 6) for p in prompts]
    assert got == [backend.generate(model, [p], max_new_tokens=6)[0] for p in prompts]


def test_kv_cache_logits_equal_full_forward(backend):
    spec = tiny()
    model = backend.init(spec, seed=2)
    tokens = mx.array(random_tokens(spec, (2, 10)), mx.int32)
    full = model(tokens)
    cache = model.new_cache(10)
    parts = [
        model(tokens[:, :4], None, cache),
        model(tokens[:, 4:5], None, cache),
        model(tokens[:, 5:], None, cache),
    ]
    np.testing.assert_allclose(
        np.array(mx.concatenate(parts, axis=1)), np.array(full), atol=1e-5, rtol=0
    )


def test_generation_stops_and_samples_reproducibly(backend):
    model = backend.init(tiny(), seed=1)
    greedy = backend.generate(model, [[1, 2, 3]], max_new_tokens=8)[0]
    stopped = backend.generate(model, [[1, 2, 3]], max_new_tokens=8, stop_ids=[greedy[2]])[0]
    assert stopped == greedy[: greedy.index(greedy[2]) + 1]  # the stop id ends the row, included
    kwargs = dict(max_new_tokens=8, temperature=1.0, top_p=0.9)
    assert backend.generate(model, [[1, 2, 3]], seed=7, **kwargs) == backend.generate(
        model, [[1, 2, 3]], seed=7, **kwargs
    )
    nucleus = backend.generate(
        model, [[1, 2, 3]], seed=7, max_new_tokens=8, temperature=1.0, top_p=1e-6
    )
    assert nucleus == [greedy]  # a vanishing nucleus keeps only the most likely token


def test_generation_never_samples_special_ids(backend):
    spec = tiny(tie_embeddings=False).replace(vocab_size=600)  # the special block + 256 bytes fit
    plain, biased = backend.init(spec, seed=1), backend.init(spec, seed=1)
    biased.load_weights([(k, mx.array(v)) for k, v in biased_toward_specials(spec).items()],
                        strict=False)  # fmt: skip
    check_generation_never_samples_specials(backend, plain, biased, rows=4, seeds=4)


def test_document_mask_keeps_packed_documents_apart(backend):
    spec = tiny()
    model = backend.init(spec, seed=3)
    lengths = [5, 1, 8, 3]
    docs = [random_tokens(spec, (1, n), seed=i) for i, n in enumerate(lengths)]
    packed = np.concatenate(docs, axis=1)
    segments = np.concatenate([np.full((1, n), i) for i, n in enumerate(lengths)], axis=1)
    together = backend.logits(model, packed, segment_ids=segments)[0]
    alone = np.concatenate([backend.logits(model, d)[0] for d in docs])
    np.testing.assert_allclose(together, alone, atol=1e-5, rtol=0)
    # without the mask the later documents see the earlier ones
    assert not np.allclose(backend.logits(model, packed)[0], alone, atol=1e-3)


def test_too_long_sequence_is_refused(backend):
    spec = tiny(max_seq_len=16)
    with pytest.raises(ValueError, match="max_seq_len"):
        backend.logits(backend.init(spec), random_tokens(spec, (1, 17)))


def weights(model) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


@pytest.mark.parametrize("compile", [True, False], ids=["compiled", "eager"])
def test_accumulating_two_micro_batches_equals_one_batch(backend, compile):
    spec = tiny()
    rng = np.random.default_rng(0)
    mask = (rng.random((5, 17)) < 0.7).astype(
        np.float32
    )  # uneven counts per row: normalise by the global count
    segments = np.repeat([[0] * 9 + [1] * 8], 5, axis=0)
    batch = Batch.from_tokens(
        random_tokens(spec, (5, 17), seed=4), loss_mask=mask, segment_ids=segments
    )
    results = []
    for accum in (1, 2):  # 5 rows: micro-batches of 3 and 2
        model = backend.init(spec, seed=0)
        state = backend.init_train_state(
            model, OptimConfig(lr=1e-2, total_steps=4, grad_accum_steps=accum), compile=compile
        )
        metrics = [backend.train_step(state, batch, loss="sft") for _ in range(2)]
        results.append((metrics, weights(model)))
    (m1, w1), (m2, w2) = results
    for a, b in zip(m1, m2):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["counted_tokens"] == b["counted_tokens"] == mask[:, 1:].sum()
    for name in w1:
        np.testing.assert_allclose(w1[name], w2[name], atol=1e-5, err_msg=name)


def test_sft_counts_only_masked_targets(backend):
    spec = tiny()
    model = backend.init(spec, seed=0)
    tokens = random_tokens(spec, (2, 9))
    mask = np.zeros((2, 9), np.float32)
    mask[:, 5:] = 1
    full = backend.logprobs(model, Batch.from_tokens(tokens))  # (B, T) log p(target)
    sft = backend.eval_loss(model, Batch.from_tokens(tokens, loss_mask=mask), loss="sft")
    assert sft == pytest.approx(-full[:, 4:].mean(), rel=1e-5)
    from hanyeong.errors import ConfigError, DataError

    with pytest.raises(DataError, match="loss_mask"):
        backend.eval_loss(model, Batch.from_tokens(tokens), loss="sft")
    with pytest.raises(ConfigError, match="known: causal_lm, sft"):
        backend.eval_loss(model, Batch.from_tokens(tokens), loss="nope")


def test_training_checkpoint_resumes_exactly(backend, tmp_path):
    spec = tiny(tie_embeddings=False)
    batches = [Batch.from_tokens(random_tokens(spec, (2, 17), seed=i)) for i in range(4)]
    optim = OptimConfig(lr=1e-2, warmup_steps=1, total_steps=4)
    state = backend.init_train_state(backend.init(spec), optim)
    straight = [backend.train_step(state, b)["loss"] for b in batches]
    state = backend.init_train_state(backend.init(spec), optim)
    resumed = [backend.train_step(state, b)["loss"] for b in batches[:2]]
    state.data_cursor = {"shard": 3, "row": 17}
    backend.save(state.model, tmp_path / "ckpt", state)
    state = backend.load_train_state(tmp_path / "ckpt")
    assert (state.step, state.tokens_seen, state.data_cursor) == (
        2,
        2 * 2 * 16,
        {"shard": 3, "row": 17},
    )
    resumed += [backend.train_step(state, b)["loss"] for b in batches[2:]]
    np.testing.assert_allclose(resumed, straight, rtol=1e-6)


def test_load_refuses_weights_that_do_not_fit_the_spec(backend, tmp_path):
    from mlx_model.backend import METADATA
    from orchestration.core.checkpoint import writing
    from hanyeong.errors import CheckpointError

    model = backend.init(tiny())
    with writing(tmp_path / "ckpt", tiny(d_ff=128)) as tmp:  # a spec.json that says otherwise
        weights = dict(tree_flatten(model.parameters()))
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata=METADATA)
    with pytest.raises(
        CheckpointError,
        match=r"mlp.down_proj.weight has shape \(64, 192\), the spec says \(64, 128\)",
    ):
        backend.load(tmp_path / "ckpt")


def test_get_backend_finds_this_one():
    from mlx_model.backend import BACKEND
    from orchestration.core.backends import get_backend

    assert get_backend("mlx") is BACKEND and BACKEND.name == "mlx"


READS = ("inputs", "targets", "row_weight")


def row_weighted(model, batch):
    """Cross-entropy of each row times its weight: a loss on an array the core does not know."""
    nll = -token_logprobs(model(batch["inputs"], batch.get("segment_ids")), batch["targets"])
    return (nll * batch["row_weight"][:, None]).sum(), mx.array(float(nll.size))


@pytest.fixture
def weighted_loss():
    """row_weighted, recording what it is given, added through the public extension point alone."""
    seen = []

    def recording(model, batch):
        seen.append({k: np.array(v) for k, v in batch.items()})  # eager only: arrays, not tracers
        return row_weighted(model, batch)

    register_loss(WEIGHTED, recording, reads=READS)
    yield seen
    del LOSSES[WEIGHTED], LOSS_READS[WEIGHTED]


def test_extra_arrays_reach_a_registered_loss_through_accumulation(backend, weighted_loss):
    check_extras_reach_the_loss(backend, tiny(), weighted_loss, np.int32, compile=False)


def test_the_compiled_step_takes_extra_arrays_too(backend):
    register_loss("test_row_weighted_plain", row_weighted, reads=READS)
    try:
        batch, optim = extras_batch(tiny()), OptimConfig(lr=1e-2, total_steps=4, grad_accum_steps=2)
        runs = []
        for compile in (True, False):
            state = backend.init_train_state(backend.init(tiny(), seed=0), optim, compile=compile)
            runs.append([backend.train_step(state, batch, loss="test_row_weighted_plain")["loss"]
                         for _ in range(2)])  # fmt: skip
        np.testing.assert_allclose(runs[0], runs[1], rtol=1e-5)
    finally:
        del LOSSES["test_row_weighted_plain"], LOSS_READS["test_row_weighted_plain"]


def test_clipping_applies_the_update_of_the_gradient_scaled_to_the_clip_norm(backend):
    """One step with grad_clip = c moves the weights as our AdamW (itself checked against torch's in
    test_parity.py) does on the gradient of a plain cross-entropy scaled to norm c, and not as on the
    unclipped one. Adam's first step is scale-free but for eps: eps is near the clipped entries."""
    import mlx.nn as nn

    from mlx_model.step import init_train_state

    spec, c = tiny(tie_embeddings=False), 1e-2
    optim = OptimConfig(lr=1e-2, schedule="constant", warmup_steps=0, eps=1e-5, weight_decay=0.1, grad_clip=c)
    batch = Batch.from_tokens(random_tokens(spec, (3, 17), seed=5))
    inputs, targets = mx.array(batch.inputs, mx.int32), mx.array(batch.targets, mx.int32)

    def mean_nll(model):
        return nn.losses.cross_entropy(model(inputs), targets, reduction="mean")

    reference = init_train_state(backend.init(spec, seed=7), optim, compile=False)
    _, grads = nn.value_and_grad(reference.model, mean_nll)(reference.model)
    grads = dict(tree_flatten(grads))
    norm = float(np.sqrt(sum((np.array(g, np.float64) ** 2).sum() for g in grads.values())))
    assert norm > 20 * c  # the clip really bites
    scaled = {k: g * (c / (norm + 1e-6)) for k, g in grads.items()}  # torch's clip coefficient
    reference.optimizer.update(reference.model, scaled, reference.optimizer.hyper(0))
    expected = weights(reference.model)

    before = weights(backend.init(spec, seed=7))
    updates = {}
    for clip in (c, 0.0):
        model = backend.init(spec, seed=7)
        state = backend.init_train_state(model, OptimConfig(**{**optim.to_dict(), "grad_clip": clip}))
        assert backend.train_step(state, batch)["grad_norm"] == pytest.approx(norm, rel=1e-5)
        updates[clip] = weights(model)
    for name, value in expected.items():
        # as in tests/cuda_model/test_step.py: differently rounded g, steepest where |g| ~ eps
        atol = 1e-7 + 2 * np.spacing(np.abs(before[name]).max())
        np.testing.assert_allclose(updates[c][name] - before[name], value - before[name], atol=atol, rtol=1e-4,
                                   err_msg=name)  # fmt: skip
        assert np.abs(updates[0.0][name] - value).max() > 1e-3, name  # unclipped: another update


def test_activation_checkpointing_gives_the_same_loss_and_gradients(backend):
    """mx.checkpoint per block: the loss and every parameter's gradient as without it (fp32,
    packed documents), and the same metrics and weights through the compiled, accumulating step."""
    import mlx.nn as nn

    from mlx_model.losses import get_loss
    from mlx_model.step import arrays

    spec = tiny(tie_embeddings=False)
    segments = np.repeat([[0] * 9 + [1] * 8], 3, axis=0)
    batch = Batch.from_tokens(random_tokens(spec, (3, 17), seed=5), segment_ids=segments)
    grads, losses = [], []
    for recompute in (False, True):
        model = backend.init(spec, seed=0)
        model.model.activation_checkpointing = recompute
        (loss, _), g = nn.value_and_grad(model, get_loss("causal_lm"))(model, arrays(batch))
        losses.append(loss.item())
        grads.append(dict(tree_flatten(g)))
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    assert grads[1].keys() == grads[0].keys() == dict(parameter_names(spec)).keys()
    for name, g in grads[0].items():
        np.testing.assert_allclose(np.array(grads[1][name]), np.array(g), 0, 1e-6, err_msg=name)
    runs = []
    for recompute in (False, True):
        model = backend.init(spec, seed=0)
        state = backend.init_train_state(model, OptimConfig(lr=1e-2, total_steps=4, grad_accum_steps=2),
                                         activation_checkpointing=recompute)  # fmt: skip
        assert state.activation_checkpointing is recompute
        runs.append(([backend.train_step(state, batch)["loss"] for _ in range(2)], weights(model)))
    assert runs[1][0] == pytest.approx(runs[0][0], rel=1e-6)
    for name, w in runs[0][1].items():
        np.testing.assert_allclose(runs[1][1][name], w, rtol=0, atol=1e-6, err_msg=name)
