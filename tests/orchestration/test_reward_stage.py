"""A reward stage (kind `reward`, through run_stage): its rows end at the last answer token, it learns
a rule its chosen answers follow (held-back accuracy >= 90%), its checkpoint is a reward model
(score.weight, spec head 'score') that transformers scores alike once exported, a stage started
from a language model gets a fresh score head, and a stage killed after a checkpoint and rerun in
another process ends on the uninterrupted run's weights, metrics and held-back scores."""

# ruff: noqa: E402  (the imports below follow the importorskip that guards them)

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from safetensors.numpy import load_file

from hanyeong.errors import ConfigError
from orchestration.core import checkpoint
from orchestration.data.loader import MixtureConfig, SourceWeight
from orchestration.data.preference import prepare_preference
from orchestration.pipeline.recipe import Recipe
from orchestration.pipeline.reward_stage import RewardLoader, pair_rewards
from orchestration.pipeline.stage import run_stage
from tests.conftest import quickstart_english, quickstart_korean
from tests.orchestration.test_preference_stage import language_pairs, write_jsonl
from tests.orchestration.test_stage import metrics, one_thread, weights  # noqa: F401  (one_thread: autouse)

VOCAB, T = 3000, 64
ROOT = Path(__file__).resolve().parents[2]
STEP_KEYS = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies")


@pytest.fixture(scope="module")
def pairs(small_tokenizer_dir, tmp_path_factory) -> str:
    """400 language pairs (chosen: an answer in the prompt's language, rejected: in the other), prepared."""
    root = tmp_path_factory.mktemp("pairs")
    korean = [t for t in quickstart_korean(600) if len(t) > 20][:200]
    english = [t for t in quickstart_english() if len(t) > 30][:200]
    prepare_preference([str(write_jsonl(root / "pairs.jsonl", language_pairs(korean, english)))],
                       small_tokenizer_dir, root / "prepared")  # fmt: skip
    return str(root / "prepared")


def request(tokenizer, pairs: str, stage_dir: Path, steps: int, start: str = "init", **stage) -> dict:
    table = {"name": "rm", "kind": "reward", "start": start, "token_budget": T * 16 * steps, "seq_len": T,
             "batch_tokens": T * 16, "data": {"sources": [{"dataset": "pairs", "weight": 1.0}]},
             "optim": {"lr": 3e-3, "warmup_steps": 2}, **stage}  # fmt: skip
    tables = {"run": {"name": "t", "preset": "tiny", "vocab_size": VOCAB, "backend": "torch",
                      "tokenizer": {"path": str(tokenizer)},
                      "datasets": [{"name": "pairs", "path": pairs, "format": "preference"}]},
              "stage": [table]}  # fmt: skip
    return {"recipe": Recipe.from_dict(tables).to_dict(), "index": 0, "stage_dir": str(stage_dir),
            "tokenizer": str(tokenizer), "datasets": {"pairs": pairs}, "backend": "torch"}  # fmt: skip


def loader(pairs: str, rows: int = 16) -> RewardLoader:
    return RewardLoader(MixtureConfig(sources=(SourceWeight(pairs),), split_documents=False), T, rows, seed=0)


def test_rows_end_at_the_last_answer_token(pairs, small_tokenizer):
    """Each sequence is [BOS] prompt answer [|endofturn|] and nothing after but [PAD]: the answer
    mask's last 1 is the last non-pad token, the one transformers' sequence classifiers score."""
    end_of_turn = small_tokenizer.hf.token_to_id("[|endofturn|]")
    batch = loader(pairs).next_batch()
    for tokens, mask in ((batch.inputs, batch.loss_mask), (batch["rejected_inputs"], batch["rejected_mask"])):
        last_answer = (np.arange(T) * (mask > 0)).argmax(-1)
        last_token = (np.arange(T) * (tokens != 0)).argmax(-1)  # transformers' rule, pad_token_id 0
        assert np.array_equal(last_answer, last_token) and (tokens[np.arange(16), last_answer] == end_of_turn).all()
    start = (batch.loss_mask > 0).argmax(-1)
    for row in range(16):  # the same prompt before both answers
        assert np.array_equal(batch.inputs[row, : start[row]], batch["rejected_inputs"][row, : start[row]])


