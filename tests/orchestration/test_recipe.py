"""Recipes: the shipped ones load and plan; every mistake is one ConfigError naming its key; the
budget plan spends a budget exactly; identities change exactly when a stage or its input changes."""

from __future__ import annotations

import copy
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hanyeong.errors import ConfigError, DataError
from orchestration.pipeline.recipe import Recipe, load_recipe
from orchestration.pipeline.stage_config import StageConfig
from tests.conftest import REPO

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

RECIPES = REPO / "recipes"
QUICKSTART = RECIPES / "quickstart.toml"


def quickstart() -> dict:
    return tomllib.loads(QUICKSTART.read_text(encoding="utf-8"))


def build(data: dict) -> Recipe:
    return Recipe.from_dict(data, base=RECIPES)


def test_shipped_recipes_load_and_round_trip():
    for path in (QUICKSTART, RECIPES / "exaone-3.5-7.8b.toml"):
        recipe = load_recipe(path)
        assert (
            Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe
        )  # what Ray ships
    quick = load_recipe(QUICKSTART)
    quick.check_inputs()  # the quickstart's inputs ship with the repo
    assert [s.kind for s in quick.stages] == ["pretrain", "pretrain", "pretrain", "sft", "dpo"]
    specs = quick.stage_specs()
    assert specs[0].vocab_size == 8000 and specs[2].rope_theta > specs[1].rope_theta
    assert quick.stages[2].data.replay and quick.stages[3].data.split_documents is False


def test_full_scale_recipe_is_nine_trillion_tokens_to_32k():
    recipe = load_recipe(RECIPES / "exaone-3.5-7.8b.toml")
    pretraining = sum(s.token_budget for s in recipe.stages if s.kind == "pretrain")
    assert abs(pretraining - 9e12) / 9e12 < 0.001
    assert recipe.stage_specs()[-1].max_seq_len == 32_768 and recipe.run.preset == "exaone-3.5-7.8b"
    with pytest.raises(DataError, match=r"run.datasets\[0\].inputs\[0\]"):
        recipe.check_inputs()  # placeholders until pointed at real corpora


def test_model_plan_sums_a_recipe(capsys):
    from typer.testing import CliRunner

    from orchestration.core.cli import app

    result = CliRunner().invoke(
        app, ["plan", "--recipe", str(RECIPES / "exaone-3.5-7.8b.toml"), "--gpus", "1024", "--json"]
    )
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["stages"][0]["name"] == "stage1-general"
    assert plan["total"]["tokens"] == sum(s["tokens"] for s in plan["stages"])
    text = CliRunner().invoke(app, ["plan", "--recipe", str(QUICKSTART)]).output
    assert "stage4-sft" in text and "total" in text


def edit(path: str, value):
    """A change to the quickstart tables at a dotted path (`stage.0.optim.lr`); DELETE removes the key."""

    def apply(data: dict) -> dict:
        data = copy.deepcopy(data)
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        node = data
        for key in parents:
            node = node[key]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
        return data

    return apply


DELETE = object()


