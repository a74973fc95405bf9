"""Training laws: gradient accumulation, resume in a fresh process, SFT masking, weight decay."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

from cuda_model.losses import LOSS_READS, LOSSES, register_loss, token_logprobs
from cuda_model.step import forward_backward
from orchestration.core.batch import Batch
from orchestration.core.checkpoint import optimizer_key, read_trainer_state
from hanyeong.errors import CheckpointError, DataError
from orchestration.core.optim import OptimConfig, lr_at
from tests.conftest import REPO
from tests.check_model import (
    WEIGHTED,
    batch_counting,
    check_extras_reach_the_loss,
    check_step_counters,
    check_too_few_rows_are_refused,
    random_tokens,
)
from tests.cuda_model.conftest import tiny
from tests.cuda_model.resume_worker import train

SMALL = settings(
    max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
OPTIM = OptimConfig(lr=3e-3, warmup_steps=2, total_steps=8, weight_decay=0.1, grad_clip=0.5)


def weights(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@SMALL
@given(rows=st.integers(2, 5), accum=st.integers(2, 3), seed=st.integers(0, 9))
def test_accumulation_gives_the_update_of_one_big_batch(backend, rows, accum, seed):
    spec = tiny(tie_embeddings=seed % 2 == 0)
    rng = np.random.default_rng(seed)
    mask = (rng.random((rows, 11)) < 0.7).astype(np.float32)  # micro-batches count different tokens
    batch = Batch.from_tokens(rng.integers(0, spec.vocab_size, (rows, 11)), loss_mask=mask)
    results = []
    for steps in (1, min(accum, rows)):
        model = backend.init(spec, seed=seed)
        # eps 1e-6 bounds Adam's magnification of fp32 rounding: a gradient entry near 1e-10 (rounded
        # differently when summed in micro-batches) would otherwise move its weight by up to lr.
        config = OptimConfig(**{**OPTIM.to_dict(), "grad_accum_steps": steps, "eps": 1e-6})
        state = backend.init_train_state(model, config)
        metrics = [backend.train_step(state, batch, loss="sft") for _ in range(2)]
        results.append((weights(model), metrics))
    (one, m1), (many, m2) = results
    # Gradients agree to fp32 rounding (see below); Adam's g/sqrt(v) magnifies that rounding where a
    # gradient is near zero, so after two steps at lr 3e-3 the weights agree to ~1e-6, not bitwise.
    for name in one:
        np.testing.assert_allclose(many[name], one[name], atol=1e-5, rtol=0, err_msg=name)
    assert m1[0]["loss"] == pytest.approx(m2[0]["loss"], rel=1e-6)
    assert m1[0]["grad_norm"] == pytest.approx(m2[0]["grad_norm"], rel=1e-5)


@pytest.mark.parametrize("accum", [2, 3])
def test_accumulated_gradients_equal_big_batch_gradients(backend, accum):
    spec = tiny()
    rng = np.random.default_rng(accum)
    mask = (rng.random((5, 11)) < 0.7).astype(np.float32)
    batch = backend.tensors(
        Batch.from_tokens(rng.integers(0, spec.vocab_size, (5, 11)), loss_mask=mask)
    )
    grads = []
    for steps in (1, accum):
        state = backend.init_train_state(
            backend.init(spec, seed=1), OptimConfig(grad_accum_steps=steps, total_steps=1000)
        )
        _, count, _ = forward_backward(state, batch, "sft")
        assert count.item() == mask[:, 1:].sum()
        grads.append({n: p.grad / count for n, p in state.model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-6 * g.abs().max().item(), rtol=0)


def straight(backend, spec, steps: int):
    state = backend.init_train_state(backend.init(spec, seed=11), OPTIM, seed=11)
    train(backend, state, steps)
    return state


def test_resume_in_a_fresh_process_equals_training_straight_through(backend, tmp_path):
    spec, n, m = tiny(tie_embeddings=False), 3, 2
    first = straight(backend, spec, n)
    first.data_cursor = {"shard": 0, "offset": 12}
    backend.save(first.model, tmp_path / "a", first)
    subprocess.run([sys.executable, "-m", "tests.cuda_model.resume_worker", str(tmp_path / "a"),
                    str(tmp_path / "b"), str(m)], cwd=REPO, check=True)  # fmt: skip
    through = straight(backend, spec, n + m)
    resumed = load_file(tmp_path / "b" / "model.safetensors")
    for name, value in weights(through.model).items():
        np.testing.assert_allclose(resumed[name], value, atol=1e-6, rtol=0, err_msg=name)
    moments = load_file(tmp_path / "b" / "optimizer.safetensors")
    for name, p in through.model.named_parameters():
        exp_avg = through.optimizer.state[p]["exp_avg"].numpy()
        np.testing.assert_allclose(
            moments[optimizer_key(name, "exp_avg")], exp_avg, atol=1e-7, rtol=0
        )
    meta = read_trainer_state(tmp_path / "b")
    assert meta["step"] == n + m and meta["tokens_seen"] == through.tokens_seen
    assert meta["data_cursor"] == {"shard": 0, "offset": 12} and meta["backend"] == "torch"
    assert OptimConfig.from_dict(meta["optim"]) == OPTIM


def test_resume_law_over_step_counts(backend, tmp_path):
    """Every (n, m) with n in 0..3, m in 1..3: save after n steps, load, take m more = n + m straight
    through, weights and both AdamW moments (n = 0: nothing to restore; n > 0: moments restored)."""
    spec, N, M = tiny(), 3, 3
    through = backend.init_train_state(backend.init(spec, seed=11), OPTIM, seed=11)
    expected = []  # after k steps: (weights, moments)
    for k in range(N + M + 1):
        if k <= N:
            backend.save(through.model, tmp_path / f"after-{k}", through)
        expected.append((weights(through.model), moments(through)))
        train(backend, through, 1)
    for n in range(N + 1):
        resumed = backend.load_train_state(tmp_path / f"after-{n}")
        assert resumed.step == n
        for m in range(1, M + 1):
            train(backend, resumed, 1)
            want_weights, want_moments = expected[n + m]
            for name, value in weights(resumed.model).items():
                np.testing.assert_allclose(value, want_weights[name], atol=1e-6, rtol=0, err_msg=f"{n}+{m} {name}")
            for key, value in moments(resumed).items():
                np.testing.assert_allclose(value, want_moments[key], atol=1e-7, rtol=1e-5, err_msg=f"{n}+{m} {key}")


def moments(state) -> dict[str, np.ndarray]:
    """Both AdamW moments of every parameter, by checkpoint key (zeros before the first step)."""
    out = {}
    for name, p in state.model.named_parameters():
        for moment in ("exp_avg", "exp_avg_sq"):
            value = state.optimizer.state.get(p, {}).get(moment)
            out[optimizer_key(name, moment)] = np.zeros(p.shape) if value is None else value.numpy().copy()
    return out


def test_sft_counts_only_masked_targets(backend):
    spec = tiny()
    model = backend.init(spec, seed=2)
    tokens = random_tokens(spec, (2, 9), seed=3)
    mask = np.zeros_like(tokens, dtype=np.float32)
    mask[:, 5:] = 1.0  # the "assistant" turn
    batch = Batch.from_tokens(tokens, loss_mask=mask)
    changed = tokens.copy()
    changed[:, 1:5] = (changed[:, 1:5] + 1) % spec.vocab_size  # targets under mask 0 (inputs too)
    changed_targets = Batch(batch.inputs, Batch.from_tokens(changed).targets, batch.loss_mask)
    assert backend.eval_loss(model, changed_targets, loss="sft") == backend.eval_loss(
        model, batch, loss="sft"
    )
    logprobs = backend.logprobs(model, batch)
    assert backend.eval_loss(model, batch, loss="sft") == pytest.approx(
        -logprobs[:, 4:].mean(), rel=1e-5
    )
    with pytest.raises(DataError, match="loss_mask"):
        backend.eval_loss(model, Batch.from_tokens(tokens), loss="sft")


def test_lr_schedule_and_no_decay_on_norms_and_embeddings(backend):
    spec = tiny(tie_embeddings=False)
    model = backend.init(spec)
    state = backend.init_train_state(model, OPTIM)
    decayed = {
        id(p) for g in state.optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]
    }
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (
            not name.endswith("norm.weight") and name != "model.embed_tokens.weight"
        )
    batch = Batch.from_tokens(random_tokens(spec, (2, 9)))
    lrs = [backend.train_step(state, batch)["lr"] for _ in range(4)]
    assert lrs == [lr_at(OPTIM, s) for s in range(4)]
    assert state.optimizer.param_groups[0]["lr"] == lrs[-1]


def test_clipping_bounds_the_update(backend):
    spec = tiny()
    model = backend.init(spec)
    state = backend.init_train_state(model, OptimConfig(lr=1e-3, grad_clip=1e-3, total_steps=4))
    batch = Batch.from_tokens(random_tokens(spec, (2, 9)))
    metrics = backend.train_step(state, batch)
    assert metrics["grad_norm"] > 1e-3  # the norm before clipping is reported
    assert torch.isfinite(torch.tensor(metrics["loss"]))


@pytest.fixture
def weighted_loss():
    """A loss on a per-row weight array, added through the public extension point alone."""
    seen = []

    def weighted(model, batch):
        seen.append({k: v.detach().cpu().numpy() for k, v in batch.items()})
        nll = -token_logprobs(model(batch["inputs"], batch.get("segment_ids")), batch["targets"])
        return (nll * batch["row_weight"][:, None]).sum(), torch.tensor(float(nll.numel()))

    register_loss(WEIGHTED, weighted, reads=("inputs", "targets", "row_weight"))
    yield seen
    del LOSSES[WEIGHTED], LOSS_READS[WEIGHTED]


def test_extra_arrays_reach_a_registered_loss_through_accumulation(backend, weighted_loss):
    check_extras_reach_the_loss(backend, tiny(), weighted_loss, np.int64)


def test_clipping_applies_the_update_of_the_gradient_scaled_to_the_clip_norm(backend):
    """One step with grad_clip = c moves the weights exactly as AdamW does on the gradient scaled to
    norm c (computed here apart: plain cross-entropy, autograd, torch.optim.AdamW), and not as on the
    unclipped one. Adam's first step is g / (|g| + eps): scale-free but for eps, so eps is set near
    the clipped gradient's entries (~1e-5) for the clip to show in the update."""
    from orchestration.core.optim import decays

    spec, c = tiny(tie_embeddings=False), 1e-2
    optim = OptimConfig(lr=1e-2, schedule="constant", warmup_steps=0, eps=1e-5, weight_decay=0.1, grad_clip=c)
    batch = Batch.from_tokens(random_tokens(spec, (3, 17), seed=5))

    reference = backend.init(spec, seed=7)
    logits = reference(torch.from_numpy(batch.inputs).long())
    targets = torch.from_numpy(batch.targets).long().flatten()
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets).backward()
    named = list(reference.named_parameters())
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for _, p in named)).item()
    assert norm > 20 * c  # the clip really bites
    groups = [{"params": [p for n, p in named if decays(n, optim) == d], "weight_decay": wd}
              for d, wd in ((True, optim.weight_decay), (False, 0.0))]  # fmt: skip
    adamw = torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps)
    for _, p in named:
        p.grad.mul_(c / (norm + 1e-6))  # torch.nn.utils.clip_grad_norm_'s coefficient
    adamw.step()
    expected = weights(reference)

    before = weights(backend.init(spec, seed=7))
    updates = {}
    for clip in (c, 0.0):
        model = backend.init(spec, seed=7)
        state = backend.init_train_state(model, OptimConfig(**{**optim.to_dict(), "grad_clip": clip}))
        metrics = backend.train_step(state, batch)
        assert metrics["grad_norm"] == pytest.approx(norm, rel=1e-5)  # the norm before clipping
        updates[clip] = weights(model)
    for name, value in expected.items():
        step = value - before[name]
        # measured: <= 6e-8, and 1 ulp of weights near 1 (their step is rounded to them): the loss
        # kernels and autograd round g differently, and where |g| ~ eps (embedding rows of tokens
        # seen once) the g -> step map is steepest (lr / 4eps). Without the clip steps differ by ~9e-3.
        atol = 1e-7 + 2 * np.spacing(np.abs(before[name]).max())
        np.testing.assert_allclose(updates[c][name] - before[name], step, atol=atol, rtol=1e-4, err_msg=name)
        assert np.abs(updates[0.0][name] - value).max() > 1e-3, name  # unclipped: another update


