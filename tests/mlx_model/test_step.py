"""The MLX step's laws, as tests/cuda_model/test_step.py holds them for torch: means over the counted
targets, micro-batch splitting, clipping as torch's, the compile switch, counters, moments' names."""

# ruff: noqa: E402  (the imports below follow the importorskip that guards them)

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

mx = pytest.importorskip("mlx.core")

import mlx.nn as nn
from mlx.utils import tree_flatten

from hanyeong.errors import CheckpointError
from mlx_model.losses import LOSS_READS, LOSSES, register_loss, sft
from mlx_model.step import ENV_COMPILE, arrays, clip, env_flag, split
from orchestration.core.batch import Batch
from orchestration.core.optim import OptimConfig
from tests.check_model import batch_counting, check_step_counters, check_too_few_rows_are_refused, random_tokens
from tests.mlx_model.conftest import tiny

OPTIM = OptimConfig(lr=3e-3, warmup_steps=2, total_steps=8, weight_decay=0.1, grad_clip=0.5)


@pytest.mark.parametrize("value, compiled", [("1", True), ("on", True), ("0", False), ("off", False), ("False", False),
                                             (" No ", False), ("", True)])  # fmt: skip
def test_the_compile_switch_is_read_from_its_environment_variable(backend, monkeypatch, value, compiled):
    """HANYEONG_MLX_COMPILE (unset or empty: on) picks a compiled step; an explicit choice wins."""
    assert ENV_COMPILE == "HANYEONG_MLX_COMPILE"
    monkeypatch.setenv(ENV_COMPILE, value)
    assert backend.init_train_state(backend.init(tiny(), seed=0), OPTIM).compile is compiled
    assert backend.init_train_state(backend.init(tiny(), seed=0), OPTIM, compile=not compiled).compile is not compiled
    monkeypatch.delenv(ENV_COMPILE)
    assert backend.init_train_state(backend.init(tiny(), seed=0), OPTIM).compile is True
    assert env_flag("HANYEONG_UNSET_FLAG", False) is False and env_flag("HANYEONG_UNSET_FLAG", True) is True


@pytest.mark.parametrize("rows, n, world, sizes", [
    (5, 2, 1, [3, 2]), (5, 3, 1, [2, 2, 1]), (4, 4, 1, [1, 1, 1, 1]),
    (5, 3, 2, [3, 2]),  # a rank of 2 takes ceil(3 / 2) = 2 micro-batches
    (1, 3, 2, [1]),  # ... as many as it has rows
    (6, 4, 4, [6]),  # ceil(4 / 4) = 1
    (0, 2, 2, []),  # a rank without a row of this batch: no micro-batch
])  # fmt: skip
def test_split_takes_the_global_micro_batch_size_on_each_rank(rows, n, world, sizes):
    tokens = random_tokens(tiny(), (rows, 9), seed=0)
    parts = split(Batch.from_tokens(tokens), n, world) if world > 1 else split(Batch.from_tokens(tokens), n)
    assert [int(p["inputs"].shape[0]) for p in parts] == sizes
    if parts:
        np.testing.assert_array_equal(np.concatenate([np.array(p["inputs"]) for p in parts]), tokens[:, :-1])


def test_a_batch_with_fewer_rows_than_micro_batches_is_refused(backend):
    check_too_few_rows_are_refused(backend, tiny())


def test_arrays_are_int32_ids_float32_numbers_and_bools():
    """Whatever width a batch's extra arrays come in (float16 weights, int64 or uint16 ids), the step
    gets int32 ids and float32 numbers; bools stay bools."""
    tokens = random_tokens(tiny(), (2, 9), seed=0)
    batch = Batch.from_tokens(tokens, weight=np.full(2, 0.5, np.float16), ids=np.arange(2, dtype=np.int64),
                              small=np.arange(2, dtype=np.uint16), keep=np.array([True, False]))  # fmt: skip
    got = arrays(batch)
    assert {k: v.dtype for k, v in got.items()} == {"inputs": mx.int32, "targets": mx.int32, "weight": mx.float32,
                                                     "ids": mx.int32, "small": mx.int32, "keep": mx.bool_}  # fmt: skip
    np.testing.assert_array_equal(np.array(got["inputs"]), tokens[:, :-1])
    np.testing.assert_array_equal(np.array(got["keep"]), [True, False])


@settings(max_examples=30, deadline=None)
@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=3), scale=st.sampled_from([1e-9, 1e-3, 1.0, 1e3]),
       max_norm=st.sampled_from([0.0, 1e-12, 1e-4, 0.5, 1.0, 1e6]), seed=st.integers(0, 99))  # fmt: skip
