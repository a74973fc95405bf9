"""Learning-rate schedules and optimizer settings shared by both backends."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hanyeong.errors import ConfigError
from orchestration.core.optim import OptimConfig, decays, lr_at

configs = st.builds(
    lambda total, warm_share, schedule, ratio, decay: OptimConfig(
        lr=1e-3, total_steps=total, warmup_steps=int(total * warm_share), schedule=schedule,
        min_lr_ratio=ratio, decay_fraction=decay,
    ),
    st.integers(1, 2000), st.floats(0, 0.5), st.sampled_from(["cosine", "wsd", "constant"]),
    st.floats(0, 1), st.floats(0.01, 1),
)


@given(configs)
def test_schedule_stays_between_floor_and_peak_and_ends_at_floor(config):
    lrs = [lr_at(config, s) for s in range(config.total_steps + 5)]
    floor = config.lr * config.min_lr_ratio
    peak = config.lr * (1 + 1e-12)
    assert all(0 < lr <= peak for lr in lrs[: config.warmup_steps])  # warmup: never zero
    assert all(floor * (1 - 1e-12) - 1e-18 <= lr <= peak for lr in lrs[config.warmup_steps :])
    if config.schedule != "constant":
        assert lrs[-1] == pytest.approx(floor)  # after the schedule it stays at its end value
    warm = lrs[: config.warmup_steps]
    assert warm == sorted(warm)  # warmup rises


@given(configs)
def test_after_warmup_the_schedule_never_rises(config):
    lrs = [lr_at(config, s) for s in range(config.warmup_steps, config.total_steps + 1)]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(lrs, lrs[1:]))


def test_wsd_is_flat_then_decays_over_its_last_fraction():
    config = OptimConfig(lr=1.0, total_steps=100, warmup_steps=10, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    assert [lr_at(config, s) for s in (10, 50, 80)] == [1.0, 1.0, 1.0]
    assert lr_at(config, 90) == pytest.approx(0.5)
    assert lr_at(config, 100) == 0.0


def test_no_weight_decay_on_norms_and_embeddings_by_default():
    config = OptimConfig()
    assert decays("model.layers.0.self_attn.q_proj.weight", config)
    assert not decays("model.layers.0.input_layernorm.weight", config)
    assert not decays("model.norm.weight", config)
    assert not decays("model.embed_tokens.weight", config)
    assert decays("model.embed_tokens.weight", OptimConfig(decay_norms_and_embeddings=True))


@pytest.mark.parametrize("change", [{"schedule": "linear"}, {"lr": 0}, {"warmup_steps": 2000, "total_steps": 1000},
                                    {"betas": (0.9, 1.0)}, {"grad_accum_steps": 0}, {"min_lr_ratio": 2},
                                    {"total_steps": 0}])  # fmt: skip
def test_bad_setting_is_refused(change):
    with pytest.raises(ConfigError, match=f"^{next(iter(change))}"):  # the message names the field
        OptimConfig(**change)
    with pytest.raises(ConfigError, match=f"^optim.{next(iter(change))}"):  # the builder adds the table
        OptimConfig.from_dict(change)


def test_round_trips_through_a_dict():
    config = OptimConfig(schedule="wsd", betas=(0.9, 0.98), total_steps=500)
    assert OptimConfig.from_dict({**config.to_dict(), "betas": list(config.betas)}) == config


def test_the_schedule_needs_its_length():
    """total_steps is given by whoever runs the schedule (a recipe stage derives it), never guessed."""
    config = OptimConfig(warmup_steps=2)
    assert lr_at(config, 1) == pytest.approx(config.lr)  # warmup needs no length
    with pytest.raises(ConfigError, match="total_steps is not set"):
        lr_at(config, 2)
    assert lr_at(OptimConfig(schedule="constant"), 10) == config.lr


# ---- laws added for mutation testing (benchmarks/mutations.py) ----------------------------------


def test_defaults_are_gpt3s_adamw_and_change_nothing_else():
    """A [stage.optim] table that leaves a key out gets GPT-3's settings (Brown et al. 2020, app. B:
    betas 0.9/0.95, eps 1e-8, clip 1.0, weight decay 0.1, cosine down to 10%), LLaMA 7B's peak lr
    (3e-4), a WSD cooldown over the last 20% (Hägele et al. 2024), and otherwise nothing: no warmup,
    no accumulation, no decay on norms and the embedding."""
    config = OptimConfig()
    assert (config.betas, config.eps, config.grad_clip, config.weight_decay) == ((0.9, 0.95), 1e-8, 1.0, 0.1)
    assert (config.schedule, config.min_lr_ratio, config.lr, config.decay_fraction) == ("cosine", 0.1, 3e-4, 0.2)
    assert (config.warmup_steps, config.grad_accum_steps, config.decay_norms_and_embeddings) == (0, 1, False)
    # no warmup: the cosine starts at step 0 at its peak and is halfway down halfway through
    config = OptimConfig(total_steps=100)
    assert lr_at(config, 0) == pytest.approx(config.lr, rel=1e-12)
    assert lr_at(config, 50) == pytest.approx((config.lr + config.lr * config.min_lr_ratio) / 2, rel=1e-12)


def test_cosine_after_warmup_is_halfway_down_halfway_through():
    config = OptimConfig(lr=1.0, total_steps=110, warmup_steps=10, min_lr_ratio=0.2)
    assert lr_at(config, 10) == pytest.approx(1.0, rel=1e-12)
    assert lr_at(config, 60) == pytest.approx(0.6, rel=1e-12)
    assert lr_at(config, 35) == pytest.approx(0.2 + 0.8 * (1 + 2**-0.5) / 2, rel=1e-12)  # cos(pi/4)
    assert lr_at(config, 110) == pytest.approx(0.2, rel=1e-12)


def test_shortest_schedules_still_reach_the_floor():
    """One step, a warmup as long as the schedule, a decay shorter than one step."""
    one = OptimConfig(lr=1.0, total_steps=1, min_lr_ratio=0.1)
    assert [lr_at(one, s) for s in (0, 1, 2)] == [1.0, pytest.approx(0.1), pytest.approx(0.1)]
    warm = OptimConfig(lr=1.0, total_steps=10, warmup_steps=10)
    assert [lr_at(warm, s) for s in (0, 9)] == [0.1, 1.0]
    wsd = OptimConfig(lr=1.0, total_steps=10, schedule="wsd", decay_fraction=0.01, min_lr_ratio=0.0)
    assert [lr_at(wsd, s) for s in (8, 9, 10)] == [1.0, 1.0, 0.0]  # round(0.1) = 0: one step of decay


def test_specs_of_optim_are_frozen():
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        OptimConfig().lr = 1.0


@pytest.mark.parametrize("change", [{"min_lr_ratio": 0.0}, {"min_lr_ratio": 1.0}, {"total_steps": 1},
                                    {"warmup_steps": 10, "total_steps": 10}, {"decay_fraction": 1.0},
                                    {"betas": (0.0, 0.0)}, {"weight_decay": 0.0}, {"grad_clip": 0.0},
                                    {"eps": 1e-30}])  # fmt: skip
def test_edge_settings_are_accepted(change):
    assert OptimConfig.from_dict(change) == OptimConfig(**change)
    assert all(getattr(OptimConfig(**change), k) == v for k, v in change.items())


@pytest.mark.parametrize("change", [{"min_lr_ratio": 1.5}, {"min_lr_ratio": -0.1}, {"decay_fraction": 0.0},
                                    {"decay_fraction": 1.5}, {"betas": (0.9, 0.95, 0.99)}, {"betas": (-0.1, 0.9)},
                                    {"weight_decay": -0.1}, {"grad_clip": -1.0}, {"eps": 0.0},
                                    {"warmup_steps": -1}, {"total_steps": -5}])  # fmt: skip
def test_more_bad_settings_are_refused(change):
    with pytest.raises(ConfigError, match=f"^{next(iter(change))}"):
        OptimConfig(**change)
