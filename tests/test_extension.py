"""A new training objective through the public extension points alone (issue 12's check).

tests/plugins/row_weighted.py adds a loss on a per-row weight array in both backends and a stage kind
that feeds it; a recipe imports it (`[run] imports`) and trains a stage of that kind through
run_stage. Nothing under orchestration/, cuda_model/ or mlx_model/ knows the names."""

from __future__ import annotations

import copy
import subprocess

import numpy as np
import pytest

from hanyeong.errors import ConfigError, DataError
from orchestration.core.batch import Batch
from orchestration.pipeline.recipe import Recipe
from orchestration.pipeline.stage import run_stage
from tests.conftest import REPO
from tests.orchestration.test_stage import datasets, metrics, one_thread, recipe_tables  # noqa: F401

torch = pytest.importorskip("torch")
PLUGIN = "tests.plugins.row_weighted"


def weighted_tables(tokenizer, datasets_: dict) -> dict:
    tables = recipe_tables(tokenizer, datasets_)
    stage = copy.deepcopy(tables["stage"][0])
    for key in ("seq_len_ramp", "batch_ramp", "checkpoint_every_tokens"):
        stage.pop(key)
    stage.update(name="weighted", kind="row_weighted", token_budget=4096, optim={"lr": 3e-3})
    tables["run"]["imports"] = [PLUGIN]
    tables["stage"] = [stage]
    return tables


def test_the_extension_touches_no_hanyeong_file():
    """The plugin and this test are the whole change: no hanyeong package names the kind or loss."""
    found = subprocess.run(["git", "grep", "-l", "-e", "row_weight", "--", "orchestration", "cuda_model",
                            "mlx_model", "tokenizer", "hanyeong"], cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert found.stdout == ""


def test_a_recipe_that_imports_the_plugin_trains_the_new_kind(small_tokenizer_dir, datasets, tmp_path):
    from cuda_model.backend import BACKEND
    from tests.plugins.row_weighted import row_weights

    tables = weighted_tables(small_tokenizer_dir, datasets)
    recipe = Recipe.from_dict(tables)
    assert recipe.stage[0].loss == "row_weighted_lm"
    stage_dir = tmp_path / "weighted"
    result = run_stage({"recipe": recipe.to_dict(), "index": 0, "stage_dir": str(stage_dir),
                        "tokenizer": str(small_tokenizer_dir), "datasets": datasets, "backend": "torch"})  # fmt: skip
    lines = metrics(stage_dir)
    assert result["tokens"] == 4096 and len(lines) == 4
    assert lines[-1]["loss"] < lines[0]["loss"]

    # the first step's loss is the weighted one, recomputed here at the initial weights
    loader = recipe.stage[0].stage_kind.loader(
        recipe_loader_mixture(recipe, datasets), 64, 16, seed=recipe.run.seed
    )
    batch = loader.next_batch()
    assert np.array_equal(batch.extras["row_weight"], row_weights(batch.inputs))
    model = BACKEND.init(recipe.run.model_spec(), seed=recipe.run.seed)
    logits = BACKEND.logits(model, batch.inputs).astype(np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, batch.targets[..., None].astype(np.int64), -1)[..., 0]
    w = row_weights(batch.inputs)
    weighted = (nll.sum(1) * w).sum() / (w.sum() * nll.shape[1])
    assert lines[0]["loss"] == pytest.approx(weighted, rel=1e-5)
    assert abs(weighted - nll.mean()) > 1e-4  # the weights matter: plain causal LM would differ


def recipe_loader_mixture(recipe, datasets_: dict):
    """The stage's mixture with dataset names mapped to directories, as run_stage maps them."""
    import dataclasses

    mixture = recipe.stage[0].data
    located = tuple(dataclasses.replace(e, dataset=datasets_[e.dataset]) for e in mixture.sources)
    return dataclasses.replace(mixture, sources=located)


def test_the_loss_is_the_same_on_both_backends(tmp_path):
    pytest.importorskip("mlx")
    from cuda_model.backend import BACKEND as TORCH
    from mlx_model.backend import BACKEND as MLX
    from orchestration.core.optim import OptimConfig
    from orchestration.core.presets import get_preset
    from tests.plugins.row_weighted import LOSS, row_weights

    spec = get_preset("tiny").replace(vocab_size=512)
    TORCH.save(TORCH.init(spec, seed=3), tmp_path / "ckpt")
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 512, (4, 17))
    batch = Batch.from_tokens(tokens, row_weight=row_weights(tokens[:, :-1]))
    optim = OptimConfig(lr=1e-3, total_steps=2)
    got = [b.train_step(b.init_train_state(b.load(tmp_path / "ckpt"), optim), batch, loss=LOSS)["loss"]
           for b in (TORCH, MLX)]  # fmt: skip
    assert got[0] == pytest.approx(got[1], rel=1e-4)


def test_the_new_loss_refuses_a_batch_without_its_field():
    from cuda_model.backend import BACKEND
    from orchestration.core.optim import OptimConfig
    from orchestration.core.presets import get_preset
    from tests.plugins.row_weighted import LOSS

    state = BACKEND.init_train_state(BACKEND.init(get_preset("tiny").replace(vocab_size=512)),
                                     OptimConfig(lr=1e-3, total_steps=2))  # fmt: skip
    with pytest.raises(DataError, match="row_weight"):
        BACKEND.train_step(state, Batch.from_tokens(np.ones((2, 9), np.int64)), loss=LOSS)


def test_an_import_that_fails_is_one_config_error(small_tokenizer_dir, datasets):
    tables = weighted_tables(small_tokenizer_dir, datasets)
    tables["run"]["imports"] = ["tests.plugins.no_such_module"]
    with pytest.raises(ConfigError, match=r"run\.imports\[0\]: cannot import 'tests.plugins.no_such_module'"):
        Recipe.from_dict(tables)
