"""Laws of a preference stage (kind dpo, through run_stage): a stage killed after a checkpoint and rerun
in another process ends on the weights, metrics and held-back scores of an uninterrupted run, its
reference log-probs read back from the cache (the start model is never rebuilt); the rerun may be on
MLX (torch -> mlx mid-stage); 2 DDP workers, each with its rows of whole pairs, follow 1 worker,
rank 0 alone computing the reference."""

# ruff: noqa: E402  (the imports below follow the importorskip that guards them)

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from orchestration.data.preference import prepare_preference
from orchestration.pipeline import stage as stage_module
from orchestration.pipeline.recipe import Recipe
from orchestration.pipeline.stage import run_stage
from tests.conftest import quickstart_english, quickstart_korean
from tests.orchestration.test_preference_stage import language_pairs, write_jsonl
from tests.orchestration.test_stage import metrics, one_thread, weights  # noqa: F401  (one_thread: a fixture)
from tests.orchestration.test_train_group import join_local_group

VOCAB, T, PAIRS_PER_STEP, STEPS = 3000, 48, 8, 6
ROOT = Path(__file__).resolve().parents[2]
STEP_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "lengths/rejected")


@pytest.fixture(scope="module")
def pairs(small_tokenizer_dir, tmp_path_factory) -> str:
    """120 language pairs (chosen: an answer in the prompt's language), prepared."""
    root = tmp_path_factory.mktemp("pairs")
    korean = [t for t in quickstart_korean(300) if len(t) > 20][:60]
    english = [t for t in quickstart_english() if len(t) > 30][:60]
    prepare_preference([str(write_jsonl(root / "pairs.jsonl", language_pairs(korean, english)))],
                       small_tokenizer_dir, root / "prepared")  # fmt: skip
    return str(root / "prepared")


def request(tokenizer, pairs: str, stage_dir: Path, backend: str = "torch") -> dict:
    stage = {"name": "align", "kind": "dpo", "start": "init", "token_budget": T * PAIRS_PER_STEP * STEPS,
             "seq_len": T, "batch_tokens": T * PAIRS_PER_STEP, "checkpoint_every_tokens": T * PAIRS_PER_STEP * 3,
             "data": {"sources": [{"dataset": "pairs", "weight": 1.0}]}, "optim": {"lr": 3e-3, "warmup_steps": 1},
             "preference": {"beta": 0.2, "sft_weight": 0.1, "label_smoothing": 0.05, "held_out": 8}}  # fmt: skip
    tables = {"run": {"name": "t", "preset": "tiny", "vocab_size": VOCAB, "backend": "torch",
                      "tokenizer": {"path": str(tokenizer)},
                      "datasets": [{"name": "pairs", "path": pairs, "format": "preference"}]},
              "stage": [stage]}  # fmt: skip
    return {"recipe": Recipe.from_dict(tables).to_dict(), "index": 0, "stage_dir": str(stage_dir),
            "tokenizer": str(tokenizer), "datasets": {"pairs": pairs}, "backend": backend}  # fmt: skip


@pytest.fixture(scope="module")
def straight(small_tokenizer_dir, pairs, tmp_path_factory, one_thread):  # noqa: F811
    """The stage uninterrupted, on torch, one worker: (stage dir, result)."""
    stage_dir = tmp_path_factory.mktemp("straight") / "align"
    return stage_dir, run_stage(request(small_tokenizer_dir, pairs, stage_dir))


def held_scores(stage_dir: Path) -> dict:
    return json.loads((stage_dir / "preference.json").read_text())


def flat_scores(stage_dir: Path) -> dict:
    """preference.json's numbers under 'start.accuracy', 'end.margin', ..."""
    body = held_scores(stage_dir)
    scores = {f"{when}.{k}": v for when in ("start", "end") for k, v in body[when].items()}
    return scores | {"held_out": body["held_out"]}


def reference_file(stage_dir: Path) -> Path:
    (found,) = (stage_dir / "reference").glob("*.npy")
    return found


def killed(tokenizer, pairs: str, stage_dir: Path, crash_at: int = 4) -> None:
    """The stage in another interpreter, killed before step crash_at + 1 (its checkpoint: step 3)."""
    config = stage_dir.parent / "request.json"
    config.write_text(json.dumps(request(tokenizer, pairs, stage_dir)))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "tests.orchestration.preference_worker", str(config), str(crash_at)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 3, done.stderr[-2000:]
    assert json.loads((stage_dir / "checkpoint" / "trainer_state.json").read_text())["step"] == 3
    assert len(metrics(stage_dir)) == crash_at  # lines past the checkpoint, run again on resume


def no_start_model(*args, **kwargs):
    raise AssertionError("the reference log-probs must come from the stage's cache")


def test_the_straight_run_logs_pair_metrics_and_held_back_scores(straight):
    stage_dir, result = straight
    lines = metrics(stage_dir)
    assert len(lines) == STEPS and all(line["counted_tokens"] == PAIRS_PER_STEP for line in lines)
    assert lines[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-4)  # the start model is the reference
    assert abs(lines[-1]["rewards/chosen"]) > 1e-3  # the policy has moved off the reference
    held = held_scores(stage_dir)
    assert held["held_out"] == 8 and held["start"]["accuracy"] == 0.5 and held["start"]["margin"] == 0.0
    assert result["notes"] == [f"held-back preference accuracy 50.0% -> {held['end']['accuracy']:.1%} (8 pairs), "
                               f"reward margin 0.000 -> {held['end']['margin']:.3f}"]  # fmt: skip


