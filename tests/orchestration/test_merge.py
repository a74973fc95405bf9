"""Weight averaging and depth up-scaling on real checkpoints: averaging with itself is the identity
bit for bit, weights are normalised, SLERP returns its ends, merged and up-scaled checkpoints load
in both backends and export to transformers; up-scaling copies each layer bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

from hanyeong.errors import CheckpointError, ConfigError
from orchestration.core.checkpoint import MODEL_FILE, load_spec
from orchestration.core.merge import average, slerp
from orchestration.core.spec import ModelSpec
from orchestration.core.upscale import upscale
from tests.conftest import cli

SPEC = ModelSpec(vocab_size=300, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64)


def weights(path) -> dict[str, np.ndarray]:
    return load_file(path / MODEL_FILE)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Three checkpoints of one spec (seeds 0, 1, 2) and one of another depth."""
    from orchestration.core.backends import get_backend

    root, backend = tmp_path_factory.mktemp("ckpts"), get_backend("torch")
    paths = []
    for seed in range(3):
        backend.save(backend.init(SPEC, seed=seed), root / f"s{seed}")
        paths.append(root / f"s{seed}")
    other = ModelSpec(**{**SPEC.to_dict(), "n_layers": 2})
    backend.save(backend.init(other, seed=0), root / "shallow")
    return paths, root / "shallow"


@pytest.mark.parametrize("method, extra", [("linear", {}), ("linear", {"weights": [3, 1, 0.5]}),
                                           ("ema", {"alpha": 0.3}), ("slerp", {"t": 0.3}), ("warp", {"eta": 0.7})])  # fmt: skip
def test_merging_a_checkpoint_with_itself_returns_it_bit_for_bit(checkpoints, tmp_path, method, extra):
    (one, *_), _ = checkpoints
    base = {"base": one} if method in ("slerp", "warp") else {}
    out = average([one] * 3, tmp_path / "out", method=method, **extra, **base)
    a, b = weights(one), weights(out)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert load_spec(out) == SPEC


def test_linear_weights_are_normalised(checkpoints, tmp_path):
    (a, b, _), _ = checkpoints
    out = average([a, b], tmp_path / "out", weights=[3, 1])
    wa, wb, merged = weights(a), weights(b), weights(out)
    for k in wa:
        expected = (0.75 * wa[k].astype(np.float64) + 0.25 * wb[k]).astype(np.float32)
        assert np.array_equal(merged[k], expected), k


def test_slerp_returns_its_ends_and_warp_interpolates_toward_the_base(checkpoints, tmp_path):
    (base, a, b), _ = checkpoints
    for t, end in ((0.0, a), (1.0, b)):
        out = average([a, b], tmp_path / f"t{t}", method="slerp", t=t, base=base)
        assert all(np.array_equal(weights(out)[k], v) for k, v in weights(end).items())
    mid = weights(average([a, b], tmp_path / "mid", method="slerp", t=0.5, base=base))
    warp = weights(average([a, b], tmp_path / "warp", method="warp", t=0.5, eta=0.25, base=base))
    wbase = weights(base)
    for k in wbase:  # LITI: a quarter of the way from the base to the SLERP
        expected = wbase[k] + 0.25 * (mid[k].astype(np.float64) - wbase[k])
        np.testing.assert_allclose(warp[k], expected, rtol=0, atol=1e-6)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(0.0, 1.0))
def test_slerp_keeps_the_norm_of_equal_norm_vectors_on_the_arc(seed, t):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=50), rng.normal(size=50)
    b *= np.linalg.norm(a) / np.linalg.norm(b)
    c = slerp(a, b, t)
    assert np.linalg.norm(c) == pytest.approx(np.linalg.norm(a), rel=1e-9)
    angle = lambda x, y: np.arccos(np.clip(x @ y / np.linalg.norm(x) / np.linalg.norm(y), -1, 1))  # noqa: E731
    assert angle(a, c) == pytest.approx(t * angle(a, b), abs=1e-7)


