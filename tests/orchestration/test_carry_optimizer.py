"""carry_optimizer: a stage that carries on the previous stage's AdamW moments (and their step count)
trains as one longer stage with the same schedule would, on both backends; without it the moments
start afresh and the weights differ. The carried step count survives a resume; the option is refused
where there are no moments to carry on, and leaves identities alone when off."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hanyeong.errors import ConfigError
from orchestration.core.batch import Batch
from orchestration.core.checkpoint import read_trainer_state
from orchestration.core.optim import OptimConfig
from orchestration.pipeline.recipe import Recipe
from orchestration.pipeline.stage import run_stage
from tests.cuda_model.conftest import tiny
from tests.orchestration.test_stage import datasets, one_thread, pretrained, recipe_tables, request  # noqa: F401

T, ROWS, FIRST, SECOND = 16, 4, 3, 3
# peak after 2 warmup steps: the second stage (no warmup of its own) goes on at the same LR
LONG = OptimConfig(lr=3e-3, warmup_steps=2, schedule="constant", total_steps=FIRST + SECOND, weight_decay=0.1,
                   grad_clip=1.0)  # fmt: skip
TAIL = OptimConfig(**{**LONG.to_dict(), "warmup_steps": 0, "total_steps": SECOND})


def batch_at(step: int, vocab: int) -> Batch:
    return Batch.from_tokens(np.random.default_rng(50 + step).integers(0, vocab, (ROWS, T + 1)))


def train(backend, state, steps: int, offset: int = 0) -> list[float]:
    vocab = tiny().vocab_size
    return [backend.train_step(state, batch_at(offset + state.step, vocab))["loss"] for _ in range(steps)]


def weights(backend, model) -> dict[str, np.ndarray]:
    if backend.name == "torch":
        return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    from mlx.utils import tree_flatten

    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


@pytest.fixture(params=["torch", "mlx"])
def backend(request):
    from orchestration.core.backends import get_backend

    if request.param == "mlx":
        pytest.importorskip("mlx.core")
    return get_backend(request.param, device="cpu") if request.param == "torch" else get_backend("mlx")


def test_carried_moments_train_as_one_longer_stage(backend, tmp_path):
    spec = tiny()
    whole = backend.init_train_state(backend.init(spec, seed=7), LONG, seed=7)
    long_losses = train(backend, whole, FIRST + SECOND)

    first = backend.init_train_state(backend.init(spec, seed=7), LONG, seed=7)
    train(backend, first, FIRST)
    first.data_cursor = {}
    backend.save(first.model, tmp_path / "first", first)

    carried = backend.init_train_state(backend.load(tmp_path / "first"), TAIL, seed=8)
    backend.carry_optimizer(carried, tmp_path / "first")
    assert carried.step == 0 and carried.carried_steps == FIRST
    tail_losses = train(backend, carried, 1, FIRST)
    carried.data_cursor = {}
    backend.save(carried.model, tmp_path / "tail", carried)  # a checkpoint one step into the tail
    tail_losses += train(backend, carried, SECOND - 1, FIRST)
    np.testing.assert_allclose(tail_losses, long_losses[FIRST:], rtol=1e-5)
    want = weights(backend, whole.model)
    for key, value in weights(backend, carried.model).items():
        np.testing.assert_allclose(value, want[key], atol=1e-6, rtol=1e-5, err_msg=key)

    # the carried count is in the checkpoint: a resumed tail is the uninterrupted one
    assert read_trainer_state(tmp_path / "tail")["carried_steps"] == FIRST
    resumed = backend.load_train_state(tmp_path / "tail")
    assert (resumed.step, resumed.carried_steps) == (1, FIRST)
    train(backend, resumed, SECOND - 1, FIRST)
    for key, value in weights(backend, resumed.model).items():
        np.testing.assert_allclose(value, want[key], atol=1e-6, rtol=1e-5, err_msg=key)

    # fresh moments (the default) are another update: the law above could fail
    fresh = backend.init_train_state(backend.load(tmp_path / "first"), TAIL, seed=8)
    train(backend, fresh, SECOND, FIRST)
    gap = max(np.abs(v - want[k]).max() for k, v in weights(backend, fresh.model).items())
    assert gap > 1e-4


def test_carry_optimizer_needs_moments_that_belong_to_the_start(small_tokenizer_dir, datasets):  # noqa: F811
    tables = recipe_tables(small_tokenizer_dir, datasets)
    with pytest.raises(ConfigError, match="carry_optimizer: a stage that starts from 'init' has no"):
        tables["stage"][0]["carry_optimizer"] = True
        Recipe.from_dict(tables)
    tables["stage"][0].pop("carry_optimizer")
    tables["stage"][1]["upscale"] = "0:2,0:2"
    tables["stage"][1]["carry_optimizer"] = True
    with pytest.raises(ConfigError, match="carry_optimizer: the upscaled start's weights are not those"):
        Recipe.from_dict(tables)
    tables["stage"][1].pop("upscale")
    tables["stage"][1]["carry_optimizer"] = "yes"
    with pytest.raises(ConfigError, match="^stage 2 'sft': carry_optimizer must be bool, got str 'yes'$"):
        Recipe.from_dict(tables)


def test_identities_stay_when_off_and_change_when_on(small_tokenizer_dir, datasets):  # noqa: F811
    tables = recipe_tables(small_tokenizer_dir, datasets)
    before = Recipe.from_dict(tables).stage_identities()
    tables["stage"][1]["carry_optimizer"] = False
    assert Recipe.from_dict(tables).stage_identities() == before
    tables["stage"][1]["carry_optimizer"] = True
    after = Recipe.from_dict(tables).stage_identities()
    assert after[0] == before[0] and after[1] != before[1]


def test_a_stage_carries_the_previous_stages_moments(pretrained, small_tokenizer_dir, datasets, tmp_path):  # noqa: F811
    tables, _, first = pretrained
    tables = json.loads(json.dumps(tables))
    tables["stage"][1]["carry_optimizer"] = True
    result = run_stage(request(tables, 1, tmp_path / "sft", small_tokenizer_dir, datasets, init_from=first["checkpoint"]))
    state = read_trainer_state(result["checkpoint"])
    assert state["carried_steps"] == read_trainer_state(first["checkpoint"])["step"] == first["steps"]
    assert state["step"] == result["steps"] == 8
