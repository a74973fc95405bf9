"""run_stage in-process: the loss falls, the budget is spent exactly, the checkpoint and metrics are
written; RESUME LAW: a crash after a checkpoint, then a rerun, ends on the weights of an uninterrupted
run; a NaN loss is an error naming the stage; SFT trains on assistant tokens only."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from orchestration.core import checkpoint
from orchestration.data.chat_dataset import prepare_chat, write_shard
from orchestration.data.shards import tokenizer_info
from hanyeong.errors import CheckpointError, ConfigError, TrainingError
from orchestration.pipeline.recipe import Recipe
from orchestration.pipeline.stage import run_stage
from tests.conftest import QUICKSTART, quickstart_english, quickstart_korean

torch = pytest.importorskip("torch")
from cuda_model.backend import BACKEND, read_tensors  # needs torch, hence after the skip

VOCAB = 3000  # the small_tokenizer fixture's


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: one thread is fastest, and far faster when other jobs share the 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def datasets(small_tokenizer, small_tokenizer_dir, tmp_path_factory) -> dict[str, str]:
    """A text dataset (sources reviews, books) written in the shard contract, and the chat samples."""
    root = tmp_path_factory.mktemp("datasets")
    general, tok = root / "general", tokenizer_info(small_tokenizer_dir)
    manifest = {"format": "hanyeong-dataset", "version": 1, "tokenizer": tok, "sources": {}}
    for name, texts, language in (
        ("reviews", quickstart_korean(600), "ko"),
        ("books", quickstart_english()[:600], "en"),
    ):
        docs = [
            np.array([tok["bos_id"], *ids, tok["eos_id"]], np.int32)
            for ids in small_tokenizer.encode_batch(texts)
        ]
        rel = f"shards/{name}/part-00000.parquet"
        entry = write_shard(
            general / rel, [str(i) for i in range(len(docs))], [language] * len(docs), docs, None
        )
        manifest["sources"][name] = {
            "documents": len(docs),
            "tokens": entry["tokens"],
            "shards": [{"path": rel, **entry}],
        }
    (general / "manifest.json").write_text(json.dumps(manifest))
    prepare_chat([str(QUICKSTART / "sft")], small_tokenizer_dir, root / "chat")
    return {"general": str(general), "chat": str(root / "chat")}


def recipe_tables(tokenizer: Path, datasets: dict, **pretrain) -> dict:
    """Two stages of the tiny model: pretraining with both ramps and periodic checkpoints, then SFT
    with a RoPE override (so the model is rebuilt from the first stage's checkpoint)."""
    stage0 = {"name": "pretrain", "kind": "pretrain", "start": "init", "token_budget": 15_360, "seq_len": 64,
              "batch_tokens": 1024, "checkpoint_every_tokens": 3000,
              "data": {"sources": [{"dataset": "general", "weight": 1.0}]},
              "optim": {"lr": 3e-3, "schedule": "wsd", "warmup_steps": 2},
              "seq_len_ramp": [{"after_tokens": 4096, "seq_len": 128}],
              "batch_ramp": [{"after_tokens": 8192, "batch_tokens": 2048}], **pretrain}  # fmt: skip
    stage1 = {"name": "sft", "kind": "sft", "start": "previous", "token_budget": 8192, "seq_len": 128,
              "batch_tokens": 1024, "rope_theta": 20_000.0,
              "data": {"sources": [{"dataset": "chat", "weight": 1.0}]}, "optim": {"lr": 2e-3}}  # fmt: skip
    return {"run": {"name": "test", "preset": "tiny", "vocab_size": VOCAB, "backend": "torch",
                    "tokenizer": {"path": str(tokenizer)},
                    "datasets": [{"name": "general", "path": datasets["general"]},
                                 {"name": "chat", "path": datasets["chat"], "format": "chat"}]},
            "stage": [stage0, stage1]}  # fmt: skip


def request(
    tables: dict, index: int, stage_dir: Path, tokenizer: Path, datasets: dict, init_from=None
) -> dict:
    return {"recipe": Recipe.from_dict(tables).to_dict(), "index": index, "stage_dir": str(stage_dir),
            "init_from": init_from, "tokenizer": str(tokenizer), "datasets": datasets, "backend": "torch"}  # fmt: skip


def metrics(stage_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def weights(ckpt: str | Path) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in read_tensors(Path(ckpt) / checkpoint.MODEL_FILE).items()}


@pytest.fixture(scope="module")
def pretrained(small_tokenizer_dir, datasets, tmp_path_factory):
    """The pretraining stage run once, uninterrupted: (tables, stage dir, result)."""
    tables = recipe_tables(small_tokenizer_dir, datasets)
    stage_dir = tmp_path_factory.mktemp("stages") / "pretrain"
    return (
        tables,
        stage_dir,
        run_stage(request(tables, 0, stage_dir, small_tokenizer_dir, datasets)),
    )


def test_pretraining_spends_the_budget_and_the_loss_falls(pretrained):
    _, stage_dir, result = pretrained
    assert result["tokens"] == 15_360 and result["resumed_from_step"] is None
    lines = metrics(stage_dir)
    assert [line["step"] for line in lines] == list(range(1, result["steps"] + 1))
    # the ramps: 64-token rows, then 128, then twice the rows; the last step takes what is left
    shapes = [(line["seq_len"], line["batch_rows"]) for line in lines]
    assert shapes == [(64, 16)] * 4 + [(128, 8)] * 4 + [(128, 16)] * 3 + [(128, 8)]
    assert lines[-1]["tokens"] == 15_360 and result["steps"] == 12
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "time"} <= set(lines[0])
    assert np.mean([x["loss"] for x in lines[-3:]]) < np.mean([x["loss"] for x in lines[:3]]) - 0.5
    state = checkpoint.read_trainer_state(result["checkpoint"])
    assert state["step"] == 12 and state["tokens_seen"] == 15_360
    assert state["data_cursor"]["format"] == "hanyeong-data-cursor"
    assert state["optim"]["total_steps"] == 12


