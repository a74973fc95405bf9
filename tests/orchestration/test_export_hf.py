"""`hanyeong model export-hf`: transformers loads the export as LlamaForCausalLM, same logits, same greedy text."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from orchestration.core.backends import get_backend
from hanyeong.errors import CheckpointError
from orchestration.core.export_hf import export_hf
from orchestration.core.presets import PRESETS
from tests.conftest import REPO
from tokenizer.specials import SPECIAL_BLOCK

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

SPECS = {
    "tied, grouped kv": PRESETS["tiny"].replace(vocab_size=3000),
    "untied, llama3 rope scaling": PRESETS["tiny"].replace(
        vocab_size=3000, tie_embeddings=False, n_kv_heads=4, rope_theta=500_000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64},
    ),
}  # fmt: skip


@pytest.fixture(scope="module", params=list(SPECS))
def exported(request, tmp_path_factory, small_tokenizer_dir):
    backend = get_backend("torch")
    spec = SPECS[request.param]
    model = backend.init(spec, seed=7)
    root = tmp_path_factory.mktemp("export")
    backend.save(model, root / "ckpt")
    out = subprocess.run(
        [sys.executable, "-m", "orchestration.cli", "model", "export-hf", str(root / "ckpt"), str(root / "hf"),
         "--tokenizer", str(small_tokenizer_dir)],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return backend, model, root / "hf"


def test_transformers_gives_the_same_logits(exported):
    backend, model, directory = exported
    hf = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    tokens = np.random.default_rng(0).integers(0, 3000, size=(2, 48))
    with torch.no_grad():
        expected = hf(torch.from_numpy(tokens)).logits.numpy()
    ours = backend.logits(model, tokens)
    assert np.abs(ours - expected).max() <= 1e-4


def test_transformers_gives_the_same_greedy_continuation(exported):
    backend, model, directory = exported
    hf = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    prompt = [1, 300, 301, 302, 303]
    with torch.no_grad():
        # our generate never samples the special block (core/generation.py): nor may HF here
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=0, suppress_tokens=list(range(SPECIAL_BLOCK)))  # fmt: skip
    expected = out[0, len(prompt):].tolist()
    assert backend.generate(model, [prompt], max_new_tokens=12)[0] == expected


def test_export_carries_a_working_tokenizer_and_chat_template(exported):
    _, _, directory = exported
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "안녕하세요"}], tokenize=False, add_generation_prompt=True)
    assert text == "[|system|][|endofturn|]\n[|user|]안녕하세요\n[|assistant|]"
    assert tokenizer.decode(tokenizer.encode("한영 모델", add_special_tokens=False)) == "한영 모델"
    config = json.loads((directory / "config.json").read_text())
    assert config["vocab_size"] == len(tokenizer)


def test_tokenizer_of_another_size_is_refused(tmp_path, small_tokenizer_dir):
    backend = get_backend("torch")
    backend.save(backend.init(PRESETS["tiny"].replace(vocab_size=4000)), tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="vocab_size"):
        export_hf(tmp_path / "ckpt", tmp_path / "hf", small_tokenizer_dir)
    assert not (tmp_path / "hf").exists()


def _export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestration.cli", "model", "export-hf", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO)  # fmt: skip


@pytest.mark.parametrize("moved", [False, True], ids=["in place", "run directory moved"])
def test_a_run_checkpoint_exports_with_its_runs_tokenizer_by_default(tmp_path, small_tokenizer_dir, moved):
    """No --tokenizer: a checkpoint of RUN_DIR/stages/NN-name/checkpoint takes the tokenizer the run's
    manifest names (or RUN_DIR/tokenizer once the run directory moved), and AutoTokenizer loads it."""
    import shutil

    from orchestration.pipeline.run_manifest import RunManifest

    run_dir = tmp_path / "run"
    shutil.copytree(small_tokenizer_dir, run_dir / "tokenizer")
    named = tmp_path / "elsewhere" / "tokenizer" if moved else run_dir / "tokenizer"
    RunManifest({"path": "r.toml", "sha256": "x"}, "demo", tokenizer={"path": str(named), "sha256": "x"}).save(run_dir)
    backend = get_backend("torch")
    ckpt = run_dir / "stages" / "01-stage1-general" / "checkpoint"
    backend.save(backend.init(PRESETS["tiny"].replace(vocab_size=3000)), ckpt)
    out = _export(ckpt, tmp_path / "hf")
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"wrote {tmp_path / 'hf'}: LlamaForCausalLM with the tokenizer {run_dir / 'tokenizer'}\n"
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer.decode(tokenizer.encode("한영 모델", add_special_tokens=False)) == "한영 모델"


def test_a_checkpoint_outside_a_run_says_in_one_line_it_has_no_tokenizer(tmp_path):
    backend = get_backend("torch")
    backend.save(backend.init(PRESETS["tiny"].replace(vocab_size=3000)), tmp_path / "ckpt")
    out = _export(tmp_path / "ckpt", tmp_path / "hf")
    assert out.returncode == 0 and out.stderr == "" and out.stdout.count("\n") == 1
    assert "without a tokenizer" in out.stdout and "--tokenizer DIR" in out.stdout
    assert (tmp_path / "hf" / "config.json").is_file() and not (tmp_path / "hf" / "tokenizer.json").exists()


# ---- a reward model (spec.head 'score') exports as LlamaForSequenceClassification ----------------


@pytest.fixture(scope="module", params=["tied", "untied, mha"])
def exported_reward(request, tmp_path_factory, small_tokenizer_dir):
    """A tiny reward model, initialised then perturbed (weights x5: rewards O(1-10), attention
    and RoPE moving them), saved and exported through the CLI."""
    from tests.cuda_model.conftest import perturbed

    backend = get_backend("torch")
    changes = {} if request.param == "tied" else {"tie_embeddings": False, "n_kv_heads": 4}
    spec = PRESETS["tiny"].replace(vocab_size=3000, head="score", **changes)
    model = perturbed(backend.init(spec, seed=11), seed=11)
    root = tmp_path_factory.mktemp("export-reward")
    backend.save(model, root / "ckpt")
    out = _export(root / "ckpt", root / "hf", "--tokenizer", small_tokenizer_dir)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"wrote {root / 'hf'}: LlamaForSequenceClassification with the tokenizer {small_tokenizer_dir}\n"
    return backend, model, root / "hf"


def test_transformers_gives_a_reward_models_scores(exported_reward):
    """Right-padded rows of different lengths: transformers reads the rightmost non-[PAD] token,
    ours the row's last token (lengths - 1): the same token, the same scores (<= 1e-4)."""
    backend, model, directory = exported_reward
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(directory, dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification"
    assert hf.config.num_labels == 1 and hf.config.pad_token_id == 0
    assert not (directory / "generation_config.json").exists()
    rng = np.random.default_rng(1)
    lengths = np.array([40, 7, 23, 1, 32])
    tokens = rng.integers(1, 3000, (len(lengths), 40))
    tokens[np.arange(40)[None, :] >= lengths[:, None]] = 0  # [PAD] after each row
    with torch.no_grad():
        expected = hf(torch.from_numpy(tokens), attention_mask=torch.from_numpy((tokens != 0).astype(np.int64)))
    expected = expected.logits[:, 0].numpy()
    ours = backend.rewards(model, tokens, lengths)
    # measured on the CPU: <= 6.2e-6 (rewards up to ~9)
    assert np.abs(ours - expected).max() <= 1e-4 and np.abs(expected).max() > 1.0
