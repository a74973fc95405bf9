"""Online DPO (kind `online-dpo`, through run_stage): a reward model that prefers answers in the
prompt's language ranks the policy's own samples round by round; DPO on them raises the reward of
the policy's greedy answers to held-back prompts; rounds are kept in the stage folder, and a stage
killed mid-round and rerun in another process ends on the uninterrupted run's weights."""

# ruff: noqa: E402

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hanyeong.errors import ConfigError
from orchestration.data.chat_dataset import prepare_chat
from orchestration.pipeline.recipe import Recipe
from orchestration.pipeline.stage import run_stage
from tests.conftest import quickstart_english, quickstart_korean
from tests.orchestration.test_preference_stage import write_jsonl
from tests.orchestration.test_reward_stage import pairs  # noqa: F401  (the language pairs, prepared)
from tests.orchestration.test_reward_stage import request as reward_request
from tests.orchestration.test_stage import one_thread, weights  # noqa: F401  (one_thread: autouse)

VOCAB, T = 3000, 64
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def reward_model(small_tokenizer_dir, pairs, tmp_path_factory) -> str:  # noqa: F811
    """A reward model trained (40 steps) to prefer answers in the prompt's language."""
    root = tmp_path_factory.mktemp("rm")
    return run_stage(reward_request(small_tokenizer_dir, pairs, root / "rm", steps=40))["checkpoint"]


@pytest.fixture(scope="module")
def prompts(small_tokenizer_dir, tmp_path_factory) -> str:
    """A chat dataset of 200 short questions, half Korean, half English (its answers are unused)."""
    root = tmp_path_factory.mktemp("prompts")
    korean = [t[:30] for t in quickstart_korean(400) if len(t) > 20][:100]
    english = [t[:30] for t in quickstart_english() if len(t) > 30][:100]
    records = [{"question": q, "answer": "-"} for q in korean + english]
    prepare_chat([str(write_jsonl(root / "q.jsonl", records))], small_tokenizer_dir, root / "chat")
    return str(root / "chat")


@pytest.fixture(scope="module")
def policy(small_tokenizer_dir, tmp_path_factory) -> str:
    """A policy that answers in Korean or English at random, whatever the question's language: SFT
    (40 steps) on questions paired with an answer of a random language."""
    root = tmp_path_factory.mktemp("policy")
    rng = np.random.default_rng(0)
    korean = [t[:40] for t in quickstart_korean(1200) if len(t) > 20][200:600]
    english = [t[:40] for t in quickstart_english() if len(t) > 30][200:600]
    questions = korean[:200] + english[:200]
    answers = [(korean if rng.random() < 0.5 else english)[200 + i % 200] for i in range(len(questions))]
    records = [{"question": q, "answer": a} for q, a in zip(questions, answers)]
    prepare_chat([str(write_jsonl(root / "sft.jsonl", records))], small_tokenizer_dir, root / "chat")
    table = {"name": "sft", "kind": "sft", "start": "init", "token_budget": T * 16 * 40, "seq_len": T,
             "batch_tokens": T * 16, "data": {"sources": [{"dataset": "chat", "weight": 1.0}]},
             "optim": {"lr": 3e-3, "warmup_steps": 2}}  # fmt: skip
    tables = {"run": {"name": "t", "preset": "tiny", "vocab_size": VOCAB, "backend": "torch",
                      "tokenizer": {"path": str(small_tokenizer_dir)},
                      "datasets": [{"name": "chat", "path": str(root / "chat"), "format": "chat"}]},
              "stage": [table]}  # fmt: skip
    config = {"recipe": Recipe.from_dict(tables).to_dict(), "index": 0, "stage_dir": str(root / "sft"),
              "tokenizer": str(small_tokenizer_dir), "datasets": {"chat": str(root / "chat")}, "backend": "torch"}  # fmt: skip
    return run_stage(config)["checkpoint"]


