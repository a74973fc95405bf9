"""Checkpoint I/O of the PyTorch backend: the shared format, integrity errors, no pickle."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from orchestration.core.batch import Batch
from orchestration.core.checkpoint import (
    MODEL_FILE,
    OPTIMIZER_FILE,
    SPEC_FILE,
    TRAINER_STATE_FILE,
    optimizer_key,  # fmt: skip
    parameter_names,
)
from hanyeong.errors import CheckpointError
from orchestration.core.optim import OptimConfig
from tests.check_model import random_tokens
from tests.cuda_model.conftest import tiny


@pytest.fixture
def trained(backend, tmp_path):
    spec = tiny(tie_embeddings=False)
    model = backend.init(spec, seed=1)
    state = backend.init_train_state(model, OptimConfig(total_steps=5), seed=1)
    backend.train_step(state, Batch.from_tokens(random_tokens(spec, (2, 9))))
    backend.save(model, tmp_path / "ckpt", state)
    return tmp_path / "ckpt", state


def test_training_checkpoint_layout(trained):
    path, state = trained
    spec = state.model.spec
    assert {p.name for p in path.iterdir()} == {
        SPEC_FILE,
        MODEL_FILE,
        OPTIMIZER_FILE,
        TRAINER_STATE_FILE,
        "checkpoint.json",
    }
    # the names of the format (checkpoint.py's docstring), not only the module's constants for them
    assert {SPEC_FILE, MODEL_FILE, OPTIMIZER_FILE, TRAINER_STATE_FILE} == {
        "spec.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json"
    }  # fmt: skip
    moments = load_file(path / OPTIMIZER_FILE)
    expected = {
        optimizer_key(n, m): s
        for n, s in parameter_names(spec).items()
        for m in ("exp_avg", "exp_avg_sq")
    }
    assert {k: v.shape for k, v in moments.items()} == expected
    assert all(v.dtype == np.float32 for v in moments.values())
    assert (moments[optimizer_key("model.norm.weight", "exp_avg_sq")] > 0).any()
    meta = json.loads((path / TRAINER_STATE_FILE).read_text())
    assert {"step", "tokens_seen", "optim", "data_cursor", "seed", "backend", "rng"} <= set(meta)
    assert meta["step"] == 1 and meta["tokens_seen"] == 16 and meta["data_cursor"] is None


def test_truncated_weights_are_a_checkpoint_error_naming_the_file(backend, trained):
    path, _ = trained
    file = path / MODEL_FILE
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        backend.load(path)


def test_damaged_header_is_a_checkpoint_error(backend, trained, monkeypatch):
    path, _ = trained
    file = path / MODEL_FILE
    data = bytearray(file.read_bytes())
    data[8:20] = b"not json :( "  # same size, so only reading the file can notice
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        backend.load(path)


def test_weights_of_another_shape_are_refused(backend, trained):
    path, _ = trained
    weights = load_file(path / MODEL_FILE)
    spec = json.loads((path / SPEC_FILE).read_text())
    (path / SPEC_FILE).write_text(json.dumps({**spec, "d_ff": spec["d_ff"] * 2}))
    index = json.loads((path / "checkpoint.json").read_text())
    index["files"][SPEC_FILE]["bytes"] = (path / SPEC_FILE).stat().st_size
    (path / "checkpoint.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"proj.weight has shape .* the spec says"):
        backend.load(path)
    assert weights  # the file itself is fine; the spec does not describe it


def test_loading_never_unpickles(backend, trained, monkeypatch):
    path, state = trained

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint must never be unpickled")

    for module, name in (
        (pickle, "load"),
        (pickle, "loads"),
        (pickle, "Unpickler"),
        (torch, "load"),
    ):
        monkeypatch.setattr(module, name, refuse)
    resumed = backend.load_train_state(path)
    assert resumed.step == 1
    for (name, a), b in zip(state.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_weights_only_checkpoint_cannot_resume(backend, tmp_path):
    model = backend.init(tiny())
    backend.save(model, tmp_path / "w")
    with pytest.raises(CheckpointError, match="trainer_state.json"):
        backend.load_train_state(tmp_path / "w")


def test_a_failed_save_keeps_the_previous_checkpoint(backend, trained, monkeypatch):
    path, state = trained
    before = (path / MODEL_FILE).read_bytes()
    import cuda_model.backend as module

    monkeypatch.setattr(
        module, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full"))
    )
    with pytest.raises(OSError):
        backend.save(state.model, path, state)
    assert (path / MODEL_FILE).read_bytes() == before
    backend.load(path)


def test_a_tied_checkpoint_with_a_head_copy_loads(backend, tmp_path):
    spec = tiny()
    model = backend.init(spec, seed=2)
    backend.save(model, tmp_path / "c")
    weights = load_file(tmp_path / "c" / MODEL_FILE)
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"]  # as some exporters write it
    save_file(weights, tmp_path / "c" / MODEL_FILE)
    index = json.loads((tmp_path / "c" / "checkpoint.json").read_text())
    index["files"][MODEL_FILE]["bytes"] = (tmp_path / "c" / MODEL_FILE).stat().st_size
    (tmp_path / "c" / "checkpoint.json").write_text(json.dumps(index))
    tokens = random_tokens(spec, (1, 5))
    np.testing.assert_array_equal(
        backend.logits(backend.load(tmp_path / "c"), tokens), backend.logits(model, tokens)
    )