def test_activation_checkpointing_trains_the_same_weights_and_resumes(backend, tmp_path):
    """train_step with accumulation (3 rows in 2 micro-batches, an SFT mask): the same losses,
    grad norms and weights with activation checkpointing as without (<= 1e-6); a checkpoint does not
    record it, and a state loaded with it on goes on to the same weights as one without."""
    spec = tiny()
    rng = np.random.default_rng(3)
    optim = OptimConfig(**{**OPTIM.to_dict(), "grad_accum_steps": 2})
    batches = [Batch.from_tokens(random_tokens(spec, (3, 13), seed=s), loss_mask=(rng.random((3, 13)) < 0.7)
                                 .astype(np.float32)) for s in range(4)]  # fmt: skip
    runs = []
    for recompute in (False, True):
        state = backend.init_train_state(backend.init(spec, seed=1), optim, seed=1,
                                         activation_checkpointing=recompute)  # fmt: skip
        assert state.model.model.activation_checkpointing is recompute
        metrics = [backend.train_step(state, b, loss="sft") for b in batches[:2]]
        backend.save(state.model, tmp_path / f"ckpt-{recompute}", state)
        runs.append((metrics, weights(state.model)))
    (m_off, w_off), (m_on, w_on) = runs
    for a, b in zip(m_off, m_on):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-6)
    for name, w in w_off.items():
        np.testing.assert_allclose(w_on[name], w, rtol=0, atol=1e-6, err_msg=name)
    assert read_trainer_state(tmp_path / "ckpt-True") == read_trainer_state(tmp_path / "ckpt-False") | {
        "rng": read_trainer_state(tmp_path / "ckpt-True")["rng"]}  # fmt: skip
    resumed = []
    for recompute in (False, True):  # both from the checkpoint written without it
        state = backend.load_train_state(tmp_path / "ckpt-False", activation_checkpointing=recompute)
        assert state.activation_checkpointing is recompute
        for b in batches[2:]:
            backend.train_step(state, b, loss="sft")
        resumed.append(weights(state.model))
    for name, w in resumed[0].items():
        np.testing.assert_allclose(resumed[1][name], w, rtol=0, atol=1e-6, err_msg=name)



