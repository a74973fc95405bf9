"""Full definition of the hanyeong decoder in PyTorch, all of it in this file.

A Llama-family decoder built from `orchestration.core.spec.ModelSpec`: pre-RMSNorm, GQA attention with
rotate-half RoPE, SwiGLU MLP, final norm, LM head (tied to the embedding or not), or for a reward
model (spec.head 'score') a scalar score head read at each row's last token. Attribute names
are the Hugging Face Llama checkpoint names, so `state_dict()` is `model.safetensors` with no
mapping (STYLE rule 4). Single-device code: no device strings, no parallelism (STYLE part 3.2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from hanyeong.errors import ConfigError
from orchestration.core.spec import ModelSpec

# SDPA grew enable_gqa in torch 2.5; before it, key/value heads are repeated by hand
SDPA_GQA = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 5)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 (bf16 squares lose precision), then scale, as HF LlamaRMSNorm does
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_tables(spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (max_seq_len, head_dim) fp32 for every position, from the spec's inverse frequencies."""
    inv_freq = torch.from_numpy(spec.rope_inv_freq()).float()  # HF keeps inv_freq in fp32
    positions = torch.arange(spec.max_seq_len, dtype=torch.float32, device=inv_freq.device)  # CPU
    freqs = torch.outer(positions, inv_freq)  # (max_seq_len, head_dim/2), one fp32 product like HF
    emb = torch.cat((freqs, freqs), dim=-1)  # rotate-half layout: both halves share a frequency
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, T, hd); cos/sin (B or 1, 1, T, hd)."""
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Keys and values of past positions for generation, allocated on first use.

    k[i], v[i]: (B, n_kv_heads, capacity, head_dim) of layer i; segments (B, capacity) the document
    of each cached position (left padding is its own document, so it is never attended to).
    """

    def __init__(self, capacity: int):
        self.capacity = capacity  # positions: prompt + new tokens
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.length = 0  # positions filled
        self.segments: torch.Tensor | None = None  # (B, capacity)
        self.next_pos: torch.Tensor | None = None  # (B,) RoPE position of the next token per row

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv, T, hd) after the filled part; return all keys and values so far."""
        B, H, T, D = k.shape
        if layer == len(self.k):  # first call for this layer: allocate in the dtype autocast gives
            self.k.append(k.new_zeros(B, H, self.capacity, D))
            self.v.append(v.new_zeros(B, H, self.capacity, D))
        end = self.length + T
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def layout(
    tokens: torch.Tensor, segment_ids: torch.Tensor | None, cache: KVCache | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RoPE positions (B or 1, T) and an attention mask (B, 1, T, S) bool, or None for plain causal.

    Positions restart at 0 with each document, so a packed document sees exactly what it would
    see alone. With a cache, tokens given without segment_ids continue each row's last document.
    """
    B, T = tokens.shape
    idx = torch.arange(T, device=tokens.device)
    if segment_ids is None and cache is None:
        return idx[None], None  # the fast path: SDPA's own causal mask, flash attention on CUDA
    offset = 0 if cache is None else cache.length
    if cache is not None and cache.segments is None:
        cache.segments = tokens.new_zeros(B, cache.capacity)
        cache.next_pos = tokens.new_zeros(B)
    if segment_ids is None:
        last = cache.segments[:, offset - 1 : offset] if offset else tokens.new_zeros(B, 1)
        segment_ids = last.expand(B, T)
    prev_seg = (
        tokens.new_full((B, 1), -1) if offset == 0 else cache.segments[:, offset - 1 : offset]
    )
    starts = segment_ids != torch.cat((prev_seg, segment_ids[:, :-1]), dim=1)  # (B, T) new document
    start_idx = torch.where(starts, idx, -1).cummax(dim=1).values  # last start at or before t
    carry = 0 if cache is None else cache.next_pos[:, None]
    positions = torch.where(start_idx >= 0, idx - start_idx, carry + idx)  # (B, T)
    key_seg = (
        segment_ids if cache is None else torch.cat((cache.segments[:, :offset], segment_ids), 1)
    )
    key_idx = torch.arange(offset + T, device=tokens.device)
    causal = key_idx[None, :] <= (offset + idx)[:, None]  # (T, S)
    mask = (segment_ids[:, :, None] == key_seg[:, None, :]) & causal  # (B, T, S)
    if cache is not None:
        cache.segments[:, offset : offset + T] = segment_ids
        cache.next_pos = positions[:, -1] + 1
    return positions, mask[:, None]


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv_heads = layer, spec.n_heads, spec.n_kv_heads
        self.head_dim = spec.head_dim
        kv = spec.n_kv_heads * spec.head_dim
        self.q_proj = nn.Linear(spec.d_model, spec.d_model, bias=False)
        self.k_proj = nn.Linear(spec.d_model, kv, bias=False)
        self.v_proj = nn.Linear(spec.d_model, kv, bias=False)
        self.o_proj = nn.Linear(spec.d_model, spec.d_model, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        B, T, D = x.shape  # batch, sequence length, d_model
        nh, nkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, T, nh, hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, nkv, hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, nkv, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nkv, S, hd)
        if mask is None and SDPA_GQA:  # flash attention handles GQA itself
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            # masked SDPA on CUDA runs the memory-efficient kernel, which wants equal head counts
            k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.gate_proj = nn.Linear(spec.d_model, spec.d_ff, bias=False)
        self.up_proj = nn.Linear(spec.d_model, spec.d_ff, bias=False)
        self.down_proj = nn.Linear(spec.d_ff, spec.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class TransformerBlock(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int):
        super().__init__()
        # registered in data-flow order, which is also the order of checkpoint.parameter_names
        self.input_layernorm = RMSNorm(spec.d_model, spec.norm_eps)
        self.self_attn = Attention(spec, layer)
        self.post_attention_layernorm = RMSNorm(spec.d_model, spec.norm_eps)
        self.mlp = MLP(spec)

    def forward(self, x, cos, sin, mask, cache):  # x (B, T, d_model)
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.d_model)
        self.layers = nn.ModuleList(TransformerBlock(spec, i) for i in range(spec.n_layers))
        self.norm = RMSNorm(spec.d_model, spec.norm_eps)
        # a training setting, not a weight: cuda_model/step.init_train_state sets it
        self.activation_checkpointing = False
        """Recompute each block's activations in the backward pass (training forwards only)."""
        cos, sin = rope_tables(spec)
        # not persistent: derived from the spec, never part of a checkpoint
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(
        self,
        tokens: torch.Tensor,
        segment_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """tokens (B, T) int -> final hidden states (B, T, d_model)."""
        end = tokens.shape[1] + (0 if cache is None else cache.length)
        if end > self.rope_cos.shape[0]:  # positions never exceed the index in the sequence
            raise ValueError(
                f"sequence of {end} tokens is longer than spec.max_seq_len ({self.rope_cos.shape[0]})"
            )
        positions, mask = layout(tokens, segment_ids, cache)
        h = self.embed_tokens(tokens)
        # (B or 1, 1, T, hd): cast like HF, which computes cos/sin in fp32 and then uses x's dtype
        cos = self.rope_cos[positions][:, None].to(h.dtype)
        sin = self.rope_sin[positions][:, None].to(h.dtype)
        # only a training forward recomputes: each block keeps just its input h (B, T, d_model)
        recompute = (self.activation_checkpointing and self.training and torch.is_grad_enabled()
                     and cache is None)  # fmt: skip
        for layer in self.layers:
            if recompute:
                h = checkpoint(layer, h, cos, sin, mask, None, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, cache)
        if cache is not None:
            cache.length += tokens.shape[1]
        return self.norm(h)


class Model(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.model = LlamaModel(spec)
        reward = spec.head == "score"
        # tied, or a reward model: no lm_head module at all, so state_dict() has no lm_head.weight
        # (as transformers saves a tied LlamaForCausalLM and any LlamaForSequenceClassification)
        self.lm_head = (
            None
            if spec.tie_embeddings or reward
            else nn.Linear(spec.d_model, spec.vocab_size, bias=False)
        )
        # a reward model's head, one score per sequence: LlamaForSequenceClassification's `score`
        self.score = nn.Linear(spec.d_model, 1, bias=False) if reward else None

    def head_weight(self) -> torch.Tensor:
        if self.score is not None:
            raise ConfigError("this is a reward model (spec head 'score'): it scores sequences "
                              "(rewards), it has no LM head to predict tokens with")  # fmt: skip
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def rewards(self, tokens: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) int, last (B,) int: each row's scored position -> rewards (B,) fp32, the
        score head on the final hidden state there (right padding after `last` is never seen)."""
        if self.score is None:
            raise ConfigError("this is a language model (spec head 'lm'): it has no score head to "
                              "give rewards; train a reward stage (kind 'reward') from it")  # fmt: skip
        h = self.model(tokens)  # (B, T, d_model)
        h = h[torch.arange(tokens.shape[0], device=tokens.device), last]  # (B, d_model)
        return self.score(h)[:, 0].float()

    def forward(
        self,
        tokens: torch.Tensor,
        segment_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """tokens (B, T) int -> logits (B, T, vocab); segment_ids (B, T) keeps packed documents apart."""
        return F.linear(self.model(tokens, segment_ids, cache), self.head_weight())

    def new_cache(self, capacity: int) -> KVCache:
        """An empty cache for up to `capacity` positions (its batch size is the first call's)."""
        return KVCache(capacity)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Normal(0, 0.02); residual outputs (o_proj, down_proj) 0.02/sqrt(2·n_layers) as GPT-2 and
        OLMo do; a score head spec.score_init_std; norms 1. Drawn on the CPU from one generator,
        so a seed gives the same weights on every device."""
        generator = torch.Generator().manual_seed(seed)
        residual_std = 0.02 / math.sqrt(2 * self.spec.n_layers)
        for name, p in self.named_parameters():  # registration order: fixed by the spec
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            std = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
            std = self.spec.score_init_std if name == "score.weight" else std
            p.copy_(
                torch.empty(p.shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
            )
