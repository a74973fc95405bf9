"""Up-scaling inside a recipe (a stage's `upscale`): the plan knows the new depth; the stage starts
from its start checkpoint's layers copied bit for bit in the stated order, its loss right after the
up-scaling recorded (eval.jsonl's step-0 line, a note) before it trains on; mistakes are one
ConfigError. The shipped recipes (solar-dus, distill) load and plan; data_seed gives two stages the
same rows."""

# ruff: noqa: E402  (the imports below follow the importorskip that guards them)

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cuda_model.backend import BACKEND
from hanyeong.errors import ConfigError
from orchestration.core.plan import PlanConfig
from orchestration.pipeline.recipe import Recipe, load_recipe
from orchestration.pipeline.recipe_plan import plan_recipe
from orchestration.pipeline.stage import UPSCALED, run_stage
from tests.conftest import REPO
from tests.orchestration.test_stage import datasets, metrics, one_thread, weights  # noqa: F401  (fixtures)

VOCAB, T, ROWS = 3000, 32, 8


def tables(tokenizer, datasets: dict, upscale: str = "0:3,1:4") -> dict:  # noqa: F811
    """A 4-layer tiny model pretrained 4 steps, then up-scaled and trained 4 more, both evaluated."""
    base = {"kind": "pretrain", "token_budget": T * ROWS * 4, "seq_len": T, "batch_tokens": T * ROWS,
            "data": {"sources": [{"dataset": "general", "weight": 1.0}]}, "optim": {"lr": 3e-3, "warmup_steps": 1},
            "eval": {"documents": 8}}  # fmt: skip
    stages = [{**copy.deepcopy(base), "name": "pretrain", "start": "init"},
              {**copy.deepcopy(base), "name": "upscaled", "start": "previous", "upscale": upscale}]  # fmt: skip
    return {"run": {"name": "t", "preset": "tiny-4l", "vocab_size": VOCAB, "backend": "torch",
                    "tokenizer": {"path": str(tokenizer)}, "datasets": [{"name": "general", "path": datasets["general"]}]},
            "stage": stages}  # fmt: skip


def request(tables: dict, index: int, stage_dir: Path, tokenizer, datasets: dict, init_from=None) -> dict:  # noqa: F811
    return {"recipe": Recipe.from_dict(tables).to_dict(), "index": index, "stage_dir": str(stage_dir),
            "init_from": init_from, "tokenizer": str(tokenizer), "datasets": datasets, "backend": "torch"}  # fmt: skip


def evals(stage_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "eval.jsonl").read_text().splitlines()]


def test_an_upscale_stage_starts_from_the_stated_layers_and_records_its_loss(small_tokenizer_dir, datasets, tmp_path):  # noqa: F811
    t = tables(small_tokenizer_dir, datasets)
    recipe = Recipe.from_dict(t)
    assert [s.n_layers for s in recipe.stage_specs()] == [4, 6]
    first = run_stage(request(t, 0, tmp_path / "01-pretrain", small_tokenizer_dir, datasets))
    stage_dir = tmp_path / "02-upscaled"
    result = run_stage(request(t, 1, stage_dir, small_tokenizer_dir, datasets, init_from=first["checkpoint"]))
    before, start = weights(first["checkpoint"]), weights(stage_dir / UPSCALED)
    for new, old in enumerate([0, 1, 2, 1, 2, 3]):  # SOLAR: layers [0, 3) then [1, 4)
        for name in [k for k in before if k.startswith(f"model.layers.{old}.")]:
            assert np.array_equal(start[name.replace(f"layers.{old}.", f"layers.{new}.")], before[name])
    assert {k for k in start if ".layers." not in k} == {k for k in before if ".layers." not in k}
    assert all(np.array_equal(start[k], before[k]) for k in start if ".layers." not in k)
    assert BACKEND.load(result["checkpoint"]).spec.n_layers == 6
    lines = evals(stage_dir)
    assert [line["step"] for line in lines] == [0, 4]  # right after up-scaling, and at the end
    assert lines[0]["val_loss"].keys() == evals(tmp_path / "01-pretrain")[-1]["val_loss"].keys()
    assert any(note.startswith("up-scaled to 6 layers (0:3,1:4): validation loss before any step") for note in result["notes"])
    assert result["first_loss"] is not None and result["last_loss"] < result["first_loss"]
    again = run_stage(request(t, 1, stage_dir, small_tokenizer_dir, datasets, init_from=first["checkpoint"]))
    assert again["resumed_from_step"] == 4 and [line["step"] for line in evals(stage_dir)] == [0, 4]


