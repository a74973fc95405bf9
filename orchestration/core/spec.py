"""The one model spec both backends build: a Llama-family decoder (pre-RMSNorm, SwiGLU, GQA, RoPE).

`ModelSpec` checks itself on construction, round-trips through `spec.json`, and knows its parameter
count, training FLOPs and memory. Backends read it and never define their own args class. RoPE
frequencies are computed here, in numpy, so both backends rotate by exactly the same angles.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from hanyeong.errors import ConfigError
from orchestration.core.config import build

ROPE_SCALING_TYPES = ("linear", "llama3")
HEADS = ("lm", "score")  # what the decoder's last hidden states feed: next-token logits, or one score


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling for long context, as Hugging Face Llama configs spell it."""

    rope_type: str = "llama3"
    """'linear' (positions divided by factor) or 'llama3' (Llama 3.1's wavelength-banded scaling)."""
    factor: float = 8.0
    """How much longer the context becomes than the original one."""
    low_freq_factor: float = 1.0
    """llama3 only: wavelengths longer than original/low_freq_factor are scaled fully."""
    high_freq_factor: float = 4.0
    """llama3 only: wavelengths shorter than original/high_freq_factor are kept."""
    original_max_position_embeddings: int = 8192
    """llama3 only: the context length the model was pretrained at."""

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_SCALING_TYPES:
            raise ConfigError(f"rope_type must be one of {ROPE_SCALING_TYPES}, got {self.rope_type!r}")
        if not self.factor >= 1.0:
            raise ConfigError(f"factor must be >= 1, got {self.factor}")
        if self.rope_type == "llama3" and not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ConfigError(f"low_freq_factor must be in (0, high_freq_factor), got {self.low_freq_factor} "
                              f"and {self.high_freq_factor}")  # fmt: skip


