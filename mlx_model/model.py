"""Full definition of the hanyeong decoder in MLX, all of it in this file.

A Llama-family decoder built from `orchestration.core.spec.ModelSpec`: pre-RMSNorm, GQA attention with
rotate-half RoPE, SwiGLU MLP, final norm, LM head (tied to the embedding or not), or for a reward
model (spec.head 'score') a scalar score head read at each row's last token. Attribute names
are the Hugging Face Llama checkpoint names, so `tree_flatten(model.parameters())` is
`model.safetensors` with no mapping (STYLE rule 4). It reads as cuda_model/model.py with MLX in
place of PyTorch; the fast kernels (`mx.fast.rms_norm`, `rope`, `scaled_dot_product_attention`)
are used wherever the layout allows.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from hanyeong.errors import ConfigError
from orchestration.core.spec import ModelSpec

# RoPE positions: an offset (int, or (B,) per row) for the fast kernel, or (B, T) positions
Positions = int | mx.array


class RoPE(nn.Module):
    """Rotate-half RoPE at the spec's frequencies (rope_scaling included); no parameters."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        inv_freq = spec.rope_inv_freq()  # (head_dim/2,) float64
        self.dims = spec.head_dim
        # names starting with "_" are not parameters, so they never reach a checkpoint
        self._inv_freq = mx.array(inv_freq, dtype=mx.float32)
        self._freqs = mx.array(1.0 / inv_freq, dtype=mx.float32)  # mx.fast.rope takes 1/inv_freq

    def __call__(self, x: mx.array, positions: Positions) -> mx.array:
        """x (B, heads, T, hd); positions: offset int / (B,) (contiguous rows) or (B, T)."""
        if isinstance(positions, int) or positions.ndim <= 1:
            return mx.fast.rope(x, self.dims, traditional=False, base=None, scale=1.0,
                                offset=positions, freqs=self._freqs)  # fmt: skip
        # packed documents restart positions mid-row; the kernel takes only offsets: rotate by hand
        # (B, 1, T, hd/2): one fp32 product, as HF computes its angles
        angles = positions[:, None, :, None].astype(mx.float32) * self._inv_freq
        emb = mx.concatenate([angles, angles], axis=-1)  # both halves share a frequency
        x1, x2 = mx.split(x, 2, axis=-1)
        rotated = mx.concatenate([-x2, x1], axis=-1)
        return x * mx.cos(emb).astype(x.dtype) + rotated * mx.sin(emb).astype(x.dtype)


