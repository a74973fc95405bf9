"""[stage.eval]: its table's checks, and that it is no part of a stage's identity but for the
documents it holds out of training (the quickstart's
run through tests/test_readme.py shows the eval lines, status column, eval.png and report.md)."""

from __future__ import annotations

import copy

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


def quickstart_tables() -> dict:
    from orchestration.pipeline.recipe import load_recipe

    return load_recipe(REPO / "recipes" / "quickstart.toml").to_dict()


def identities(tables: dict) -> list[str]:
    from orchestration.pipeline.recipe import Recipe

    return Recipe.from_dict(tables).stage_identities()


def test_eval_settings_do_not_change_a_stages_identity_but_its_held_out_documents_do():
    tables = quickstart_tables()
    assert all("eval" in stage for stage in tables["stage"])
    kinds = [stage["kind"] for stage in tables["stage"]]
    # Tasks, limits and timing are not part of a stage's identity.
    other = copy.deepcopy(tables)
    for stage in other["stage"]:
        stage["eval"] |= {"tasks": "kobest_wic", "limit": 3, "every_tokens": 999}
    assert identities(other) == identities(tables)
    # The validation documents are held out of training (16 per source by default): without
    # [stage.eval] the document stages train on them, so they are other stages.
    assert [stage["data"]["hold_out"] for stage in tables["stage"]] == [0 if k == "dpo" else 16 for k in kinds]
    plain = copy.deepcopy(tables)
    for stage in plain["stage"]:
        del stage["eval"], stage["data"]["hold_out"]
    assert [stage["data"]["hold_out"] for stage in resolved_stages(plain)] == [0] * len(kinds)
    assert identities(plain)[0] != identities(tables)[0]
    # ... and [stage.eval] with data.hold_out = 0 trains on what the plain stage trains on.
    unheld = copy.deepcopy(tables)
    for stage in unheld["stage"]:
        stage["data"]["hold_out"] = 0
    assert identities(unheld) == identities(plain)


def resolved_stages(tables: dict) -> list[dict]:
    """The [[stage]] tables with every default filled in (data.hold_out resolved)."""
    from orchestration.pipeline.recipe import Recipe

    return Recipe.from_dict(tables).to_dict()["stage"]


def test_hold_out_is_for_stages_that_read_documents():
    tables = quickstart_tables()
    dpo = next(i for i, stage in enumerate(tables["stage"]) if stage["kind"] == "dpo")
    tables["stage"][dpo]["data"]["hold_out"] = 4
    with pytest.raises(ConfigError, match=r"^stage \d+ '[^']+': data.hold_out is for kinds that read documents"):
        identities(tables)


@pytest.mark.parametrize("hold_out", [4, 0])
def test_validation_loss_scores_the_held_out_documents(tmp_path, hold_out):
    import numpy as np

    from orchestration.core.backends import get_backend
    from orchestration.core.batch import Batch
    from orchestration.core.spec import ModelSpec
    from orchestration.data.loader import MixtureConfig, MixtureLoader, SourceWeight
    from orchestration.pipeline.stage_eval import validation_loss
    from tests.orchestration.data.test_loader import VOCAB, make_docs, write_dataset

    docs = make_docs(np.random.default_rng(0), 50, 5, 30, iter(range(VOCAB - 100, VOCAB)))
    write_dataset(tmp_path / "web", {"web": docs})
    source = MixtureLoader(MixtureConfig((SourceWeight(str(tmp_path / "web")),), hold_out=hold_out), 16, 2).sources[0]
    backend = get_backend("torch")
    model = backend.init(ModelSpec(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64,
                                   max_seq_len=64), seed=0)  # fmt: skip
    scored = []

    class Recording:  # the torch backend, noting which documents (by their tag token) it scores
        def logprobs(self, model, batch):
            scored.extend(int(tag) for tag in batch.inputs[:, 1])
            return backend.logprobs(model, batch)

    loss = validation_loss(Recording(), model, source, 16, 20, batch_rows=3)
    if hold_out:  # all four held-out documents (a tenth of 50 is 5), never a training one
        assert sorted(scored) == sorted(docs[i][1] for i in source.held) and len(scored) == 4
    else:  # no held-out document: a fixed sample of 16 training documents
        assert len(set(scored)) == 16
    cut = [np.array(docs[[d[1] for d in docs].index(tag)][:21]) for tag in scored]  # seq_len + 1 tokens
    nats = [-backend.logprobs(model, Batch(d[None, :-1], d[None, 1:])).sum() for d in cut]
    assert loss == pytest.approx(sum(nats) / sum(len(d) - 1 for d in cut), abs=1e-5)


def test_a_reward_stage_takes_no_benchmark_tasks_and_other_kinds_no_reward_table():
    tables = quickstart_tables()
    dpo = next(i for i, stage in enumerate(tables["stage"]) if stage["kind"] == "dpo")
    reward = copy.deepcopy(tables)
    reward["stage"][dpo]["kind"] = "reward"
    del reward["stage"][dpo]["preference"]
    with pytest.raises(ConfigError, match=r"eval.tasks: benchmark tasks score a language model; a 'reward' stage"):
        identities(reward)
    reward["stage"][dpo]["eval"]["tasks"] = ""
    reward["stage"][dpo]["reward"] = {"center_rewards_coefficient": 0.01}
    assert len(identities(reward)) == len(tables["stage"])
    tables["stage"][0]["reward"] = {}
    with pytest.raises(ConfigError, match=r"reward: \[stage.reward\] is for kinds reward, not 'pretrain'"):
        identities(tables)