@pytest.mark.parametrize("change, message", [
    (edit("run.seeed", 1), r"^run: unknown key\(s\) seeed"),
    (edit("run.seed", "0"), r"^run.seed must be int, got str"),
    (edit("run.preset", "huge"), r"^run.preset: unknown model preset 'huge'"),
    (edit("run.backend", "jax"), r"^run.backend must be one of auto, torch, mlx"),
    (edit("run.vocab_size", 9000), r"^run.vocab_size has vocab_size 9,000 but run.tokenizer.vocab_size is 8,000"),
    (edit("run.tokenizer.vocab_size", 100), r"^run.tokenizer.vocab_size must be at least 512"),
    (edit("run.tokenizer", {"path": "tok", "train_inputs": ["x"]}), r"^run.tokenizer.path: give either path .* or train_inputs"),
    (edit("run.tokenizer.path", "../runs/tok"), r"^run.tokenizer: morphemes, sample, text_fields, vocab_size only apply with train_inputs"),
    (edit("run.datasets.0.format", "image"), r"^run.datasets\[0\].format must be one of text, chat"),
    (edit("run.datasets.1.name", "general"), r"^run.datasets\[1\].name 'general' is used twice"),
    (edit("run.datasets.1.chat", {"messages_fields": "messages"}), r"^run.datasets\[1\].chat.messages_fields must be an array"),
    (edit("run.datasets.0.config", "missing.toml"), r"^run.datasets\[0\].config: .*missing.toml: no such config file"),
    (edit("stage.0.token_budget", 300_000), r"^stage 1 'stage1-general': token_budget 300,000: .* try token_budget = 299,776 or 300,032"),
    (edit("stage.0.seq_len", 4096), r"^stage 1 'stage1-general': batch_tokens \(2,048\) must be a multiple of seq_len \(4,096\)"),
    (edit("stage.0.start", "previous"), r"^stage 1 'stage1-general': start: the first stage has no previous stage"),
    (edit("stage.0.kind", "ppo"), r"^stage 1 'stage1-general': kind must be one of pretrain, sft"),
    (edit("stage.0.optim.total_steps", 10), r"^stage 1 'stage1-general': optim.total_steps is derived"),
    (edit("stage.0.optim.lr", -1.0), r"^stage 1 'stage1-general': optim.lr must be positive"),
    (edit("stage.0.optim.warmup_steps", 500), r"^stage 1 'stage1-general': optim.warmup_steps \(500\) exceeds the stage's 123 steps"),
    (edit("stage.0.seq_len_ramp.0.seq_len", 2048), r"^stage 1 'stage1-general': seq_len_ramp\[0\].seq_len \(2,048\) exceeds the model's max_seq_len \(1,024\)"),
    (edit("stage.0.batch_ramp.0.after_tokens", 999_999), r"^stage 1 'stage1-general': batch_ramp: after_tokens must increase and stay below"),
    (edit("stage.0.data.sources.0.dataset", "web"), r"^stage 1 'stage1-general': data.sources\[0\].dataset: no \[\[run.datasets\]\] named 'web'"),
    (edit("stage.0.data.sources.0.weight", 0), r"^stage 1 'stage1-general': data.sources\[0\].weight must be a positive number"),
    (edit("stage.2.data.replay.0.fraction", 1.5), r"^stage 3 'stage3-long-context': data.replay\[0\].fraction must be a number in \(0, 1\)"),
    (edit("stage.2.rope_theta", 0.5), r"^stage 3 'stage3-long-context': rope_theta must be a number > 1"),
    (edit("stage.2.max_seq_len", 256), r"^stage 3 'stage3-long-context': seq_len \(512\) exceeds the model's max_seq_len \(256\)"),
    (edit("stage.3.data.sources.0.dataset", "general"), r"^stage 4 'stage4-sft': data.sources\[0\].dataset: 'general' is a text dataset; the sources of a 'sft' stage have format 'chat'"),
    (edit("stage.3.data.split_documents", True), r"^stage 4 'stage4-sft': data.split_documents must be false for kind 'sft'"),
    (edit("stage.3.name", "stage1-general"), r"^stage 4 'stage1-general': name is used twice"),
    (edit("stage.3.start", "../no/such/checkpoint"), r"^stage 4 'stage4-sft': start: .*no checkpoint directory there"),
    (edit("stage.1.checkpoint_every_tokens", 0), r"^stage 2 'stage2-domain': checkpoint_every_tokens must be a positive integer"),
    (edit("stage.0.workers", 0), r"^stage 1 'stage1-general': workers must be a positive integer"),
    (edit("stage.0.workers", 32), r"^stage 1 'stage1-general': workers: the step at 0 tokens has 16 rows: too few for 32 worker\(s\)"),
    (edit("stage.0.parallelism", "tp"), r"^stage 1 'stage1-general': parallelism must be one of auto, ddp, fsdp"),
    (edit("stage.0.resources", {"gpu": 1}), r"^stage 1 'stage1-general': resources: unknown key\(s\) gpu"),
    (edit("stage.0.resources", {"cpus": -1}), r"^stage 1 'stage1-general': resources.cpus must be a positive number"),
    (lambda d: edit("stage.0.parallelism", "fsdp")(edit("run.backend", "mlx")(d)), r"^stage 1 \S+: parallelism = 'fsdp': .* 'ddp' only"),
    (lambda d: edit("stage.0.resources", {"gpus": 1})(edit("run.backend", "mlx")(d)), r"^stage 1 \S+: resources.gpus: backend 'mlx' takes no GPUs"),
    (edit("stage", []), r"^stage: a recipe needs at least one"),
    (edit("runs", {}), r"^unknown table\(s\) runs"),
])  # fmt: skip
def test_every_mistake_is_one_config_error_naming_its_key(change, message):
    with pytest.raises(ConfigError, match=message):
        build(change(quickstart()))