@pytest.mark.parametrize("value, fused", [("1", True), ("on", True), ("0", False), ("off", False), ("False", False),
                                          ("", False)])  # fmt: skip
def test_the_fused_adamw_switch_is_read_from_its_environment_variable(backend, monkeypatch, value, fused):
    """HANYEONG_FUSED_ADAMW picks the AdamW kernel (empty: the device's default, foreach on the CPU);
    HANYEONG_TORCH_COMPILE and HANYEONG_FSDP_BF16 are read by the same rule."""
    from cuda_model.step import ENV_COMPILE, ENV_FSDP_BF16, ENV_FUSED, env_flag

    assert (ENV_FUSED, ENV_COMPILE, ENV_FSDP_BF16) == ("HANYEONG_FUSED_ADAMW", "HANYEONG_TORCH_COMPILE",
                                                       "HANYEONG_FSDP_BF16")  # fmt: skip
    monkeypatch.setenv(ENV_FUSED, value)
    state = backend.init_train_state(backend.init(tiny(), seed=0), OPTIM)
    assert bool(state.optimizer.defaults["fused"]) is fused
    assert bool(state.optimizer.defaults["foreach"]) is not fused
    monkeypatch.setenv("HANYEONG_SOME_FLAG", " No ")
    assert env_flag("HANYEONG_SOME_FLAG", True) is False and env_flag("HANYEONG_UNSET_FLAG", True) is True


