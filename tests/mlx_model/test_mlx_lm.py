"""A checkpoint exported with `hanyeong model export-hf` is an mlx-lm Llama: same logits, same
greedy tokens (through mlx-lm's own KV cache). Local directory only: no hub access."""

# ruff: noqa: E402  (the imports below follow the importorskip that guards them)

from __future__ import annotations

import importlib

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")  # skip the module, before any mlx import, where mlx is missing
mlx_lm_utils = pytest.importorskip("mlx_lm.utils")

from orchestration.core.export_hf import export_hf
from orchestration.core.spec import RopeScaling
from tests.check_model import random_tokens
from tests.mlx_model.conftest import tiny


@pytest.mark.parametrize(
    "spec", [tiny(), tiny(tie_embeddings=False, rope_scaling=RopeScaling(original_max_position_embeddings=16))],
    ids=["tied-gqa", "untied-llama3-rope"],
)  # fmt: skip
def test_exported_checkpoint_is_an_mlx_lm_llama(backend, tmp_path, spec):
    model = backend.init(spec, seed=3)
    backend.save(model, tmp_path / "ckpt")
    theirs, config = mlx_lm_utils.load_model(export_hf(tmp_path / "ckpt", tmp_path / "hf"))
    assert type(theirs).__module__ == "mlx_lm.models.llama" and config["model_type"] == "llama"
    tokens = random_tokens(spec, (2, 32))
    expected = np.array(theirs(mx.array(tokens)))
    assert np.abs(backend.logits(model, tokens) - expected).max() <= 1e-4
    assert np.abs(expected).max() > 0.05

    generate_step = importlib.import_module("mlx_lm.generate").generate_step  # greedy by default
    prompt = [5, 6, 7, 8, 9]
    steps = generate_step(mx.array(prompt), theirs, max_tokens=8)
    assert backend.generate(model, [prompt], max_new_tokens=8)[0] == [int(t) for t, _ in steps]


def test_cli_init_and_export_hf_give_an_mlx_lm_llama(backend, tmp_path):
    from typer.testing import CliRunner

    from orchestration.cli import app

    runner = CliRunner()
    init = ["model", "init", "--backend", "mlx", "--vocab-size", "300", "--seed", "4", "-o"]
    for args in (
        init + [str(tmp_path / "ckpt")],
        ["model", "export-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    theirs, _ = mlx_lm_utils.load_model(tmp_path / "hf")
    tokens = random_tokens(tiny(), (1, 24))
    ours = backend.logits(backend.load(tmp_path / "ckpt"), tokens)
    assert np.abs(ours - np.array(theirs(mx.array(tokens)))).max() <= 1e-4