def test_a_recipe_file_error_names_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[run]\nname = 'x'\n[[stage]]\nname = \n")
    with pytest.raises(ConfigError, match=r"bad.toml: not valid TOML"):
        load_recipe(path)
    with pytest.raises(ConfigError, match=r"nope.toml: no such recipe file"):
        load_recipe(tmp_path / "nope.toml")


def test_relative_paths_resolve_against_the_recipe_file(tmp_path):
    recipe = load_recipe(QUICKSTART)
    assert recipe.run.tokenizer.train_inputs == (str(REPO / "data" / "quickstart"),)
    assert recipe.dataset("chat").inputs == (str(REPO / "data" / "quickstart" / "sft"),)
    assert recipe.dataset("general").config == str(RECIPES / "prepare-quickstart.toml")


@settings(max_examples=200, deadline=None)
@given(seq_len=st.sampled_from([16, 32, 64]), rows=st.integers(1, 8), steps=st.integers(1, 40),
       extra_rows=st.integers(0, 7), ramp=st.one_of(st.none(), st.tuples(st.integers(1, 2000), st.sampled_from([32, 64, 128]))),
       batch_ramp=st.one_of(st.none(), st.tuples(st.integers(1, 2000), st.integers(1, 4))))  # fmt: skip
def test_the_plan_spends_the_budget_exactly(seq_len, rows, steps, extra_rows, ramp, batch_ramp):
    final = max(seq_len, ramp[1] if ramp else 0)
    table = {"name": "s", "token_budget": steps * rows * seq_len + extra_rows * final, "seq_len": seq_len,
             "batch_tokens": rows * 128, "data": {"sources": [{"dataset": "d"}]}}  # fmt: skip
    if ramp and ramp[0] < table["token_budget"]:
        table["seq_len_ramp"] = [{"after_tokens": ramp[0], "seq_len": ramp[1]}]
    if batch_ramp and batch_ramp[0] < table["token_budget"]:
        table["batch_ramp"] = [{"after_tokens": batch_ramp[0], "batch_tokens": batch_ramp[1] * 256}]
    try:
        stage = StageConfig.from_dict(table)
    except ConfigError as err:
        assert re.search(r"whole number of rows|must be a multiple of seq_len", str(err))
        return
    # stepping one step at a time, as run_stage does, visits exactly the planned shapes
    tokens, walked = 0, []
    while tokens < stage.token_budget:
        seq, n = stage.shape_at(tokens)
        assert n >= 1
        walked.append((seq, n))
        tokens += seq * n
    assert tokens == stage.token_budget
    assert walked == [(seq, n) for count, seq, n in stage.plan() for _ in range(count)]
    assert stage.train_optim.total_steps == len(walked)


def identities(data: dict) -> list[str]:
    return build(data).stage_identities()


