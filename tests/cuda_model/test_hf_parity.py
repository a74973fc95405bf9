"""Our logits equal transformers.LlamaForCausalLM's on the same weights (CPU, fp32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from orchestration.core.spec import ModelSpec, RopeScaling
from tests.check_model import random_tokens
from tests.cuda_model.conftest import perturbed, tiny

transformers = pytest.importorskip("transformers")


def hf_config(spec: ModelSpec):
    """The LlamaConfig equivalent to `spec` (transformers 5 spells RoPE as rope_parameters)."""
    rope = {"rope_type": "default", "rope_theta": spec.rope_theta}
    if spec.rope_scaling is not None:
        rope = {**rope, **spec.rope_scaling.__dict__}
    common = dict(
        vocab_size=spec.vocab_size, hidden_size=spec.d_model, intermediate_size=spec.d_ff,
        num_hidden_layers=spec.n_layers, num_attention_heads=spec.n_heads,
        num_key_value_heads=spec.n_kv_heads, head_dim=spec.head_dim, hidden_act="silu",
        max_position_embeddings=spec.max_seq_len, rms_norm_eps=spec.norm_eps,
        tie_word_embeddings=spec.tie_embeddings, attention_bias=False, mlp_bias=False,
    )  # fmt: skip
    if int(transformers.__version__.split(".")[0]) >= 5:
        return transformers.LlamaConfig(rope_parameters=rope, **common)
    scaling = (
        None if spec.rope_scaling is None else {k: v for k, v in rope.items() if k != "rope_theta"}
    )
    return transformers.LlamaConfig(rope_theta=spec.rope_theta, rope_scaling=scaling, **common)


def hf_model(spec: ModelSpec, state_dict: dict[str, torch.Tensor]):
    hf = transformers.LlamaForCausalLM(hf_config(spec)).eval()
    missing, unexpected = hf.load_state_dict(state_dict, strict=False)
    assert not unexpected
    assert set(missing) <= ({"lm_head.weight"} if spec.tie_embeddings else set())
    if spec.tie_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    return hf


LLAMA3 = RopeScaling(
    rope_type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=32,
)  # fmt: skip  (tiny: all three bands in play)


@pytest.mark.parametrize(
    "spec",
    [tiny(), tiny(tie_embeddings=False, rope_theta=500_000.0), tiny(rope_scaling=LLAMA3),
     tiny(rope_scaling=RopeScaling(rope_type="linear", factor=4.0))],
    ids=["tied", "untied", "llama3-rope", "linear-rope"],
)  # fmt: skip
def test_logits_match_transformers(backend, spec):
    model = backend.init(spec, seed=5)
    with torch.no_grad():  # larger weights than the init's, so logits are O(1) and differences show
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.mul_(5.0)
    hf = hf_model(spec, model.state_dict())
    tokens = random_tokens(spec, (2, 48))
    with torch.no_grad():
        expected = hf(input_ids=torch.from_numpy(tokens)).logits.numpy()
    ours = backend.logits(model, tokens)
    assert np.abs(ours - expected).max() <= 1e-4
    assert np.abs(expected).max() > 1.0  # the comparison is not between two near-zero arrays


@pytest.mark.parametrize("spec", [tiny(), tiny(tie_embeddings=False, n_kv_heads=4, rope_scaling=LLAMA3)],
                         ids=["tied-gqa", "untied-llama3-rope"])  # fmt: skip
def test_greedy_generation_matches_transformers(backend, spec):
    """Our KV-cache generation (ragged prompts, left padding) against transformers' generate, token
    for token, at weights where a wrong rotation or cache position changes the continuation."""
    model = perturbed(backend.init(spec, seed=3))
    hf = hf_model(spec, model.state_dict())
    hf.generation_config.eos_token_id = None  # generate all 12 tokens, as ours does without stop ids
    hf.generation_config.pad_token_id = 0
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3], [40, 41, 42]]
    ours = backend.generate(model, prompts, max_new_tokens=12)
    for prompt, got in zip(prompts, ours):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
        assert got == out[0, len(prompt) :].tolist(), prompt


def test_inverse_frequencies_match_transformers(backend):
    spec = tiny(rope_scaling=LLAMA3)
    hf = transformers.LlamaForCausalLM(hf_config(spec))
    np.testing.assert_allclose(
        spec.rope_inv_freq(), hf.model.rotary_emb.inv_freq.double().numpy(), rtol=1e-6
    )
