"""Export a checkpoint as a Hugging Face Llama directory that transformers and mlx-lm load.

The checkpoint's tensor names already are the Llama ones, so the weights are copied as they are;
only config.json (and the tokenizer files) are written. No framework is needed.

A reward model (spec.head 'score') exports as LlamaForSequenceClassification with num_labels=1:
its `score.weight` is that class's head, and pad_token_id ([PAD], 0) is how transformers finds the
token it scores, the rightmost one that is not padding. Our rewards are read at the last answer
token of rows that end there (orchestration/pipeline/reward_stage.py), padded after it with [PAD],
which no text encodes to: the same token, so the same scores.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from orchestration.core import checkpoint
from hanyeong.errors import CheckpointError
from orchestration.core.spec import ModelSpec

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# The special block of a hanyeong tokenizer (tokenizer/specials.py): [PAD] [BOS] [EOS] ...
PAD_ID, BOS_ID, EOS_ID, END_OF_TURN_ID = 0, 1, 2, 7


def architecture(spec: ModelSpec) -> str:
    """The transformers class an export of `spec` loads as."""
    return "LlamaForSequenceClassification" if spec.head == "score" else "LlamaForCausalLM"


def llama_config(spec: ModelSpec) -> dict:
    """config.json of a LlamaForCausalLM (or, for a reward model, a LlamaForSequenceClassification
    with one label) with the spec's shape."""
    config = {
        "architectures": [architecture(spec)],
        "model_type": "llama",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.d_model,
        "intermediate_size": spec.d_ff,
        "num_hidden_layers": spec.n_layers,
        "num_attention_heads": spec.n_heads,
        "num_key_value_heads": spec.n_kv_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_seq_len,
        "rms_norm_eps": spec.norm_eps,
        "rope_theta": spec.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": spec.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pad_token_id": PAD_ID,
        "bos_token_id": BOS_ID,
        "eos_token_id": [EOS_ID, END_OF_TURN_ID],
        "torch_dtype": "float32",
    }
    if spec.head == "score":  # num_labels = 1, as transformers writes it; no LM head to tie
        config |= {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}, "tie_word_embeddings": False}
    if spec.rope_scaling is not None:
        scaling = spec.rope_scaling
        config["rope_scaling"] = (
            {"rope_type": "linear", "factor": scaling.factor}
            if scaling.rope_type == "linear"
            else {
                "rope_type": "llama3",
                "factor": scaling.factor,
                "low_freq_factor": scaling.low_freq_factor,
                "high_freq_factor": scaling.high_freq_factor,
                "original_max_position_embeddings": scaling.original_max_position_embeddings,
            }
        )
    return config


def export_hf(ckpt: str | Path, out: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """Write `out` (atomically): config.json, generation_config.json (language models),
    model.safetensors, tokenizer files."""
    ckpt, out = Path(ckpt), Path(out)
    spec = checkpoint.load_spec(ckpt)
    if tokenizer_dir is not None:
        tokenizer_dir = Path(tokenizer_dir)
        missing = [f for f in TOKENIZER_FILES if not (tokenizer_dir / f).is_file()]
        if missing:
            raise CheckpointError(f"{tokenizer_dir}: no {', '.join(missing)} (give a hanyeong tokenizer directory)")
        vocab = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
        size = len(vocab["model"]["vocab"]) + sum(1 for t in vocab["added_tokens"] if t["content"] not in vocab["model"]["vocab"])
        if size != spec.vocab_size:
            raise CheckpointError(f"{tokenizer_dir}: {size:,} token ids, the model has vocab_size {spec.vocab_size:,}")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        (tmp / "config.json").write_text(json.dumps(llama_config(spec), indent=2) + "\n", encoding="utf-8")
        if spec.head == "lm":  # a reward model does not generate
            generation = {"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, END_OF_TURN_ID], "pad_token_id": PAD_ID}
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
        shutil.copyfile(checkpoint.weights_file(ckpt), tmp / "model.safetensors")
        for name in TOKENIZER_FILES if tokenizer_dir is not None else ():
            shutil.copyfile(tokenizer_dir / name, tmp / name)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