def test_identities_change_exactly_with_a_stage_and_what_it_starts_from():
    base = identities(quickstart())
    assert len(set(base)) == 5
    same = [edit("stage.1.checkpoint_every_tokens", 50_000), edit("run.backend", "torch"),
            edit("stage.1.workers", 2), edit("stage.1.parallelism", "fsdp"),
            edit("stage.1.resources", {"cpus": 4, "gpus": 1}),
            edit("stage.1.activation_checkpointing", True),  # the same weights, for less memory
            edit("stage.1.activation_checkpointing", False)]  # how a stage runs, not what it computes
    for change in same:  # no effect on the result: nothing reruns
        assert identities(change(quickstart())) == base
    # stage 2 changes: it and every later 'previous' stage rerun, stage 1 does not
    changed = identities(edit("stage.1.optim.lr", 1e-3)(quickstart()))
    assert changed[0] == base[0] and all(a != b for a, b in zip(changed[1:], base[1:]))
    # the chat dataset is read by the SFT stage only
    changed = identities(
        edit("run.datasets.1.chat", {"system_prompt": "You are EXAONE."})(quickstart())
    )
    assert changed[:3] == base[:3] and changed[3] != base[3]
    # the init stage's input: model, seed, tokenizer
    for change in (edit("run.seed", 1), edit("run.tokenizer.min_frequency", 3)):
        assert all(a != b for a, b in zip(identities(change(quickstart())), base))


def test_a_checkpoint_start_is_identified_by_its_content(tmp_path):
    from orchestration.core.backends import get_backend
    from orchestration.core.presets import get_preset

    backend = get_backend("torch")
    spec = get_preset("tiny").replace(vocab_size=8000)
    backend.save(backend.init(spec, seed=0), tmp_path / "ckpt")
    data = edit("stage.2.start", str(tmp_path / "ckpt"))(quickstart())
    first = identities(data)
    assert first[:2] == identities(quickstart())[:2]  # stages before it do not depend on it
    backend.save(backend.init(spec, seed=1), tmp_path / "ckpt")  # other weights, same path
    second = identities(data)
    assert second[:2] == first[:2] and second[2] != first[2] and second[3] != first[3]


# ---- activation checkpointing: where it is set, and what the plan makes of it ---------------------


def test_activation_checkpointing_is_the_stages_else_its_presets_default(monkeypatch):
    from orchestration.core import presets

    recipe = build(edit("stage.1.activation_checkpointing", True)(quickstart()))
    assert [s.activation_checkpointing for s in recipe.stages[:3]] == [None, True, None]
    assert "activation_checkpointing" not in recipe.stages[0].to_dict()  # unset: not in the table
    assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe  # what Ray ships
    assert [s.recomputes_activations(recipe.run.preset) for s in recipe.stages[:2]] == [False, True]
    assert presets.activation_checkpointing("exaone-3.5-32b") and not presets.activation_checkpointing(None)
    monkeypatch.setattr(presets, "ACTIVATION_CHECKPOINTING", frozenset({"tiny"}))  # quickstart's preset
    off = build(edit("stage.1.activation_checkpointing", False)(quickstart()))
    assert [s.recomputes_activations(off.run.preset) for s in off.stages[:2]] == [True, False]
    with pytest.raises(ConfigError, match=r"^stage 1 'stage1-general': activation_checkpointing must be bool"):
        build(edit("stage.0.activation_checkpointing", "yes")(quickstart()))