@pytest.mark.parametrize("value, compiled", [("1", True), ("0", False), ("", False)])
def test_the_compile_switch_is_read_from_its_environment_variable(backend, monkeypatch, value, compiled):
    """HANYEONG_TORCH_COMPILE (unset or empty: off) compiles the step's losses and, process-wide, the
    fused head's kernel (on CUDA); an explicit choice wins. Nothing compiles before a step runs."""
    from cuda_model import losses
    from cuda_model.step import ENV_COMPILE

    monkeypatch.setattr(losses, "COMPILE_HEAD_KERNEL", False)
    monkeypatch.setenv(ENV_COMPILE, value)
    assert backend.init_train_state(backend.init(tiny(), seed=0), OPTIM).compile is compiled
    assert losses.COMPILE_HEAD_KERNEL is compiled
    assert backend.init_train_state(backend.init(tiny(), seed=0), OPTIM, compile=not compiled).compile is not compiled
    assert losses.COMPILE_HEAD_KERNEL is True  # set once either state compiled; never unset


def test_tokens_seen_and_steps_count_every_input_token(backend):
    check_step_counters(backend, tiny())


@pytest.fixture
def metric_loss():
    """SFT plus a summed metric of its own (as the preference losses return): the counted targets
    again, so its mean over them is 1."""
    from cuda_model.losses import sft

    def with_metric(model, batch):
        summed, n = sft(model, batch)
        return summed, n, {"counted_again": n}

    register_loss("test_metric", with_metric, reads=("inputs", "targets", "loss_mask"))
    yield "test_metric"
    del LOSSES["test_metric"], LOSS_READS["test_metric"]


