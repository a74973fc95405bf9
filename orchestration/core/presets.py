"""Named model shapes: the published EXAONE ones, and small ones for tests and laptops.

The EXAONE shapes are those of the released Hugging Face configs (LGAI-EXAONE); their parameter
counts are checked against the reports in tests/orchestration/test_spec.py.
"""

from __future__ import annotations

from hanyeong.errors import ConfigError
from orchestration.core.spec import ModelSpec

VOCAB = 102_400  # the hanyeong / EXAONE tokenizer

PRESETS: dict[str, ModelSpec] = {
    # Tests, CI and the README quickstart: trains in seconds on a CPU.
    "tiny": ModelSpec(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=192,
                      rope_theta=10_000.0, max_seq_len=1024, tie_embeddings=True),
    # `tiny` at 4 layers: the depth up-scaling recipe's base (recipes/solar-dus.toml: 4 -> 6 layers).
    "tiny-4l": ModelSpec(vocab_size=VOCAB, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=192,
                         rope_theta=10_000.0, max_seq_len=1024, tie_embeddings=True),
    # A laptop model (~20M parameters without embeddings).
    "small": ModelSpec(vocab_size=VOCAB, d_model=384, n_layers=8, n_heads=6, n_kv_heads=2, d_ff=1024,
                       rope_theta=10_000.0, max_seq_len=2048, tie_embeddings=True),
    # ~1B: the GPU throughput benchmark's model.
    "1b": ModelSpec(vocab_size=VOCAB, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_ff=8192,
                    rope_theta=500_000.0, max_seq_len=4096, tie_embeddings=True),
    "exaone-3.0-7.8b": ModelSpec(vocab_size=VOCAB, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                                 d_ff=14_336, rope_theta=500_000.0, max_seq_len=4096, tie_embeddings=False),
    "exaone-3.5-2.4b": ModelSpec(vocab_size=VOCAB, d_model=2560, n_layers=30, n_heads=32, n_kv_heads=8,
                                 d_ff=7168, rope_theta=1_000_000.0, max_seq_len=32_768, tie_embeddings=True),
    "exaone-3.5-7.8b": ModelSpec(vocab_size=VOCAB, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                                 d_ff=14_336, rope_theta=1_000_000.0, max_seq_len=32_768, tie_embeddings=False),
    "exaone-3.5-32b": ModelSpec(vocab_size=VOCAB, d_model=5120, n_layers=64, n_heads=40, n_kv_heads=8,
                                d_ff=27_392, rope_theta=1_000_000.0, max_seq_len=32_768, tie_embeddings=False),
}  # fmt: skip


# Presets whose stages recompute activations unless a stage sets activation_checkpointing itself
# ([[stage]] activation_checkpointing = false turns it off): a training setting, not part of the
# spec, so checkpoints and spec.json do not change.
ACTIVATION_CHECKPOINTING: frozenset[str] = frozenset({"exaone-3.5-32b"})


def activation_checkpointing(preset: str | None) -> bool:
    """Whether a stage of a run on `preset` recomputes activations when it does not say (None: a
    run from init_checkpoint, no preset: off)."""
    return preset in ACTIVATION_CHECKPOINTING


def get_preset(name: str) -> ModelSpec:
    """The spec of a named preset; an unknown name lists the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}") from None