def test_the_recipe_plan_costs_each_stage_as_it_trains():
    from orchestration.core.plan import PlanConfig
    from orchestration.pipeline.recipe_plan import plan_recipe

    data = edit("stage.1.activation_checkpointing", True)(quickstart())
    data = edit("stage.2.optim.grad_accum_steps", 2)(data)
    recipe, config = build(data), PlanConfig(tokens=1.0)
    stages = plan_recipe(recipe, config)["stages"]
    assert [s["activation_checkpointing"] for s in stages[:3]] == [False, True, False]
    assert "dpo" in [s.kind for s in recipe.stages]  # the pairs rule below is exercised
    for stage, planned, spec in zip(recipe.stages, stages, recipe.stage_specs()):
        seq_len, rows = max(((t, r) for _, t, r in stage.plan()), key=lambda x: x[0] * x[1])
        # a preference row is its chosen and rejected answers: two sequences through the model
        pairs = 2 if stage.kind in ("dpo", "ipo", "simper", "reward", "online-dpo") else 1
        assert stage.stage_kind.sequences_per_row == pairs
        micro = pairs * -(-rows // stage.optim.grad_accum_steps)
        assert planned["micro_batch"] == {"rows": micro, "seq_len": seq_len}
        recompute = planned["activation_checkpointing"]
        memory = spec.memory_bytes(seq_len, micro, activation_checkpointing=recompute)
        assert planned["memory_per_device_bytes"] == memory
        assert (planned["recompute_flops"] > 0) == planned["activation_checkpointing"]
    everywhere = plan_recipe(recipe, config, activation_checkpointing=True)["stages"]
    assert all(s["activation_checkpointing"] for s in everywhere)
    activations = [s[0]["memory_per_device_bytes"]["activations"] for s in (everywhere, stages)]
    assert activations[0] < activations[1]
    assert everywhere[0]["wall_clock_seconds"] > stages[0]["wall_clock_seconds"]  # the second forward
    assert everywhere[1] == stages[1]


@pytest.mark.parametrize("backend_name", ["torch", "mlx"])
def test_the_recipe_plan_micro_batch_is_the_steps_own(backend_name):
    """recipe_plan.micro_batch_rows against the rows each backend's step puts in a micro-batch on
    a rank: rank_rows, then cuda_model/step.local_split or mlx_model/step.split."""
    from orchestration.core.batch import Batch
    from orchestration.core.parallel import rank_rows
    from orchestration.pipeline.recipe_plan import micro_batch_rows

    if backend_name == "torch":
        torch = pytest.importorskip("torch")
        from cuda_model.step import local_split

        def sizes(batch, accum, workers):
            micros = local_split({"inputs": torch.from_numpy(batch.inputs)}, accum)
            return [m["inputs"].shape[0] for m in micros]
    else:
        pytest.importorskip("mlx.core")
        from mlx_model.step import split

        def sizes(batch, accum, workers):
            return [m["inputs"].shape[0] for m in split(batch, accum, workers)]

    import numpy as np

    for rows, workers, accum in [(8, 1, 1), (8, 1, 3), (512, 256, 1), (2048, 256, 4), (5, 2, 2),
                                 (256, 64, 4), (7, 3, 2), (9, 4, 3), (3, 2, 4)]:  # fmt: skip
        batch = Batch.from_tokens(np.zeros((rows, 5), np.int64))
        largest = max(max(sizes(rank_rows(batch, r, workers), accum, workers), default=0)
                      for r in range(workers))  # fmt: skip
        assert micro_batch_rows(rows, workers, accum, backend_name) == largest, (rows, workers, accum)


def test_the_full_scale_recipe_fits_its_gpus_by_the_plan():
    """recipes/exaone-3.5-7.8b.toml on 256 H100s: every stage fits as it trains, with the
    checkpointing its stages set; keeping every activation, the 8K and 32K stages would not."""
    from orchestration.core.plan import GPUS, PlanConfig
    from orchestration.pipeline.recipe_plan import plan_recipe

    recipe, config = load_recipe(RECIPES / "exaone-3.5-7.8b.toml"), PlanConfig(tokens=1.0, gpus=256)
    plan = plan_recipe(recipe, config)
    assert all(s["fits"] for s in plan["stages"]), [s["name"] for s in plan["stages"] if not s["fits"]]
    assert [s["activation_checkpointing"] for s in plan["stages"]] == [True] * 5 + [False] * 2
    assert max(s["memory_per_device_bytes"]["total"] for s in plan["stages"]) <= 0.75 * GPUS["h100"][1]
    kept = plan_recipe(recipe, config, activation_checkpointing=False)["stages"]
    assert [s["fits"] for s in kept] == [False] * 5 + [True] * 2