def test_resume_law_a_crash_after_a_checkpoint_then_a_rerun(
    pretrained, small_tokenizer_dir, datasets, tmp_path, monkeypatch
):
    tables, _, uninterrupted = pretrained
    stage_dir = tmp_path / "pretrain"
    calls, real_step = [], BACKEND.train_step

    def crashing_step(state, batch, loss="causal_lm"):
        calls.append(state.step)
        if (
            state.step == 8
        ):  # after step 8; checkpoints were written after steps 3 (3,072 tokens) and 6
            raise RuntimeError("simulated crash")
        return real_step(state, batch, loss)

    monkeypatch.setattr(BACKEND, "train_step", crashing_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_stage(request(tables, 0, stage_dir, small_tokenizer_dir, datasets))
    monkeypatch.setattr(BACKEND, "train_step", real_step)
    saved = checkpoint.read_trainer_state(stage_dir / "checkpoint")["step"]
    assert saved == 6 and len(metrics(stage_dir)) == 8  # lines past the checkpoint were written

    result = run_stage(request(tables, 0, stage_dir, small_tokenizer_dir, datasets))
    assert (
        result["resumed_from_step"] == saved
        and result["tokens"] == 15_360 == uninterrupted["tokens"]
    )
    assert [line["step"] for line in metrics(stage_dir)] == list(range(1, 13))  # no step twice
    expected, got = weights(uninterrupted["checkpoint"]), weights(result["checkpoint"])
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-6, err_msg=name)
    assert [x["loss"] for x in metrics(stage_dir)] == pytest.approx(
        [x["loss"] for x in metrics(pretrained[1])], abs=1e-5
    )


def test_a_finished_stage_is_not_trained_again(pretrained, small_tokenizer_dir, datasets):
    tables, stage_dir, first = pretrained
    index = (Path(first["checkpoint"]) / checkpoint.INDEX_FILE).read_bytes()
    again = run_stage(request(tables, 0, stage_dir, small_tokenizer_dir, datasets))
    assert (
        again["resumed_from_step"] == again["steps"] == first["steps"]
        and again["last_loss"] == first["last_loss"]
    )
    assert (Path(first["checkpoint"]) / checkpoint.INDEX_FILE).read_bytes() == index


def test_a_checkpoint_of_another_config_is_not_resumed(pretrained, small_tokenizer_dir, datasets):
    _, stage_dir, _ = pretrained
    changed = recipe_tables(small_tokenizer_dir, datasets, optim={"lr": 1e-3, "warmup_steps": 2})
    with pytest.raises(CheckpointError, match="another version of this stage"):
        run_stage(request(changed, 0, stage_dir, small_tokenizer_dir, datasets))


def test_activation_checkpointing_resumes_a_stage_to_the_same_weights(
    pretrained, small_tokenizer_dir, datasets, tmp_path, monkeypatch
):
    """A stage crashed with activation checkpointing off and rerun with it on (the same identity:
    it changes no weight) resumes and ends on the weights of the uninterrupted run without it."""
    tables, _, uninterrupted = pretrained
    on = recipe_tables(small_tokenizer_dir, datasets, activation_checkpointing=True)
    assert Recipe.from_dict(on).stage_identities() == Recipe.from_dict(tables).stage_identities()
    stage_dir, states = tmp_path / "pretrain", []
    real_step, real_load = BACKEND.train_step, BACKEND.load_train_state

    def crashing_step(state, batch, loss="causal_lm"):
        if state.step == 5:  # a checkpoint was written after step 3
            raise RuntimeError("simulated crash")
        return real_step(state, batch, loss)

    def loading(path, **options):
        states.append(real_load(path, **options))
        return states[-1]

    monkeypatch.setattr(BACKEND, "train_step", crashing_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_stage(request(tables, 0, stage_dir, small_tokenizer_dir, datasets))
    monkeypatch.setattr(BACKEND, "train_step", real_step)
    monkeypatch.setattr(BACKEND, "load_train_state", loading)
    result = run_stage(request(on, 0, stage_dir, small_tokenizer_dir, datasets))
    assert result["resumed_from_step"] == 3 and states[0].model.model.activation_checkpointing
    expected, got = weights(uninterrupted["checkpoint"]), weights(result["checkpoint"])
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-6, err_msg=name)


