"""GRPO (kind `grpo`, through run_stage) on the shipped synthetic arithmetic task: a tiny model SFT'ed
on <thought> traces that are right a third of the time starts with a mean reward in [0.2, 0.6];
GRPO on the verifiable prompts raises the held-back prompts' exact-match reward; a stage killed
mid-generation and rerun in another process ends on the uninterrupted run's weights (torch and MLX)."""

# ruff: noqa: E402

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

torch = pytest.importorskip("torch")

from hanyeong.errors import ConfigError, DataError
from orchestration.data.chat import ChatConfig
from orchestration.data.chat_dataset import prepare_chat
from orchestration.pipeline.recipe import Recipe
from orchestration.pipeline.stage import run_stage
from tests.conftest import SHARED_DATA, needs_shared_data
from tests.orchestration.test_stage import one_thread, weights  # noqa: F401  (one_thread: autouse)

VOCAB, T = 3000, 48
ROOT = Path(__file__).resolve().parents[2]
TASK = ROOT / "data" / "reasoning"


def short_answer(answer: str, reference: str | None, prompt: object) -> float:
    """A user's own reward function, named in a recipe as 'module:function'."""
    return float(len(answer) < 40)


@pytest.fixture(scope="module")
def data(small_tokenizer_dir, tmp_path_factory) -> dict[str, str]:
    """The traces (SFT) and the verifiable prompts, prepared as reasoning chat datasets."""
    root = tmp_path_factory.mktemp("reasoning")
    config = ChatConfig(reasoning=True)
    for name, file in (("traces", "arithmetic-traces.jsonl"), ("problems", "arithmetic-prompts.jsonl")):
        prepare_chat([str(TASK / file)], small_tokenizer_dir, root / name, config=config)
    return {name: str(root / name) for name in ("traces", "problems")}


def request(tokenizer, data: dict, stage_dir: Path, kind: str, steps: int, rows: int, backend: str = "torch",
            **stage) -> dict:  # fmt: skip
    source = "traces" if kind == "sft" else "problems"
    table = {"name": kind, "kind": kind, "start": "init", "token_budget": T * rows * steps, "seq_len": T,
             "batch_tokens": T * rows, "data": {"sources": [{"dataset": source, "weight": 1.0}]}, **stage}  # fmt: skip
    tables = {"run": {"name": "t", "preset": "tiny", "vocab_size": VOCAB, "backend": backend,
                      "tokenizer": {"path": str(tokenizer)},
                      "datasets": [{"name": n, "path": p, "format": "chat"} for n, p in data.items()]},
              "stage": [table]}  # fmt: skip
    return {"recipe": Recipe.from_dict(tables).to_dict(), "index": 0, "stage_dir": str(stage_dir),
            "tokenizer": str(tokenizer), "datasets": data, "backend": backend}  # fmt: skip


@pytest.fixture(scope="module")
def policy(small_tokenizer_dir, data, tmp_path_factory) -> str:
    """SFT on the traces (600 steps, ~1 min): it copies the question into its thought and answers
    by one of the three rules it saw, so about a third of its sampled answers are right."""
    root = tmp_path_factory.mktemp("sft")
    stage = {"optim": {"lr": 3e-3, "warmup_steps": 5}}
    return run_stage(request(small_tokenizer_dir, data, root / "sft", "sft", steps=600, rows=32, **stage))["checkpoint"]


def grpo(steps: int, **settings) -> dict:
    table = {"group_size": 8, "max_new_tokens": 28, "held_out": 20, "rewards": {"numeric": 1.0}} | settings
    return {"optim": {"lr": 3e-4, "warmup_steps": 2}, "grpo": table}