@pytest.mark.parametrize("change, message", [
    (lambda t: t["stage"][1].update(upscale="0:5"), r"^stage 2 'upscaled': upscale: 0:5 must satisfy 0 <= start < end <= 4"),
    (lambda t: t["stage"][1].update(upscale="0-3"), r"^stage 2 'upscaled': upscale: '0-3' is not a range START:END"),
    (lambda t: t["stage"][0].update(upscale="0:2"), r"^stage 1 'pretrain': upscale: a fresh init has nothing to up-scale"),
])  # fmt: skip
def test_upscale_mistakes_are_one_config_error(small_tokenizer_dir, datasets, change, message):  # noqa: F811
    t = tables(small_tokenizer_dir, datasets)
    change(t)
    with pytest.raises(ConfigError, match=message):
        Recipe.from_dict(t)


def test_the_shipped_recipes_load_and_plan():
    solar = load_recipe(REPO / "recipes" / "solar-dus.toml")
    assert Recipe.from_dict(json.loads(json.dumps(solar.to_dict()))) == solar
    assert [s.n_layers for s in solar.stage_specs()] == [4, 6] and solar.stages[1].upscale == "0:3,1:4"
    plan = plan_recipe(solar, PlanConfig(tokens=1.0))
    assert [s["n_layers"] for s in plan["stages"]] == [4, 6]
    assert plan["stages"][1]["parameters"] > plan["stages"][0]["parameters"]
    distill = load_recipe(REPO / "recipes" / "distill.toml")
    assert Recipe.from_dict(json.loads(json.dumps(distill.to_dict()))) == distill
    assert [s.loss for s in distill.stages] == ["causal_lm", "afm", "soft", "causal_lm"]
    students = distill.stages[1:]
    assert {(s.data_seed, s.token_budget, s.start, s.data) for s in students} == {(1, 153_600, "init", students[0].data)}
    assert {s.eval.documents for s in distill.stages} == {64}  # one held-out set for every stage
    assert [s.distill.teacher for s in students[:2]] == ["teacher", "teacher"]
    assert plan_recipe(distill, PlanConfig(tokens=1.0))["total"]["tokens_by_kind"] == {"pretrain": 768_000, "distill": 307_200}


def test_stages_of_one_data_seed_draw_the_same_rows(small_tokenizer_dir, datasets, tmp_path, monkeypatch):  # noqa: F811
    t = tables(small_tokenizer_dir, datasets)
    t["stage"] = [{**t["stage"][0], "name": f"s{i}", "token_budget": T * ROWS, "data_seed": 1} for i in range(2)]
    t["stage"].append({**t["stage"][0], "name": "other", "data_seed": None})
    del t["stage"][2]["data_seed"]
    seen, real = [], BACKEND.train_step

    def recording(state, batch, loss="causal_lm"):
        seen.append(batch.inputs.copy())
        return real(state, batch, loss)

    monkeypatch.setattr(BACKEND, "train_step", recording)
    for i in range(3):
        run_stage(request(t, i, tmp_path / f"s{i}", small_tokenizer_dir, datasets))
    assert np.array_equal(seen[0], seen[1]) and not np.array_equal(seen[0], seen[2])
    assert metrics(tmp_path / "s0")[0]["loss"] == metrics(tmp_path / "s1")[0]["loss"]