def test_a_reward_stage_learns_the_rule_and_exports_alike(small_tokenizer_dir, pairs, tmp_path):
    transformers = pytest.importorskip("transformers")
    from cuda_model.backend import TorchBackend
    from orchestration.core.export_hf import export_hf

    result = run_stage(request(small_tokenizer_dir, pairs, tmp_path / "rm", steps=40))
    lines = metrics(tmp_path / "rm")
    assert result["steps"] == len(lines) == 40 and all(line["counted_tokens"] == 16 for line in lines)
    first, last = lines[0], lines[-1]
    for line in (first, last):
        assert line["rewards/margins"] == pytest.approx(line["rewards/chosen"] - line["rewards/rejected"], abs=1e-5)
    early, late = np.mean([x["loss"] for x in lines[:5]]), np.mean([x["loss"] for x in lines[-5:]])
    assert late < 0.5 * early and np.mean([x["rewards/accuracies"] for x in lines[-5:]]) >= 0.9
    held = json.loads((tmp_path / "rm" / "reward.json").read_text())
    assert held["held_out"] == 40 and held["end"]["accuracy"] >= 0.9 and held["end"]["margin"] > held["start"]["margin"]
    assert result["notes"] == [f"held-back reward accuracy {held['start']['accuracy']:.1%} -> "
                               f"{held['end']['accuracy']:.1%} (40 pairs), margin {held['start']['margin']:.3f} -> "
                               f"{held['end']['margin']:.3f}"]  # fmt: skip
    assert (tmp_path / "rm" / "reward.png").stat().st_size > 0
    stored = load_file(Path(result["checkpoint"]) / "model.safetensors")
    assert stored["score.weight"].shape == (1, 64) and "lm_head.weight" not in stored
    assert checkpoint.load_spec(result["checkpoint"]).head == "score"
    # the exported model scores the held-back rows as the stage does (the same token of each row)
    backend, rows = TorchBackend("cpu"), loader(pairs)
    held_back = rows.hold_out(64)
    ours = pair_rewards(backend, backend.load(result["checkpoint"]), rows, held_back)
    export_hf(result["checkpoint"], tmp_path / "hf")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    b = rows.batch(held_back)
    with torch.no_grad():
        chosen = hf(torch.from_numpy(b.inputs.astype(np.int64))).logits[:, 0].numpy()
        rejected = hf(torch.from_numpy(b["rejected_inputs"].astype(np.int64))).logits[:, 0].numpy()
    assert np.abs(np.stack([chosen, rejected], -1) - ours).max() <= 1e-4
    assert (ours[:, 0] > ours[:, 1]).mean() == pytest.approx(held["end"]["accuracy"], abs=0.5 / 40)


def killed(tokenizer, pairs: str, stage_dir: Path, crash_at: int, **stage) -> None:
    """The stage in another interpreter, killed (os._exit) before step crash_at + 1."""
    config = stage_dir.parent / "request.json"
    config.write_text(json.dumps(request(tokenizer, pairs, stage_dir, **stage)))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "tests.orchestration.preference_worker", str(config), str(crash_at)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 3, done.stderr[-2000:]