def lines(stage_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def test_grpo_raises_the_held_back_exact_match(small_tokenizer_dir, data, policy, tmp_path):
    out = tmp_path / "grpo"
    result = run_stage(request(small_tokenizer_dir, data, out, "grpo", steps=12, rows=64, start=policy, **grpo(12)))
    held = json.loads((out / "grpo.json").read_text())
    assert held["held_out"] == 20
    # measured: 0.00 -> 0.70 (the SFT model's greedy answer follows a wrong rule; GRPO favours the right one)
    assert held["end"]["numeric"] >= held["start"]["numeric"] + 0.2, held
    steps = lines(out)
    assert 0.2 <= steps[0]["reward"] <= 0.6  # the SFT model's sampled answers: right about a third of the time
    for key in ("reward/numeric", "reward_std", "zero_std_groups", "answer_tokens", "finished", "grpo/clip_ratio",
                "grpo/entropy", "grpo/ratio"):  # fmt: skip
        assert key in steps[0], key
    assert all(line["grpo/ratio"] == pytest.approx(1.0, abs=1e-6) and line["grpo/clip_ratio"] == 0 for line in steps)
    assert len(list((out / "rollouts").glob("generation-*.parquet"))) == 12
    assert (out / "grpo.png").stat().st_size > 10_000
    assert not any("left out" in note for note in result["notes"])  # every prompt fits a row
    assert any("held-back prompts' reward" in note for note in result["notes"])


@pytest.mark.slow
def test_grpo_learns_with_each_aggregation(small_tokenizer_dir, data, policy, tmp_path):
    """The long version: 30 steps per aggregation, numeric and format rewards."""
    for aggregation in ("token_mean", "seq_mean_token_mean", "dr_grpo"):
        out = tmp_path / aggregation
        settings = grpo(30, loss_aggregation=aggregation, rewards={"numeric": 1.0, "format": 0.2})
        run_stage(request(small_tokenizer_dir, data, out, "grpo", steps=30, rows=64, start=policy, **settings))
        held = json.loads((out / "grpo.json").read_text())
        assert held["end"]["numeric"] >= held["start"]["numeric"] + 0.3, (aggregation, held)


@pytest.mark.parametrize("backend", ["torch", pytest.param("mlx", marks=pytest.mark.mlx)])
def test_a_stage_killed_mid_generation_resumes_exactly(small_tokenizer_dir, data, tmp_path, backend):
    """Two updates per generation (old log-probs kept) and a KL term (the reference's log-probs):
    killed inside generation 2 after the checkpoint of step 3; the rerun reads generation 1 back and
    samples generation 2 again (its file removed) from the restored weights, getting the same answers."""
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    settings = {"group_size": 2, "max_new_tokens": 8, "held_out": 0, "updates_per_generation": 2, "beta": 0.05,
                "rewards": {"numeric": 1.0, "format": 0.5, "tests.orchestration.test_grpo_stage:short_answer": 0.5}}  # fmt: skip
    stage = {"checkpoint_every_tokens": T * 4 * 3, "optim": {"lr": 1e-2, "warmup_steps": 0}, "grpo": settings,
             "data_seed": 7}  # fmt: skip
    ask = lambda name: request(small_tokenizer_dir, data, tmp_path / name, "grpo", steps=6, rows=4,  # noqa: E731
                               backend=backend, **stage)  # fmt: skip
    straight = run_stage(ask("straight"))
    config = tmp_path / "request.json"
    config.write_text(json.dumps(ask("resumed")))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "tests.orchestration.preference_worker", str(config), "5"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 3, done.stderr[-2000:]
    rollouts = tmp_path / "resumed" / "rollouts"
    (rollouts / "generation-00002.parquet").unlink()  # as if killed before it was written
    result = run_stage(json.loads(config.read_text()))
    assert result["resumed_from_step"] == 3 and result["steps"] == 6
    expected, got = weights(straight["checkpoint"]), weights(result["checkpoint"])
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-6, err_msg=name)
    names = sorted(p.name for p in (tmp_path / "straight" / "rollouts").iterdir())
    assert names == [f"generation-{g:05d}.parquet" for g in range(3)]
    for name in names:  # the same answers, rewards, advantages and log-probs (the metadata holds timings)
        a, b = (pq.read_table(d / name).replace_schema_metadata(None) for d in (tmp_path / "straight" / "rollouts", rollouts))
        assert a.equals(b), name
    first = lines(tmp_path / "straight")
    assert first[0]["grpo/ratio"] != first[1]["grpo/ratio"]  # the second update's ratio moved off 1
    assert "grpo/kl" in first[0] and "reward/tests.orchestration.test_grpo_stage:short_answer" in first[0]


@pytest.mark.parametrize(("settings", "message"), [
    ({"rewards": {"nope": 1.0}}, r"grpo.rewards.nope: reward must be one of format, language, length, numeric, got 'nope'"),
    ({"rewards": {"no.such.module:f": 1.0}}, r"grpo.rewards.no.such.module:f: cannot import 'no.such.module:f' \(ModuleNotFoundError"),
    ({"rewards": {"numeric": float("nan")}}, r"grpo.rewards.numeric must be a finite weight"),
    ({"loss_aggregation": "sum"}, r"grpo.loss_aggregation must be one of token_mean, seq_mean_token_mean"),
    ({"scale_rewards": "global"}, r"grpo.scale_rewards must be one of group, batch, none"),
    ({"group_size": 1}, r"grpo.group_size must be >= 2"),
])  # fmt: skip
def test_grpo_settings_are_checked(small_tokenizer_dir, data, tmp_path, settings, message):
    with pytest.raises(ConfigError, match=message):
        request(small_tokenizer_dir, data, tmp_path / "g", "grpo", steps=2, rows=4, grpo={"group_size": 2, **settings})


@pytest.mark.parametrize(("settings", "error", "message"), [
    ({"group_size": 3}, ConfigError, r"rows \(batch_tokens / seq_len = 4\) must be whole groups of grpo.group_size = 3"),
    ({"max_new_tokens": 60}, DataError, r"no prompt leaves room for 60 answer tokens in rows of seq_len 48"),
])  # fmt: skip
def test_grpo_shapes_are_checked_before_sampling(small_tokenizer_dir, data, tmp_path, settings, error, message):
    ask = request(small_tokenizer_dir, data, tmp_path / "g", "grpo", steps=2, rows=4, grpo={"group_size": 2, **settings})
    with pytest.raises(error, match=message):
        run_stage(ask)
    assert not (tmp_path / "g" / "rollouts").exists()