def test_sft_trains_on_assistant_tokens_from_the_previous_checkpoint(
    pretrained, small_tokenizer_dir, datasets, tmp_path
):
    tables, _, first = pretrained
    result = run_stage(
        request(
            tables,
            1,
            tmp_path / "sft",
            small_tokenizer_dir,
            datasets,
            init_from=first["checkpoint"],
        )
    )
    assert result["tokens"] == 8192 and result["steps"] == 8
    lines = metrics(tmp_path / "sft")
    assert all(
        0 < x["counted_tokens"] < x["seq_len"] * x["batch_rows"] for x in lines
    )  # masked: assistant only
    assert np.mean([x["loss"] for x in lines[-2:]]) < np.mean([x["loss"] for x in lines[:2]])
    spec = checkpoint.load_spec(result["checkpoint"])
    assert spec.rope_theta == 20_000.0  # the override, on the first stage's weights
    start = weights(tmp_path / "sft" / "start")
    assert all(np.array_equal(start[k], v) for k, v in weights(first["checkpoint"]).items())


def test_a_nan_loss_is_an_error_naming_the_stage_and_step(
    small_tokenizer_dir, datasets, tmp_path, monkeypatch
):
    tables = recipe_tables(small_tokenizer_dir, datasets)
    real_step = BACKEND.train_step

    def nan_at_step_3(state, batch, loss="causal_lm"):
        metrics = real_step(state, batch, loss)
        return {**metrics, "loss": float("nan")} if state.step == 3 else metrics

    monkeypatch.setattr(BACKEND, "train_step", nan_at_step_3)
    with pytest.raises(
        TrainingError, match=r"^stage 1 'pretrain': loss is nan at step 3"
    ):
        run_stage(request(tables, 0, tmp_path / "nan", small_tokenizer_dir, datasets))


def test_bad_requests_are_config_errors(small_tokenizer_dir, datasets, tmp_path):
    tables = recipe_tables(small_tokenizer_dir, datasets)
    good = request(tables, 0, tmp_path / "s", small_tokenizer_dir, datasets)
    with pytest.raises(ConfigError, match=r"missing key\(s\) \['tokenizer'\]"):
        run_stage({k: v for k, v in good.items() if k != "tokenizer"})
    with pytest.raises(ConfigError, match=r"datasets has no directory for 'general'"):
        run_stage({**good, "datasets": {"chat": datasets["chat"]}})
    with pytest.raises(
        ConfigError, match=r"^stage 2 'sft' starts from the previous stage: run_stage needs init_from"
    ):
        run_stage({**good, "index": 1})
    tables["run"]["vocab_size"] = 4000
    with pytest.raises(
        ConfigError, match=r"the model has vocab_size 4,000 but the tokenizer .* has 3,000"
    ):
        run_stage(request(tables, 0, tmp_path / "v", small_tokenizer_dir, datasets))


@pytest.mark.mlx
@pytest.mark.skipif(importlib.util.find_spec("mlx") is None, reason="needs MLX")
def test_the_mlx_backend_runs_a_stage_to_the_same_checkpoint_format(
    small_tokenizer_dir, datasets, tmp_path
):
    tables = recipe_tables(small_tokenizer_dir, datasets, token_budget=384, seq_len=32, batch_tokens=128,
                           checkpoint_every_tokens=128, seq_len_ramp=[], batch_ramp=[])  # fmt: skip
    config = {
        **request(tables, 0, tmp_path / "mlx", small_tokenizer_dir, datasets),
        "backend": "mlx",
    }
    result = run_stage(config)
    assert result["tokens"] == 384 and result["steps"] == 3 and np.isfinite(result["last_loss"])
    state = checkpoint.read_trainer_state(result["checkpoint"])
    assert state["backend"] == "mlx" and state["data_cursor"]["format"] == "hanyeong-data-cursor"
    assert set(weights(result["checkpoint"])) == set(
        checkpoint.parameter_names(checkpoint.load_spec(result["checkpoint"]))
    )


def test_metrics_log_truncation_keeps_the_whole_lines_before_a_cut_one(tmp_path):
    from orchestration.pipeline.stage_callbacks import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl")
    lines = "".join(f'{{"step": {s}, "loss": 1.0}}\n' for s in (1, 2, 3, 4))
    log.path.write_text(lines + '{"step": 5, "lo', encoding="utf-8")  # a kill cut step 5's line
    log.truncate(3)
    assert [line["step"] for line in log.read()] == [1, 2, 3]