def test_resume_in_a_new_process_equals_the_straight_run(straight, small_tokenizer_dir, pairs, tmp_path, monkeypatch):
    reference_dir, uninterrupted = straight
    stage_dir = tmp_path / "align"
    killed(small_tokenizer_dir, pairs, stage_dir)
    cached = reference_file(stage_dir).read_bytes()
    assert cached == reference_file(reference_dir).read_bytes()
    monkeypatch.setattr(stage_module, "start_model", no_start_model)
    result = run_stage(request(small_tokenizer_dir, pairs, stage_dir))
    assert result["resumed_from_step"] == 3 and result["steps"] == STEPS
    expected, got = weights(uninterrupted["checkpoint"]), weights(result["checkpoint"])
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-6, err_msg=name)
    for ours, theirs in zip(metrics(stage_dir), metrics(reference_dir), strict=True):
        assert ours["step"] == theirs["step"]
        assert [ours[k] for k in STEP_KEYS] == pytest.approx([theirs[k] for k in STEP_KEYS], abs=1e-5)
    assert flat_scores(stage_dir) == pytest.approx(flat_scores(reference_dir), abs=1e-6)
    assert reference_file(stage_dir).read_bytes() == cached


@pytest.mark.mlx
@pytest.mark.skipif(importlib.util.find_spec("mlx") is None, reason="needs MLX")
def test_a_torch_stage_resumes_on_mlx(straight, small_tokenizer_dir, pairs, tmp_path, monkeypatch):
    """Killed on torch after step 4, rerun on MLX from the step-3 checkpoint and torch's reference
    cache: the same losses, rewards and weights within float tolerance of two frameworks."""
    reference_dir, uninterrupted = straight
    stage_dir = tmp_path / "align"
    killed(small_tokenizer_dir, pairs, stage_dir)
    monkeypatch.setattr(stage_module, "start_model", no_start_model)
    result = run_stage(request(small_tokenizer_dir, pairs, stage_dir, backend="mlx"))
    assert result["resumed_from_step"] == 3 and result["steps"] == STEPS
    state = json.loads((Path(result["checkpoint"]) / "trainer_state.json").read_text())
    assert state["backend"] == "mlx"
    for ours, theirs in zip(metrics(stage_dir), metrics(reference_dir), strict=True):
        assert [ours[k] for k in STEP_KEYS] == pytest.approx([theirs[k] for k in STEP_KEYS], abs=2e-3, rel=1e-4)
    expected, got = weights(uninterrupted["checkpoint"]), weights(result["checkpoint"])
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=2e-4, err_msg=name)
    ours, theirs = held_scores(stage_dir), held_scores(reference_dir)
    assert ours["end"]["accuracy"] == theirs["end"]["accuracy"]
    assert ours["end"]["margin"] == pytest.approx(theirs["end"]["margin"], abs=1e-3)


def ddp_rank(rank: int, world: int, address, config: dict) -> None:
    """A Ray Train worker's part (orchestration/cluster/train_group.py), in a spawned process: join
    the group through the backend, run the stage as a rank; rank 0 keeps its result."""
    backend, device = join_local_group(rank, world, address)
    calls = []
    real = stage_module.start_model
    stage_module.start_model = lambda *a, **k: calls.append(1) or real(*a, **k)
    result = run_stage({**config, "workers": world, "parallel": "ddp", "device": device})
    result["start_models"] = len(calls)  # 1 on rank 0 (the reference); 0 on rank 1, which waits for it
    (Path(config["stage_dir"]) / f"result-{rank}.json").write_text(json.dumps(result))
    backend.leave_group()


def test_two_workers_equal_one(straight, small_tokenizer_dir, pairs, tmp_path):
    """2 DDP ranks, 4 whole pairs each of the 8-pair global batch: the one worker's losses, pair
    metrics, weights and held-back scores; one reference, computed by rank 0."""
    from tests.cuda_model.test_parallel import spawn

    reference_dir, uninterrupted = straight
    stage_dir = tmp_path / "align"
    stage_dir.mkdir()
    spawn(ddp_rank, 2, request(small_tokenizer_dir, pairs, stage_dir), timeout=600)
    results = [json.loads((stage_dir / f"result-{r}.json").read_text()) for r in (0, 1)]
    assert [r["start_models"] for r in results] == [2, 1]  # rank 0: its init + the reference's; rank 1: its init
    assert reference_file(stage_dir).read_bytes() == reference_file(reference_dir).read_bytes()
    for ours, theirs in zip(metrics(stage_dir), metrics(reference_dir), strict=True):
        assert ours["counted_tokens"] == PAIRS_PER_STEP  # summed log-probs ~ -160: fp32 sums differ in ulps
        assert [ours[k] for k in STEP_KEYS] == pytest.approx([theirs[k] for k in STEP_KEYS], abs=1e-5, rel=1e-6)
    expected, got = weights(uninterrupted["checkpoint"]), weights(results[0]["checkpoint"])
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-5, err_msg=name)
    assert flat_scores(stage_dir) == pytest.approx(flat_scores(reference_dir), abs=1e-5)
    assert results[0]["notes"] and not results[1]["notes"]