def test_a_stage_from_a_language_model_resumes_exactly(small_tokenizer_dir, pairs, tmp_path):
    """Started from a language model's checkpoint: STAGE_DIR/start is it with the LM head dropped
    and a score head drawn; killed after step 4 (checkpoint at step 3) and rerun, the stage ends on
    the uninterrupted run's weights, metrics and held-back scores."""
    from cuda_model.backend import TorchBackend

    backend = TorchBackend("cpu")
    spec = Recipe.from_dict(request(small_tokenizer_dir, pairs, tmp_path, 2)["recipe"]).run.model_spec()
    backend.save(backend.init(spec.replace(tie_embeddings=False), seed=3), tmp_path / "sft")
    stage = {"steps": 6, "start": str(tmp_path / "sft"), "checkpoint_every_tokens": T * 16 * 3}
    straight = run_stage(request(small_tokenizer_dir, pairs, tmp_path / "straight", **stage))
    start = load_file(tmp_path / "straight" / "start" / "model.safetensors")
    sft = load_file(tmp_path / "sft" / "model.safetensors")
    assert set(start) == set(sft) - {"lm_head.weight"} | {"score.weight"}
    assert np.array_equal(start["model.norm.weight"], sft["model.norm.weight"])
    killed(small_tokenizer_dir, pairs, tmp_path / "resumed", crash_at=4, **stage)
    assert json.loads((tmp_path / "resumed" / "checkpoint" / "trainer_state.json").read_text())["step"] == 3
    result = run_stage(request(small_tokenizer_dir, pairs, tmp_path / "resumed", **stage))
    assert result["resumed_from_step"] == 3 and result["steps"] == 6
    expected, got = weights(straight["checkpoint"]), weights(result["checkpoint"])
    assert set(got) == set(expected) and "score.weight" in got
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-6, err_msg=name)
    for ours, theirs in zip(metrics(tmp_path / "resumed"), metrics(tmp_path / "straight"), strict=True):
        assert ours["step"] == theirs["step"]
        assert [ours[k] for k in STEP_KEYS] == pytest.approx([theirs[k] for k in STEP_KEYS], abs=1e-5)
    scores = [json.loads((tmp_path / d / "reward.json").read_text()) for d in ("resumed", "straight")]
    assert scores[0]["start"] == scores[1]["start"]
    assert scores[0]["end"] == pytest.approx(scores[1]["end"], abs=1e-5)


def test_a_margin_column_reaches_the_batch(pairs, tmp_path):
    """A dataset whose shards carry a float `margin` column gives each row its pair's margin."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    copy = tmp_path / "with-margin"
    shutil.copytree(pairs, copy)
    (shard,) = copy.glob("shards/*/*.parquet")
    table = pq.read_table(shard)
    margins = np.arange(table.num_rows, dtype=np.float32) / 100
    pq.write_table(table.append_column("margin", pa.array(margins)), shard)
    rows = loader(str(copy), rows=8)
    indices = rows.take(8)
    np.testing.assert_array_equal(rows.batch(indices)["margin"], margins[indices])
    assert "margin" not in loader(pairs).next_batch()


def test_a_language_model_stage_cannot_start_from_a_reward_model(small_tokenizer_dir, pairs):
    tables = Recipe.from_dict(request(small_tokenizer_dir, pairs, Path("x"), 2)["recipe"]).to_dict()
    tables["run"]["datasets"].append({"name": "chat", "path": pairs, "format": "chat"})
    sft = {**tables["stage"][0], "name": "sft", "kind": "sft", "start": "previous",
           "data": {"sources": [{"dataset": "chat", "weight": 1.0}]}}  # fmt: skip
    tables["stage"].append(sft)
    with pytest.raises(ConfigError, match=r"^stage 2 'sft': starts from a reward model \(a score head, no LM "
                                          r"head\); a 'sft' stage trains a language model"):  # fmt: skip
        Recipe.from_dict(tables)


def test_reward_settings_reach_each_row_and_are_checked(pairs):
    """[stage.reward]'s center_rewards_coefficient rides on every row as the loss's
    center_coefficient; None (TRL's default) and 0 add nothing; impossible values are one line."""
    from orchestration.pipeline.reward_stage import RewardSettings

    rows = loader(pairs, rows=4)
    rows.settings = RewardSettings(center_rewards_coefficient=0.01).per_row()
    np.testing.assert_array_equal(rows.next_batch()["center_coefficient"], np.full(4, 0.01, np.float32))
    assert RewardSettings().per_row() == RewardSettings(center_rewards_coefficient=0.0).per_row() == {}
    with pytest.raises(ConfigError, match=r"^center_rewards_coefficient must be >= 0, got -1"):
        RewardSettings(center_rewards_coefficient=-1.0)
    with pytest.raises(ConfigError, match=r"^held_out must be an integer >= 0, got True"):
        RewardSettings(held_out=True)