def test_a_merged_checkpoint_loads_in_both_backends_and_exports_to_transformers(checkpoints, tmp_path):
    import torch
    from transformers import LlamaForCausalLM

    from orchestration.core.backends import get_backend
    from orchestration.core.export_hf import export_hf

    (a, b, _), _ = checkpoints
    out = average([a, b], tmp_path / "out")
    tokens = np.array([[1, 5, 9, 200, 7]])
    ours = get_backend("torch").logits(get_backend("torch").load(out), tokens)
    pytest.importorskip("mlx.core")
    mlx = get_backend("mlx")
    np.testing.assert_allclose(mlx.logits(mlx.load(out), tokens), ours, atol=1e-4)
    hf = LlamaForCausalLM.from_pretrained(export_hf(out, tmp_path / "hf")).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4)


def test_checkpoints_of_different_specs_are_refused(checkpoints, tmp_path):
    (a, *_), shallow = checkpoints
    with pytest.raises(CheckpointError, match=r"shallow: its spec differs from .*\(n_layers\)"):
        average([a, shallow], tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "mean"}, r"^method must be one of linear, ema, slerp, warp"),
    ({"weights": [1]}, r"^weights: 2 numbers >= 0"),
    ({"weights": [1, -1]}, r"^weights: 2 numbers >= 0"),
    ({"method": "slerp"}, r"^--base is needed for slerp and warp"),
    ({"method": "ema", "alpha": 0}, r"^ema must be in \(0, 1\]"),
    ({"method": "ema", "weights": [1, 1]}, r"^--weights is for the linear method"),
])  # fmt: skip
def test_bad_merge_options_are_one_line(checkpoints, tmp_path, kwargs, message):
    (a, b, _), _ = checkpoints
    with pytest.raises(ConfigError, match=message):
        average([a, b], tmp_path / "out", **kwargs)


def test_upscaling_stacks_copies_of_the_layers_bit_for_bit(checkpoints, tmp_path):
    (a, *_), _ = checkpoints
    out = upscale(a, "0:3,1:4", tmp_path / "dus")  # SOLAR's 0:24,8:32 on four layers
    assert load_spec(out).n_layers == 6
    old, new = weights(a), weights(out)
    sources = [0, 1, 2, 1, 2, 3]
    for name, value in new.items():
        if name.startswith("model.layers."):
            i, rest = name.split(".", 3)[2:]
            assert np.array_equal(value, old[f"model.layers.{sources[int(i)]}.{rest}"]), name
        else:
            assert np.array_equal(value, old[name]), name  # embeddings, final norm, head
    assert len(new) == len(old) + 2 * 9  # two more layers of nine tensors
    from orchestration.core.backends import get_backend

    backend = get_backend("torch")
    assert backend.logits(backend.load(out), np.array([[1, 2, 3]])).shape == (1, 3, SPEC.vocab_size)


@pytest.mark.parametrize("layers, message", [("0:5", r"0:5 must satisfy 0 <= start < end <= 4"),
                                             ("2:2", r"2:2 must satisfy"), ("0-3", r"'0-3' is not a range")])  # fmt: skip
def test_bad_layer_ranges_are_one_line(checkpoints, tmp_path, layers, message):
    (a, *_), _ = checkpoints
    with pytest.raises(ConfigError, match=message):
        upscale(a, layers, tmp_path / "dus")


def test_model_average_and_upscale_commands(checkpoints, tmp_path, monkeypatch, capsys):
    (a, b, _), _ = checkpoints
    code, out, err = cli(monkeypatch, capsys, "model", "average", str(a), str(b), "--out", str(tmp_path / "avg"),
                         "--weights", "1,3")  # fmt: skip
    assert code == 0, err
    assert "avg" in out and json.loads((tmp_path / "avg" / "spec.json").read_text())["n_layers"] == 4
    code, out, err = cli(monkeypatch, capsys, "model", "upscale", str(a), "--layers", "0:3,1:4", "--out",
                         str(tmp_path / "dus"))  # fmt: skip
    assert code == 0, err
    assert "4 -> 6 layers" in out
    code, out, err = cli(monkeypatch, capsys, "model", "average", str(a), "--out", str(tmp_path / "x"), "--method", "slerp")
    assert code == 1 and err.strip().count("\n") == 0 and "--base is needed" in err