class KVCache:
    """Keys and values of past positions for generation.

    k[i], v[i]: (B, n_kv_heads, capacity, head_dim) of layer i, allocated on first use; segments
    (B, S) the document of each cached position (left padding is its own document, never attended).
    """

    def __init__(self, capacity: int):
        self.capacity = capacity  # positions: prompt + new tokens
        self.k: list[mx.array] = []
        self.v: list[mx.array] = []
        self.length = 0  # positions filled
        self.segments: mx.array | None = None  # (B, length)
        self.next_pos: mx.array | None = None  # (B,) RoPE position of the next token per row

    def update(self, layer: int, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Store k, v (B, n_kv, T, hd) after the filled part; return all keys and values so far."""
        B, H, T, D = k.shape
        if layer == len(self.k):
            self.k.append(mx.zeros((B, H, self.capacity, D), k.dtype))
            self.v.append(mx.zeros((B, H, self.capacity, D), v.dtype))
        end = self.length + T
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def layout(
    tokens: mx.array, segment_ids: mx.array | None, cache: KVCache | None
) -> tuple[Positions, str | mx.array]:
    """RoPE positions and an attention mask: "causal", or (B, 1, T, S) bool.

    Positions restart at 0 with each document, so a packed document sees exactly what it would
    see alone. With a cache, tokens given without segment_ids continue each row's last document.
    """
    B, T = tokens.shape
    if segment_ids is None and cache is None:
        return 0, "causal"  # the fast path: both fast kernels, no mask array
    offset = 0 if cache is None else cache.length
    if cache is not None and cache.segments is None:
        cache.segments = mx.zeros((B, 0), mx.int32)
        cache.next_pos = mx.zeros((B,), mx.int32)
    idx = mx.arange(T, dtype=mx.int32)
    if segment_ids is None:  # continuing: positions run on from next_pos, an offset per row
        last = cache.segments[:, -1:] if offset else mx.zeros((B, 1), mx.int32)
        segment_ids = mx.broadcast_to(last, (B, T))
        positions = cache.next_pos  # (B,)
    else:
        segment_ids = segment_ids.astype(mx.int32)
        prev = mx.full((B, 1), -1, mx.int32) if offset == 0 else cache.segments[:, -1:]
        # (B, T) true where a new document starts
        starts = segment_ids != mx.concatenate([prev, segment_ids[:, :-1]], axis=1)
        start_idx = mx.cummax(mx.where(starts, idx, -1), axis=1)  # last start at or before t
        carry = 0 if cache is None else cache.next_pos[:, None]
        positions = mx.where(start_idx >= 0, idx - start_idx, carry + idx)  # (B, T)
    key_seg = segment_ids if cache is None else mx.concatenate([cache.segments, segment_ids], 1)
    key_idx = mx.arange(offset + T, dtype=mx.int32)
    causal = key_idx[None, :] <= (offset + idx)[:, None]  # (T, S)
    mask = (segment_ids[:, :, None] == key_seg[:, None, :]) & causal  # (B, T, S)
    if cache is not None:
        cache.segments = key_seg
        cache.next_pos = (positions + T) if positions.ndim == 1 else positions[:, -1] + 1
    return positions, mask[:, None]


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv_heads = layer, spec.n_heads, spec.n_kv_heads
        self.head_dim, self.scale = spec.head_dim, spec.head_dim**-0.5
        kv = spec.n_kv_heads * spec.head_dim
        self.q_proj = nn.Linear(spec.d_model, spec.d_model, bias=False)
        self.k_proj = nn.Linear(spec.d_model, kv, bias=False)
        self.v_proj = nn.Linear(spec.d_model, kv, bias=False)
        self.o_proj = nn.Linear(spec.d_model, spec.d_model, bias=False)
        self.rope = RoPE(spec)

    def __call__(
        self, x: mx.array, positions: Positions, mask: str | mx.array, cache: KVCache | None
    ) -> mx.array:
        B, T, D = x.shape  # batch, sequence length, d_model
        H, KV, hd = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.q_proj(x).reshape(B, T, H, hd).transpose(0, 2, 1, 3)  # (B, nh, T, hd)
        k = self.k_proj(x).reshape(B, T, KV, hd).transpose(0, 2, 1, 3)  # (B, nkv, T, hd)
        v = self.v_proj(x).reshape(B, T, KV, hd).transpose(0, 2, 1, 3)
        q, k = self.rope(q, positions), self.rope(k, positions)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nkv, S, hd)
        # (B, nh, T, hd); GQA without tiling k, v: the kernel groups query heads itself
        y = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(y.transpose(0, 2, 1, 3).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.gate_proj = nn.Linear(spec.d_model, spec.d_ff, bias=False)
        self.up_proj = nn.Linear(spec.d_model, spec.d_ff, bias=False)
        self.down_proj = nn.Linear(spec.d_ff, spec.d_model, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class TransformerBlock(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(spec.d_model, eps=spec.norm_eps)  # mx.fast.rms_norm
        self.self_attn = Attention(spec, layer)
        self.post_attention_layernorm = nn.RMSNorm(spec.d_model, eps=spec.norm_eps)
        self.mlp = MLP(spec)

    def __call__(self, x, positions, mask, cache):  # x (B, T, d_model)
        h = x + self.self_attn(self.input_layernorm(x), positions, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


def checkpointed(
    block: TransformerBlock, x: mx.array, positions: Positions, mask: str | mx.array
) -> mx.array:
    """block(x) whose activations the backward pass recomputes from x (mx.checkpoint), as mlx-lm's
    grad_checkpoint does; the parameters go in as arguments so their gradients flow through."""
    params = block.trainable_parameters()

    def run(params: dict, x: mx.array) -> mx.array:
        block.update(params)
        return block(x, positions, mask, None)

    out = mx.checkpoint(run)(params, x)
    block.update(params)  # the module keeps its own arrays, not the checkpoint's
    return out


class LlamaModel(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.max_seq_len = spec.max_seq_len
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.d_model)
        self.layers = [TransformerBlock(spec, i) for i in range(spec.n_layers)]
        self.norm = nn.RMSNorm(spec.d_model, eps=spec.norm_eps)
        # a training setting, not a weight: mlx_model/step.init_train_state sets it
        self.activation_checkpointing = False
        """Recompute each block's activations when differentiating (a plain forward, which is
        all evaluation and generation run, computes each block once either way)."""

    def __call__(
        self, tokens: mx.array, segment_ids: mx.array | None = None, cache: KVCache | None = None
    ) -> mx.array:
        """tokens (B, T) int -> final hidden states (B, T, d_model)."""
        end = tokens.shape[1] + (0 if cache is None else cache.length)
        if end > self.max_seq_len:  # positions never exceed the index in the sequence
            raise ValueError(
                f"sequence of {end} tokens is longer than spec.max_seq_len ({self.max_seq_len})"
            )
        positions, mask = layout(tokens, segment_ids, cache)
        h = self.embed_tokens(tokens)
        # recomputed only where a gradient is taken (the train step); evaluation and generation run
        # each block once either way, and a cached forward never goes through mx.checkpoint
        recompute = self.activation_checkpointing and cache is None
        for layer in self.layers:
            if recompute:
                h = checkpointed(layer, h, positions, mask)
            else:
                h = layer(h, positions, mask, cache)
        if cache is not None:
            cache.length += tokens.shape[1]
        return self.norm(h)


class Model(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.model = LlamaModel(spec)
        reward = spec.head == "score"
        # tied, or a reward model: no lm_head module at all, so no lm_head.weight parameter (as
        # transformers saves a tied LlamaForCausalLM and any LlamaForSequenceClassification)
        if not (spec.tie_embeddings or reward):
            self.lm_head = nn.Linear(spec.d_model, spec.vocab_size, bias=False)
        if reward:  # one score per sequence: LlamaForSequenceClassification's `score`
            self.score = nn.Linear(spec.d_model, 1, bias=False)

    def head(self, h: mx.array) -> mx.array:
        """Hidden states (..., d_model) -> logits (..., vocab)."""
        if self.spec.head == "score":
            raise ConfigError("this is a reward model (spec head 'score'): it scores sequences "
                              "(rewards), it has no LM head to predict tokens with")  # fmt: skip
        return self.model.embed_tokens.as_linear(h) if self.spec.tie_embeddings else self.lm_head(h)

    def rewards(self, tokens: mx.array, last: mx.array) -> mx.array:
        """tokens (B, T) int, last (B,) int: each row's scored position -> rewards (B,) fp32, the
        score head on the final hidden state there (right padding after `last` is never seen)."""
        if self.spec.head != "score":
            raise ConfigError("this is a language model (spec head 'lm'): it has no score head to "
                              "give rewards; train a reward stage (kind 'reward') from it")  # fmt: skip
        h = self.model(tokens)  # (B, T, d_model)
        h = h[mx.arange(tokens.shape[0]), last]  # (B, d_model)
        return self.score(h)[:, 0].astype(mx.float32)

    def __call__(
        self, tokens: mx.array, segment_ids: mx.array | None = None, cache: KVCache | None = None
    ) -> mx.array:
        """tokens (B, T) int -> logits (B, T, vocab); segment_ids (B, T) keeps documents apart."""
        return self.head(self.model(tokens, segment_ids, cache))

    def new_cache(self, capacity: int) -> KVCache:
        """An empty cache for up to `capacity` positions (its batch size is the first call's)."""
        return KVCache(capacity)

    def init_weights(self, seed: int) -> None:
        """Normal(0, 0.02); residual outputs (o_proj, down_proj) 0.02/sqrt(2·n_layers) as GPT-2 and
        OLMo do; a score head spec.score_init_std; norms 1. One key per parameter in checkpoint
        order, so a seed fixes every weight."""
        residual_std = 0.02 / math.sqrt(2 * self.spec.n_layers)
        params = tree_flatten(self.parameters())
        keys = mx.random.split(mx.random.key(seed), len(params))
        weights = []
        for (name, p), key in zip(params, keys, strict=True):
            if name.endswith("norm.weight"):
                weights.append((name, mx.ones(p.shape, mx.float32)))
                continue
            std = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
            std = self.spec.score_init_std if name == "score.weight" else std
            weights.append((name, std * mx.random.normal(p.shape, mx.float32, key=key)))
        self.update(tree_unflatten(weights))
        mx.eval(self.parameters())