@dataclass(frozen=True)
class ModelSpec:
    """Shape of the decoder. Every backend, checkpoint and plan reads this one object."""

    vocab_size: int
    """Ids in the vocabulary (the tokenizer's, special block included)."""
    d_model: int
    """Width of the residual stream."""
    n_layers: int
    """Transformer blocks."""
    n_heads: int
    """Query heads; head_dim = d_model / n_heads."""
    n_kv_heads: int
    """Key/value heads (grouped-query attention); divides n_heads."""
    d_ff: int
    """Hidden width of the SwiGLU MLP."""
    rope_theta: float = 10_000.0
    """RoPE base; the long-context stage raises it."""
    max_seq_len: int = 2048
    """Longest sequence the model is trained or used at."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share the token embedding with the LM head (EXAONE 3.5 2.4B does)."""
    rope_scaling: RopeScaling | None = None
    """Optional RoPE scaling for context beyond pretraining length."""
    head: str = "lm"
    """'lm': next-token logits (`lm_head`, or the tied embedding). 'score': a reward model, one
    scalar per sequence read at its last token (`score.weight` [1, d_model], transformers'
    LlamaForSequenceClassification with num_labels=1); it has no LM head (see checkpoint.py)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"n_heads ({self.n_heads}): head_dim (d_model / n_heads = {self.head_dim}) must be even for RoPE")
        if not self.rope_theta > 1.0:
            raise ConfigError(f"rope_theta must be > 1, got {self.rope_theta}")
        if not 0.0 < self.norm_eps < 1.0:
            raise ConfigError(f"norm_eps must be in (0, 1), got {self.norm_eps}")
        if not isinstance(self.tie_embeddings, bool):
            raise ConfigError(f"tie_embeddings must be true or false, got {self.tie_embeddings!r}")
        if self.head not in HEADS:
            raise ConfigError(f"head must be one of {', '.join(HEADS)}, got {self.head!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def score_init_std(self) -> float:
        """Std of a fresh score head: 1/sqrt(d_model + 1), the reward head of OpenAI's
        lm-human-preferences (Ziegler et al. 2019): with unit-RMS final hidden states the first
        rewards are ~N(0, 1) at any width, so the decoder gets gradients from the first step
        (a zero head would give it none until the head has moved)."""
        return 1.0 / math.sqrt(self.d_model + 1)

    # ---- size and cost -------------------------------------------------------------------------

    def parameter_count(self, embeddings: bool = True) -> int:
        """Trainable parameters; `embeddings=False` leaves out the input embedding (and a tied head)."""
        d, block = self.d_model, self.block_parameter_count()
        if self.head == "score":
            head = d  # score.weight [1, d]; a reward model keeps no LM head
        else:
            head = 0 if self.tie_embeddings else self.vocab_size * d
        total = self.n_layers * block + d + head  # + final norm
        return total + (self.vocab_size * d if embeddings else 0)

    def block_parameter_count(self) -> int:
        """Parameters of one transformer block: attention, SwiGLU MLP and its two RMSNorm weights."""
        d, kv = self.d_model, self.n_kv_heads * self.head_dim
        attention = 2 * d * d + 2 * d * kv  # q, o: d x d; k, v: d x kv
        return attention + 3 * d * self.d_ff + 2 * d  # SwiGLU gate/up/down, two RMSNorm weights

    def training_flops(self, tokens: float) -> float:
        """6·N·D: the convention of the EXAONE 3.5 report (and Kaplan et al.), N with embeddings."""
        return 6.0 * self.parameter_count() * tokens

    def attention_flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token of the attention scores and mixing, left out of 6·N·D.

        12·L·d·T (forward 4·L·d·T: QK^T and AV, each 2·d·T; backward twice that), causal masking
        not discounted, as in the PaLM / torchtitan MFU accounting.
        """
        return 12.0 * self.n_layers * self.d_model * (seq_len or self.max_seq_len)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token including attention: what MFU is measured against."""
        return 6.0 * self.parameter_count() + self.attention_flops_per_token(seq_len)

    def memory_bytes(
        self,
        seq_len: int | None = None,
        micro_batch: int = 1,
        devices: int = 1,
        param_bytes: int = 2,
        master_weights: bool = True,
        activation_checkpointing: bool = False,
    ) -> dict[str, float]:
        """Bytes per device when training with AdamW, weights/grads/optimizer sharded over `devices` (FSDP).

        Weights and grads in `param_bytes` (2 for bf16), fp32 master copy when `master_weights`, two
        fp32 Adam moments. Activations per layer and token follow Korthikanti et al. (2022) with
        flash attention (no T×T scores kept): about 34·d bytes in bf16 plus the SwiGLU's wider MLP,
        for `micro_batch` rows of `seq_len`. With activation checkpointing (both backends: per
        block, cuda_model/model.py and mlx_model/model.py) every block keeps only its input (2·d
        bytes), and one block's activations live again while the backward pass recomputes it.
        """
        n = self.parameter_count()
        weights = n * param_bytes / devices
        grads = n * param_bytes / devices
        optimizer = n * (8 + (4 if master_weights and param_bytes < 4 else 0)) / devices
        tokens = (seq_len or self.max_seq_len) * micro_batch
        # attention block ~ 11·d (inputs, q, k, v, output, norm) + MLP 3·d_ff·2 + residual/norm
        block = 2 * (11 * self.d_model + 3 * self.d_ff + 2 * self.d_model)  # bytes per token
        if activation_checkpointing:
            kept = self.n_layers * tokens * 2 * self.d_model + tokens * block
        else:
            kept = self.n_layers * tokens * block
        logits = tokens * self.vocab_size * 4  # fp32 logits for the loss
        activations = kept + logits
        total = weights + grads + optimizer + activations
        return {"weights": weights, "grads": grads, "optimizer": optimizer, "activations": activations, "total": total}

    # ---- RoPE ----------------------------------------------------------------------------------

    def rope_inv_freq(self, rope_theta: float | None = None) -> np.ndarray:
        """Inverse frequencies [head_dim/2] float64, after rope_scaling: the angles both backends use."""
        theta = rope_theta or self.rope_theta
        dim = self.head_dim
        inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
        scaling = self.rope_scaling
        if scaling is None:
            return inv_freq
        if scaling.rope_type == "linear":
            return inv_freq / scaling.factor
        # Llama 3.1: keep high frequencies, divide low ones by factor, interpolate in between.
        old = scaling.original_max_position_embeddings
        low_wavelen, high_wavelen = old / scaling.low_freq_factor, old / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled)

    # ---- serialization -------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """The fields by name; `head` only when not 'lm', so a language model's spec.json is what it
        was before heads existed (its bytes key reference caches and stage identities)."""
        data = asdict(self)
        if data["head"] == "lm":
            del data["head"]
        return data

    @classmethod
    def from_dict(cls, data: dict, where: str = "spec") -> ModelSpec:
        """From a dict (spec.json, a recipe table); unknown keys are an error naming them."""
        return build(cls, data, where)

    def replace(self, **changes) -> ModelSpec:
        """A copy with some fields changed, validated again (e.g. a larger rope_theta)."""
        return ModelSpec.from_dict({**self.to_dict(), **changes})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> ModelSpec:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path}: cannot read the model spec ({err})") from None
        try:
            return cls.from_dict(data, where="")
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None