def ddp_rank(rank: int, world: int, address, config: dict) -> None:
    """One of `world` DDP ranks in a spawned process, joined as a Ray Train worker joins."""
    from tests.orchestration.test_train_group import join_local_group

    backend, device = join_local_group(rank, world, address)
    result = run_stage({**config, "workers": world, "parallel": "ddp", "device": device})
    if rank == 0:
        (Path(config["stage_dir"]) / "result.json").write_text(json.dumps(result))
    backend.leave_group()


def test_two_workers_give_the_one_worker_update(small_tokenizer_dir, data, tmp_path):
    """Every rank samples the same generation (same weights, same keys) and trains on its rows:
    the 2-rank run ends on the 1-worker run's weights, with the same rollouts."""
    from tests.cuda_model.test_parallel import spawn

    settings = {"group_size": 2, "max_new_tokens": 8, "held_out": 0, "rewards": {"numeric": 1.0, "format": 0.5}}
    stage = {"optim": {"lr": 1e-2, "warmup_steps": 0}, "grpo": settings, "workers": 2, "parallelism": "ddp"}
    one = run_stage(request(small_tokenizer_dir, data, tmp_path / "one", "grpo", steps=3, rows=4, **stage))
    spawn(ddp_rank, 2, request(small_tokenizer_dir, data, tmp_path / "two", "grpo", steps=3, rows=4, **stage))
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    expected, got = weights(one["checkpoint"]), weights(two["checkpoint"])
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=5e-5, err_msg=name)
    for g in range(3):
        name = f"generation-{g:05d}.parquet"
        a, b = (pq.read_table(tmp_path / d / "rollouts" / name).replace_schema_metadata(None) for d in ("one", "two"))
        assert a.equals(b), name
    assert [line["loss"] for line in lines(tmp_path / "two")] == pytest.approx([line["loss"] for line in lines(tmp_path / "one")], rel=1e-5)


@needs_shared_data
def test_gsm8k_train_is_a_verifiable_prompt_set(small_tokenizer_dir, tmp_path):
    """GSM8K's train split (never its test split) prepared as chat data: each prompt's reference is
    its answer, whose '#### N' the numeric reward reads; the reference scores 1 against itself and
    an answer with another final number scores 0."""
    import gzip

    from orchestration.pipeline.grpo_stage import Sampler
    from orchestration.pipeline.stage import build_loader
    from orchestration.sampling.rewards import numeric
    from tokenizer.bbpe import BBPETokenizer

    with gzip.open(SHARED_DATA / "benchmarks" / "gsm8k" / "train.jsonl.gz", "rt", encoding="utf-8") as f:
        records = [json.loads(next(f)) for _ in range(40)]
    source = tmp_path / "gsm8k-train.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    prepare_chat([str(source)], small_tokenizer_dir, tmp_path / "gsm8k")
    data = {"problems": str(tmp_path / "gsm8k")}
    recipe = Recipe.from_dict(request(small_tokenizer_dir, data, tmp_path / "g", "grpo", steps=1, rows=4)["recipe"])
    loader = build_loader(recipe.stage[0], data, seed=0)
    sampler = Sampler(None, None, None, BBPETokenizer.load(small_tokenizer_dir), tmp_path, np.zeros(0), False)
    assert len(loader.prompts) == 40
    for i, record in enumerate(records):
        reference = sampler.text(loader.answers[i])
        final = record["answer"].rsplit("####", 1)[1].strip()
        assert reference.rstrip().endswith(f"#### {final}")
        assert numeric(reference, reference) == 1.0
        assert numeric(f"The answer is {final}1.", reference) == 0.0


def test_the_reasoning_recipe_loads_with_its_shipped_inputs():
    from orchestration.pipeline.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "reasoning.toml")
    recipe.check_inputs()  # its data ship with the repo
    assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe  # what Ray ships
    assert [s.kind for s in recipe.stages] == ["sft", "grpo"]
    grpo = recipe.stages[1].grpo
    assert grpo.rewards == {"numeric": 1.0, "format": 0.2} and grpo.beta == 0.0 and grpo.loss_aggregation == "token_mean"
    assert all(recipe.dataset(name).chat.reasoning for name in ("traces", "problems"))


@pytest.mark.slow
def test_the_reasoning_recipe_raises_held_back_exact_match(tmp_path):
    """`hanyeong pipeline run recipes/reasoning.toml` as the README gives it (about 2 minutes)."""
    done = subprocess.run([sys.executable, "-m", "orchestration.cli", "pipeline", "run", "recipes/reasoning.toml",
                           "--run-dir", str(tmp_path / "run"), "--num-cpus", "2", "-q"],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    held = json.loads((tmp_path / "run" / "stages" / "02-grpo" / "grpo.json").read_text())
    assert held["end"]["numeric"] >= held["start"]["numeric"] + 0.3, held  # measured 0.05 -> 0.75
    assert held["end"]["format"] >= 0.9
