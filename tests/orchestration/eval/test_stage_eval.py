"""[stage.eval]: its table's checks, and that it is no part of a stage's identity (the quickstart's
run through tests/test_readme.py shows the eval lines, status column, eval.png and report.md)."""

from __future__ import annotations

import pytest

from hanyeong.errors import ConfigError
from orchestration.pipeline.stage_eval import StageEvalConfig
from tests.conftest import REPO


def test_the_eval_table_is_checked():
    assert StageEvalConfig(tasks="kobest_copa", limit=5).documents == 16
    with pytest.raises(ConfigError, match="^limit must be a positive integer"):
        StageEvalConfig(limit=0)
    with pytest.raises(ConfigError, match="^documents must be 0 or more"):
        StageEvalConfig(documents=-1)


def test_eval_settings_do_not_change_a_stages_identity():
    import dataclasses

    from orchestration.pipeline.recipe import load_recipe

    recipe = load_recipe(REPO / "recipes" / "quickstart.toml")
    assert all(stage.eval is not None for stage in recipe.stage)
    plain = dataclasses.replace(recipe, stage=[dataclasses.replace(s, eval=None) for s in recipe.stage])
    assert plain.stage_identities() == recipe.stage_identities()