def request(tokenizer, prompts: str, reward: str, stage_dir: Path, steps: int, **stage) -> dict:
    online = {"reward": reward, "prompts_per_round": 16, "samples": 4, "max_new_tokens": 12, "held_out": 16,
              "beta": 0.1}  # fmt: skip
    table = {"name": "online", "kind": "online-dpo", "start": "init", "token_budget": T * 8 * steps, "seq_len": T,
             "batch_tokens": T * 8, "data": {"sources": [{"dataset": "prompts", "weight": 1.0}]},
             "optim": {"lr": 1e-2, "warmup_steps": 2}, "online": online, **stage}  # fmt: skip
    tables = {"run": {"name": "t", "preset": "tiny", "vocab_size": VOCAB, "backend": "torch",
                      "tokenizer": {"path": str(tokenizer)},
                      "datasets": [{"name": "prompts", "path": prompts, "format": "chat"}]},
              "stage": [table]}  # fmt: skip
    return {"recipe": Recipe.from_dict(tables).to_dict(), "index": 0, "stage_dir": str(stage_dir),
            "tokenizer": str(tokenizer), "datasets": {"prompts": prompts}, "backend": "torch"}  # fmt: skip


def test_online_dpo_raises_the_reward_of_held_back_answers(small_tokenizer_dir, prompts, reward_model, policy, tmp_path):
    result = run_stage(request(small_tokenizer_dir, prompts, reward_model, tmp_path / "online", steps=24, start=policy))
    assert result["steps"] == 24
    body = json.loads((tmp_path / "online" / "online.json").read_text())
    assert body["held_out"] == 16 and body["end"] > body["start"] + 0.5, body  # measured: 1.82 -> 3.77
    rounds = body["rounds"]
    assert [r["round"] for r in rounds] == list(range(len(rounds))) and len(rounds) >= 12  # 8 pairs a step
    assert all(0 < r["pairs"] <= 16 for r in rounds)
    # the rounds sampled from the trained policy score higher than the first, sampled from the start
    assert np.mean([r["mean_reward"] for r in rounds[len(rounds) // 2 :]]) > rounds[0]["mean_reward"]
    assert any("held-back prompts' mean reward" in note for note in result["notes"])


def test_a_stage_killed_mid_round_resumes_exactly(small_tokenizer_dir, prompts, reward_model, policy, tmp_path):
    stage = {"steps": 6, "checkpoint_every_tokens": T * 8 * 3, "start": policy}
    straight = run_stage(request(small_tokenizer_dir, prompts, reward_model, tmp_path / "straight", **stage))
    config = tmp_path / "request.json"
    config.write_text(json.dumps(request(small_tokenizer_dir, prompts, reward_model, tmp_path / "resumed", **stage)))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "tests.orchestration.preference_worker", str(config), "5"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 3, done.stderr[-2000:]
    result = run_stage(json.loads(config.read_text()))
    assert result["resumed_from_step"] == 3 and result["steps"] == 6
    expected, got = weights(straight["checkpoint"]), weights(result["checkpoint"])
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-6, err_msg=name)
    # the cursor sat inside round 1 at the checkpoint: the rerun read rounds 1 and 2 back, not resampled
    names = sorted(p.name for p in (tmp_path / "straight" / "rounds").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "resumed" / "rounds").iterdir()) and len(names) == 3
    for name in names:
        assert (tmp_path / "straight" / "rounds" / name).read_bytes() == (tmp_path / "resumed" / "rounds" / name).read_bytes()


def test_online_settings_are_checked(small_tokenizer_dir, prompts, reward_model, tmp_path):
    from orchestration.pipeline.online_stage import OnlineSettings

    with pytest.raises(ConfigError, match=r"^samples must be an integer >= 2"):
        OnlineSettings(reward="rm", samples=1)
    with pytest.raises(ConfigError, match=r"^temperature must be above 0"):
        OnlineSettings(reward="rm", temperature=0)
    tables = request(small_tokenizer_dir, prompts, reward_model, tmp_path, 2)["recipe"]
    del tables["stage"][0]["online"]
    with pytest.raises(ConfigError, match=r"needs \[stage.online\] with its reward model"):
        Recipe.from_dict(tables)


# ---- rejection-sampling SFT -------------------------------------------------------------------


def rejection_request(tokenizer, prompts: str, policy: str, reward: str, stage_dir: Path, steps: int, **rejection) -> dict:
    settings = {"reward": reward, "prompts": 24, "samples": 4, "max_new_tokens": 24} | rejection
    table = {"name": "rs", "kind": "rejection-sft", "start": policy, "token_budget": T * 8 * steps, "seq_len": T,
             "batch_tokens": T * 8, "data": {"sources": [{"dataset": "prompts", "weight": 1.0}]},
             "optim": {"lr": 3e-3, "warmup_steps": 2}, "rejection": settings}  # fmt: skip
    tables = {"run": {"name": "t", "preset": "tiny", "vocab_size": VOCAB, "backend": "torch",
                      "tokenizer": {"path": str(tokenizer)},
                      "datasets": [{"name": "prompts", "path": prompts, "format": "chat"}]},
              "stage": [table]}  # fmt: skip
    return {"recipe": Recipe.from_dict(tables).to_dict(), "index": 0, "stage_dir": str(stage_dir),
            "tokenizer": str(tokenizer), "datasets": {"prompts": prompts}, "backend": "torch"}  # fmt: skip


def test_rejection_sft_trains_on_the_best_answers_the_two_models_agree_on(small_tokenizer_dir, prompts, policy,
                                                                         reward_model, tmp_path):  # fmt: skip
    from orchestration.core.checkpoint import load_spec, with_score_head

    second = str(tmp_path / "rm2")  # a second opinion: the same reward model, its score head redrawn
    with_score_head(reward_model, load_spec(reward_model), second, seed=11)
    result = run_stage(rejection_request(small_tokenizer_dir, prompts, policy, reward_model, tmp_path / "rs", 6,
                                         second=second))  # fmt: skip
    kept = json.loads((tmp_path / "rs" / "kept" / "manifest.json").read_text())
    assert kept["prompts"] == 24 and kept["kept"] + sum(kept["dropped"].values()) == 24 and kept["kept"] > 0
    lines = [json.loads(line) for line in (tmp_path / "rs" / "kept" / "selected.jsonl").read_text().splitlines()]
    assert len(lines) == kept["kept"] and all(set(line["provenance"]["scores"]) == {"reward", "second"} for line in lines)
    assert result["steps"] == 6 and any("best answers" in note for note in result["notes"])
    # the stage trained on exactly the kept conversations, each ending on its answer's [|endofturn|]
    dataset = json.loads((tmp_path / "rs" / "kept" / "dataset" / "manifest.json").read_text())
    assert dataset["kind"] == "chat" and dataset["sources"]["kept"]["documents"] == kept["kept"]
    # rerun: the stage is finished; a resumed one would read kept/ back, never sample again
    assert run_stage(rejection_request(small_tokenizer_dir, prompts, policy, reward_model, tmp_path / "rs", 6,
                                       second=second))["steps"] == 6  # fmt: skip


def test_the_post_training_recipe_names_its_starts_and_reward_models():
    from orchestration.pipeline.recipe import load_recipe
    from orchestration.pipeline.recipe_checks import stage_specs

    recipe = load_recipe(ROOT / "recipes" / "post-training.toml")
    names = [s.name for s in recipe.stage]
    assert names == ["pretrain", "sft", "rm1", "rm2", "rs-sft", "online-dpo"]
    assert [recipe.start_stage(i) for i in range(6)] == [None, None, None, 1, 1, None]
    assert recipe.reward_models(4) == [2, 3] and recipe.reward_models(5) == [2]
    specs = stage_specs(recipe)
    assert [s.head for s in specs] == ["lm", "lm", "score", "score", "lm", "lm"]
    tables = recipe.to_dict()
    changed = copy.deepcopy(tables)
    changed["stage"][2]["optim"]["lr"] = 2e-3  # rm1 changed: the stages that use it are other stages
    before, after = Recipe.from_dict(tables).stage_identities(), Recipe.from_dict(changed).stage_identities()
    assert [a == b for a, b in zip(before, after)] == [True, True, False, True, False, False]
    tables["stage"][4]["start"] = "online-dpo"
    with pytest.raises(ConfigError, match=r"stage 5 'rs-sft': start: stage 'online-dpo' is not an earlier stage"):
        from orchestration.pipeline.recipe_checks import check_stages

        check_stages(Recipe.from_dict(tables))
