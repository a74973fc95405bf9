"""Group-relative advantages and loss-aggregation weights (orchestration/core/grpo.py): TRL's
formulas, the zero-sum law within groups, and the groups whose rewards are all equal."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hanyeong.errors import ConfigError
from orchestration.core.grpo import aggregation_weights, group_advantages

torch = pytest.importorskip("torch")

rewards_in_groups = st.integers(2, 6).flatmap(lambda g: st.tuples(st.just(g), st.lists(
    st.lists(st.sampled_from([0.0, 0.5, 1.0, -1.0, 0.25, 2.0]), min_size=g, max_size=g), min_size=1, max_size=6)))


@settings(max_examples=200, deadline=None)
@given(rewards_in_groups)
def test_advantages_sum_to_zero_within_each_group(case):
    group_size, groups = case
    advantages, zero_std = group_advantages(np.array(groups).ravel(), group_size, "group")
    sums = advantages.reshape(-1, group_size).sum(axis=1)
    np.testing.assert_allclose(sums, 0.0, atol=1e-4)
    for k, group in enumerate(groups):
        assert zero_std[k] == (len(set(group)) == 1)
        if zero_std[k]:  # exactly zero: no gradient at all from a group that teaches nothing
            assert (advantages.reshape(-1, group_size)[k] == 0.0).all()


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_equal_trls(scale):
    """TRL's GRPOTrainer (sum_then_normalize): rewards - group mean, divided by nanstd + 1e-4."""
    from trl.trainer.utils import nanstd

    rng = np.random.default_rng(0)
    rewards = rng.choice([0.0, 1.0, 0.3], size=24).astype(np.float32)
    rewards[:4] = 1.0  # a group of equal rewards
    r = torch.from_numpy(rewards)
    mean = r.view(-1, 4).mean(dim=1).repeat_interleave(4)
    std = nanstd(r.view(-1, 4), dim=1).repeat_interleave(4) if scale != "batch" else nanstd(r).expand_as(r)
    expected = r - mean if scale == "none" else (r - mean) / (std + 1e-4)
    advantages, zero_std = group_advantages(rewards, 4, scale)
    np.testing.assert_allclose(advantages, expected.numpy(), atol=1e-6)
    assert zero_std.tolist() == torch.isclose(nanstd(r.view(-1, 4), dim=1), torch.zeros(6)).tolist()


def test_aggregation_weights():
    mask = np.array([[0, 1, 1, 1, 0], [0, 0, 1, 0, 0]], np.float32)
    np.testing.assert_array_equal(aggregation_weights("token_mean", mask, 8)[0], [1, 1])
    np.testing.assert_array_equal(aggregation_weights("token_mean", mask, 8)[1], [3, 1])
    np.testing.assert_allclose(aggregation_weights("seq_mean_token_mean", mask, 8)[0], [1 / 3, 1])
    np.testing.assert_array_equal(aggregation_weights("seq_mean_token_mean", mask, 8)[1], [1, 1])
    np.testing.assert_array_equal(aggregation_weights("dr_grpo", mask, 8)[1], [8, 8])
    with pytest.raises(ConfigError, match="loss_aggregation must be one of"):
        aggregation_weights("sum", mask, 8)
    with pytest.raises(ConfigError, match="scale_rewards must be one of"):
        group_advantages(np.zeros(4), 2, "global")
    with pytest.raises(ConfigError, match="whole groups"):
        group_advantages(np.zeros(5), 2)
