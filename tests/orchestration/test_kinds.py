"""The stage-kind registry: the two kinds the recipes use, a new kind added by one register_kind
line (its loss, formats, rows and loader read by the recipe checks and run_stage), unknown names."""

from __future__ import annotations

import copy

import pytest

from hanyeong.errors import ConfigError
from orchestration.data.manifest import DATASET_FORMATS
from orchestration.pipeline.kinds import KINDS, StageKind, get_kind, mixture_loader, register_kind
from orchestration.pipeline.recipe import Recipe
from orchestration.pipeline.stage import build_loader
from tests.orchestration.test_recipe import RECIPES, quickstart


def test_the_recipes_kinds():
    pretrain, sft = get_kind("pretrain"), get_kind("sft")
    assert (pretrain.loss, pretrain.formats, pretrain.whole_documents) == ("causal_lm", ("text", "chat"), False)
    assert (sft.loss, sft.formats, sft.whole_documents) == ("sft", ("chat",), True)
    assert pretrain.loader is sft.loader is mixture_loader


def test_an_unknown_kind_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"^kind must be one of pretrain, sft, dpo, ipo, simper.*grpo, got 'ppo'"):
        get_kind("ppo")
    with pytest.raises(ConfigError, match=r"formats must be some of text, chat, preference, got \['pairs'\]"):
        register_kind(StageKind("ppo", loss="ppo", formats=("pairs",), whole_documents=True))
    assert "ppo" not in KINDS


@pytest.fixture
def toy_kind():
    """A kind of whole text documents with its own loader, registered for one test."""
    calls = []

    def loader(mixture, seq_len, rows, seed):
        calls.append((mixture, seq_len, rows, seed))
        return "the toy loader"

    register_kind(StageKind("toy", loss="toy_loss", formats=("text",), whole_documents=True, loader=loader))
    yield calls
    del KINDS["toy"]


def toy_recipe(**data) -> dict:
    tables = copy.deepcopy(quickstart())
    tables["stage"][1]["kind"] = "toy"
    tables["stage"][1]["data"].update(data)
    return tables


def test_a_new_kind_is_one_register_kind_line(toy_kind):
    recipe = Recipe.from_dict(toy_recipe(), base=RECIPES)
    stage = recipe.stages[1]
    assert stage.loss == "toy_loss" and stage.stage_kind is KINDS["toy"]
    assert stage.data.split_documents is False  # whole documents: the kind's default
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    # run_stage builds the stage's loader as its kind says, datasets mapped to their directories
    assert build_loader(stage, {"general": "/data/general"}, seed=7) == "the toy loader"
    mixture, seq_len, rows, seed = toy_kind[0]
    assert mixture.sources[0].dataset == "/data/general" and (seq_len, rows, seed) == (*stage.shape_at(0), 7)


def test_a_new_kinds_rules_are_checked(toy_kind):
    with pytest.raises(ConfigError, match=r"^stage 2 'stage2-domain': data.split_documents must be false for kind 'toy'"):
        Recipe.from_dict(toy_recipe(split_documents=True), base=RECIPES)
    chat = toy_recipe(sources=[{"dataset": "chat"}])
    with pytest.raises(ConfigError, match=r"^stage 2 'stage2-domain': data.sources\[0\].dataset: 'chat' is a chat "
                                          r"dataset; the sources of a 'toy' stage have format 'text'"):  # fmt: skip
        Recipe.from_dict(chat, base=RECIPES)