def test_clipping_is_torchs_clip_grad_norm(shape, scale, max_norm, seed):
    """clip = torch.nn.utils.clip_grad_norm_: the same norm, and the grads scaled by
    min(max_norm / (norm + 1e-6), 1) (0: left alone); never up, never turned around, even for a norm
    under the 1e-6 guard."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(seed)
    grads = {f"g{i}": (rng.standard_normal(shape[: i + 1]) * scale).astype(np.float32) for i in range(len(shape))}
    clipped, norm = clip({k: mx.array(v) for k, v in grads.items()}, max_norm)
    params = [torch.nn.Parameter(torch.zeros(v.shape)) for v in grads.values()]
    for p, g in zip(params, grads.values()):
        p.grad = torch.from_numpy(g.copy())
    expected = torch.nn.utils.clip_grad_norm_(params, max_norm) if max_norm > 0 else None
    reference = float(np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in grads.values())))
    assert float(norm) == pytest.approx(reference, rel=1e-5)
    if expected is not None:
        assert float(norm) == pytest.approx(float(expected), rel=1e-5)
    for (name, g), p in zip(grads.items(), params):
        np.testing.assert_allclose(np.array(clipped[name]), p.grad.numpy(), rtol=1e-5, atol=0, err_msg=name)


def test_tokens_seen_and_steps_count_every_input_token(backend):
    check_step_counters(backend, tiny())


@pytest.fixture
def metric_loss():
    """SFT plus summed metrics of its own (as the preference losses return): the counted targets
    again, so their mean over them is 1, and a zero that must stay zero."""

    def with_metric(model, batch):
        summed, n = sft(model, batch)
        return summed, n, {"counted_again": n, "zero": mx.array(0.0)}

    register_loss("test_metric", with_metric, reads=("inputs", "targets", "loss_mask"))
    yield "test_metric"
    del LOSSES["test_metric"], LOSS_READS["test_metric"]


@pytest.mark.parametrize("counted", [1, 7])
@pytest.mark.parametrize("compile", [True, False], ids=["compiled", "eager"])
def test_the_step_means_loss_gradient_and_metrics_over_the_counted_targets(backend, metric_loss, counted, compile):
    """The reported loss and a loss's own metrics are sums over the batch's counted targets divided by
    their count, accumulated over micro-batches, and the gradient (its norm reported before clipping)
    is that of the mean: checked against mx's value_and_grad on the same loss, down to one target."""
    spec = tiny()
    batch = batch_counting(spec, counted)
    optim = OptimConfig(**{**OPTIM.to_dict(), "grad_accum_steps": 2, "grad_clip": 0.0})
    state = backend.init_train_state(backend.init(spec, seed=1), optim, compile=compile)
    reference = backend.init(spec, seed=1)

    def mean(model):
        summed, n = sft(model, arrays(batch))
        return summed / n

    value, grads = nn.value_and_grad(reference, mean)(reference)
    norm = float(np.sqrt(sum((np.array(g, np.float64) ** 2).sum() for _, g in tree_flatten(grads))))
    metrics = backend.train_step(state, batch, loss=metric_loss)
    assert metrics["counted_tokens"] == counted and metrics["counted_again"] == pytest.approx(1.0)
    assert metrics["zero"] == 0.0
    assert metrics["loss"] == pytest.approx(value.item(), rel=1e-5)
    assert metrics["grad_norm"] == pytest.approx(norm, rel=1e-4)


def test_moments_that_do_not_match_the_model_are_named(backend):
    from mlx_model.step import load_optimizer_tensors, optimizer_tensors

    state = backend.init_train_state(backend.init(tiny(), seed=0), OPTIM)
    backend.train_step(state, Batch.from_tokens(random_tokens(tiny(), (2, 9), seed=0)))
    tensors = optimizer_tensors(state)
    name = next(k for k in sorted(tensors) if k.startswith("model.norm.weight"))
    tensors[name + "_extra"] = tensors.pop(name)
    with pytest.raises(CheckpointError, match=rf"here: optimizer moments do not match the model: missing "
                                              rf"\['{name}'\], unexpected \['{name}_extra'\]"):  # fmt: skip
        load_optimizer_tensors(state, tensors, "here")


def test_an_unknown_loss_names_the_backend_and_the_losses_it_knows(backend):
    from hanyeong.errors import ConfigError

    state = backend.init_train_state(backend.init(tiny(), seed=0), OPTIM)
    with pytest.raises(ConfigError, match=r"^unknown loss 'nope' for the mlx backend; known: .*causal_lm, .*sft"):
        backend.train_step(state, Batch.from_tokens(random_tokens(tiny(), (2, 9), seed=0)), loss="nope")
