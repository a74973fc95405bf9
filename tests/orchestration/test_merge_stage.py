"""WARP as a recipe step ([stage.merge]): a stage starts from the merge of earlier stages' final
checkpoints (SLERP of their task vectors from its start, then LITI toward it), exactly what `model
average` writes, and trains on from there; the recipe refuses merges it cannot make."""

from __future__ import annotations

import numpy as np
import pytest

from hanyeong.errors import ConfigError
from orchestration.core.checkpoint import MODEL_FILE
from orchestration.pipeline.recipe import Recipe
from orchestration.pipeline.recipe_checks import check_stages, stage_specs
from orchestration.pipeline.stage import run_stage
from tests.orchestration.test_stage import datasets, one_thread, recipe_tables, request, weights  # noqa: F401


def warp_tables(tokenizer, data, base: str, **merge) -> dict:
    """Stage 1 and 2: two policies from `base` (never run here: their checkpoints are placed);
    stage 3: starts from `base`, merged with them."""
    tables = recipe_tables(tokenizer, data)
    policy = {**tables["stage"][0], "start": base, "seq_len_ramp": [], "batch_ramp": [], "token_budget": 2048}
    warp = {**policy, "name": "warp", "merge": {"stages": ["a", "b"], "method": "warp", "t": 0.5, "eta": 0.3} | merge}
    tables["stage"] = [{**policy, "name": "a"}, {**policy, "name": "b"}, warp]
    return tables


def test_a_merge_stage_starts_from_the_warp_of_its_policies(small_tokenizer_dir, datasets, tmp_path):  # noqa: F811
    from safetensors.numpy import load_file

    from orchestration.core.backends import get_backend
    from orchestration.core.merge import average

    backend, run = get_backend("torch"), tmp_path / "run"
    spec = Recipe.from_dict(recipe_tables(small_tokenizer_dir, datasets)).run.model_spec()
    backend.save(backend.init(spec, seed=0), tmp_path / "base")
    tables = warp_tables(small_tokenizer_dir, datasets, str(tmp_path / "base"))
    for k, name in enumerate(("a", "b"), start=1):  # two "policies": other draws of the same shape
        backend.save(backend.init(spec, seed=k), run / "stages" / f"0{k}-{name}" / "checkpoint")
    result = run_stage(request(tables, 2, run / "stages" / "03-warp", small_tokenizer_dir, datasets))
    assert result["steps"] == 2
    expected = average([run / "stages" / "01-a" / "checkpoint", run / "stages" / "02-b" / "checkpoint"],
                       tmp_path / "expected", method="warp", t=0.5, eta=0.3, base=tmp_path / "base")  # fmt: skip
    got, want = load_file(run / "stages" / "03-warp" / "merged" / MODEL_FILE), load_file(expected / MODEL_FILE)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    assert not np.array_equal(weights(result["checkpoint"])["model.norm.weight"], want["model.norm.weight"])


def test_merges_the_recipe_cannot_make_are_one_line(small_tokenizer_dir, datasets, tmp_path):  # noqa: F811
    from orchestration.core.backends import get_backend

    spec = Recipe.from_dict(recipe_tables(small_tokenizer_dir, datasets)).run.model_spec()
    get_backend("torch").save(get_backend("torch").init(spec, seed=0), tmp_path / "base")
    tables = warp_tables(small_tokenizer_dir, datasets, str(tmp_path / "base"), stages=["a", "later"])
    with pytest.raises(ConfigError, match=r"stage 3 'warp': merge.stages: 'later' is not an earlier stage"):
        check_stages(Recipe.from_dict(tables))
    tables = warp_tables(small_tokenizer_dir, datasets, str(tmp_path / "base"), method="ema")
    with pytest.raises(ConfigError, match=r"method: ema merges a run's checkpoints in order"):
        Recipe.from_dict(tables)
    tables = warp_tables(small_tokenizer_dir, datasets, str(tmp_path / "base"), stages=["a"])
    with pytest.raises(ConfigError, match=r"warp needs at least 2 checkpoints"):
        Recipe.from_dict(tables)
    tables = recipe_tables(small_tokenizer_dir, datasets)
    tables["stage"][1]["merge"] = {"stages": ["pretrain"], "method": "linear"}  # a linear merge of one: the start
    assert stage_specs(Recipe.from_dict(tables))[1].n_layers == Recipe.from_dict(tables).run.model_spec().n_layers