@pytest.mark.parametrize("counted", [1, 7])
def test_the_step_means_loss_gradient_and_metrics_over_the_counted_targets(backend, metric_loss, counted):
    """The reported loss and a loss's own metrics are sums over the global batch's counted targets
    divided by their count, accumulated over micro-batches, and the gradient (its norm reported before
    clipping) is that of the mean: checked against autograd on the same loss, down to one target."""
    spec = tiny()
    batch = batch_counting(spec, counted)
    optim = OptimConfig(**{**OPTIM.to_dict(), "grad_accum_steps": 2, "grad_clip": 0.0})
    state = backend.init_train_state(backend.init(spec, seed=1), optim)
    reference = backend.init(spec, seed=1)
    summed, n, _ = LOSSES[metric_loss](reference, backend.tensors(batch))
    (summed / n).backward()
    norm = torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()]).item()
    metrics = backend.train_step(state, batch, loss=metric_loss)
    assert metrics["counted_tokens"] == counted and metrics["counted_again"] == pytest.approx(1.0)
    assert metrics["loss"] == pytest.approx(summed.item() / counted, rel=1e-5)
    assert metrics["grad_norm"] == pytest.approx(norm, rel=1e-4)


def test_a_batch_with_fewer_rows_than_micro_batches_is_refused(backend):
    check_too_few_rows_are_refused(backend, tiny())


def test_an_explicit_fused_choice_wins_over_the_environment(backend, monkeypatch):
    monkeypatch.setenv("HANYEONG_FUSED_ADAMW", "0")
    state = backend.init_train_state(backend.init(tiny(), seed=0), OPTIM, fused=True)
    assert state.optimizer.defaults["fused"] is True


def test_moments_that_do_not_match_the_model_are_named(backend):
    from cuda_model.step import load_optimizer_tensors, optimizer_tensors

    state = backend.init_train_state(backend.init(tiny(), seed=0), OPTIM)
    state.step = 1
    tensors = optimizer_tensors(state)
    tensors["model.norm.weight.exp_avg_extra"] = tensors.pop("model.norm.weight.exp_avg")
    with pytest.raises(CheckpointError, match=r"missing \['model.norm.weight.exp_avg'\], unexpected "
                                              r"\['model.norm.weight.exp_avg_extra'\]"):  # fmt: skip
        load_optimizer_tensors(state, tensors, "here")


def test_carried_moments_are_installed_whatever_the_stage_step(backend):
    """Moments are skipped only before any AdamW step at all (this stage's and the carried ones)."""
    from cuda_model.step import load_optimizer_tensors, optimizer_tensors

    source = backend.init_train_state(backend.init(tiny(), seed=0), OPTIM)
    backend.train_step(source, Batch.from_tokens(random_tokens(tiny(), (2, 9), seed=0)))
    for step, carried in ((2, 2), (0, 3), (3, 0)):
        state = backend.init_train_state(backend.init(tiny(), seed=0), OPTIM)
        state.step, state.carried_steps = step, carried
        load_optimizer_tensors(state, optimizer_tensors(source), "here")
        steps = {float(v["step"]) for v in state.optimizer.state.values()}
        assert len(state.optimizer.state) == len(list(state.model.parameters())) and steps == {step + carried}


def test_an_unknown_loss_names_the_backend_and_the_losses_it_knows(backend):
    from hanyeong.errors import ConfigError

    state = backend.init_train_state(backend.init(tiny(), seed=0), OPTIM)
    with pytest.raises(ConfigError, match=r"^unknown loss 'nope' for the torch backend; known: .*causal_lm, .*sft"):
        backend.train_step(state, Batch.from_tokens(random_tokens(tiny(), (2, 9), seed=0)), loss="nope")
