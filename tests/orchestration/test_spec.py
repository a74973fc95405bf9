"""ModelSpec: validation, round-trips, the published EXAONE sizes and compute."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hanyeong.errors import ConfigError
from orchestration.core.presets import PRESETS, get_preset
from orchestration.core.spec import ModelSpec, RopeScaling
from tests.conftest import REPO

# Parameter counts of the released checkpoints (EXAONE 3.0 / 3.5 technical reports and HF cards).
PUBLISHED_PARAMETERS = {
    "exaone-3.0-7.8b": 7.8e9,
    "exaone-3.5-2.4b": 2.4e9,  # 2.41B in the model card (2.14B without embeddings)
    "exaone-3.5-7.8b": 7.8e9,
    "exaone-3.5-32b": 32.0e9,
}
# EXAONE 3.5 report, Table 2: model size, training tokens, training FLOPs.
PUBLISHED_COMPUTE = {"exaone-3.5-2.4b": ("6.5T", 9.36e22), "exaone-3.5-7.8b": ("9T", 4.21e23), "exaone-3.5-32b": ("6.5T", 1.25e24)}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMETERS))
def test_presets_match_published_parameter_counts(name):
    assert get_preset(name).parameter_count() == pytest.approx(PUBLISHED_PARAMETERS[name], rel=0.01)


def test_exaone_2_4b_non_embedding_parameters():
    assert get_preset("exaone-3.5-2.4b").parameter_count(embeddings=False) == pytest.approx(2.14e9, rel=0.01)


@pytest.mark.parametrize("name", sorted(PUBLISHED_COMPUTE))
def test_plan_cli_reproduces_published_compute(name):
    tokens, flops = PUBLISHED_COMPUTE[name]
    out = subprocess.run(
        [sys.executable, "-m", "orchestration.cli", "model", "plan", "--preset", name, "--tokens", tokens, "--json"],
        capture_output=True, text=True, cwd=REPO, check=True,
    )
    plan = json.loads(out.stdout)
    assert plan["training_flops"] == pytest.approx(flops, rel=0.02)
    assert plan["parameters"] == get_preset(name).parameter_count()


def test_parameter_count_equals_sum_of_tensor_shapes():
    from orchestration.core.checkpoint import parameter_names

    for spec in (PRESETS["tiny"], PRESETS["exaone-3.5-7.8b"]):
        total = sum(int(np.prod(shape)) for shape in parameter_names(spec).values())
        assert total == spec.parameter_count()


specs = st.builds(
    lambda heads, group, head_dim, layers, ff, tie: ModelSpec(
        vocab_size=300, d_model=heads * head_dim, n_layers=layers, n_heads=heads, n_kv_heads=heads // group,
        d_ff=ff, tie_embeddings=tie, rope_scaling=None,
    ),
    st.sampled_from([2, 4, 8]), st.sampled_from([1, 2]), st.sampled_from([2, 8, 16]),
    st.integers(1, 4), st.integers(1, 64), st.booleans(),
)


@given(specs)
def test_spec_round_trips_through_json(spec):
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_rope_scaling_round_trips(tmp_path):
    spec = PRESETS["tiny"].replace(rope_scaling={"rope_type": "llama3", "factor": 4.0, "original_max_position_embeddings": 512})
    spec.save(tmp_path / "spec.json")
    loaded = ModelSpec.load(tmp_path / "spec.json")
    assert loaded == spec and isinstance(loaded.rope_scaling, RopeScaling)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"d_model": 65}, "d_model"),
        ({"n_kv_heads": 3}, "n_heads"),
        ({"n_heads": 64}, "head_dim"),  # 64 / 64 = 1: odd
        ({"vocab_size": 0}, "vocab_size"),
        ({"n_layers": 2.5}, "n_layers"),
        ({"rope_theta": 0.5}, "rope_theta"),
        ({"norm_eps": 0}, "norm_eps"),
        ({"tie_embeddings": "yes"}, "tie_embeddings"),
        ({"rope_scaling": {"rope_type": "yarn"}}, "rope_type"),
        ({"dmodel": 64}, "dmodel"),
    ],
)
def test_bad_field_is_one_error_naming_it(change, field):
    with pytest.raises(ConfigError, match=field):
        ModelSpec.from_dict({**PRESETS["tiny"].to_dict(), **change})


def test_missing_field_is_named():
    data = PRESETS["tiny"].to_dict()
    del data["d_ff"]
    with pytest.raises(ConfigError, match="missing key.*d_ff"):
        ModelSpec.from_dict(data)


def test_unknown_preset_lists_known():
    with pytest.raises(ConfigError, match="tiny"):
        get_preset("exaone-4")


def test_rope_inv_freq_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled = PRESETS["tiny"].replace(
        rope_theta=500_000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64}
    )
    from orchestration.core.export_hf import llama_config

    for spec in (PRESETS["tiny"], scaled):
        config = transformers.LlamaConfig(**{k: v for k, v in llama_config(spec).items() if k != "architectures"})
        rope_type = spec.rope_scaling.rope_type if spec.rope_scaling else "default"
        if rope_type == "default":
            expected = 1.0 / (spec.rope_theta ** (np.arange(0, spec.head_dim, 2) / spec.head_dim))
        else:
            expected = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")[0].double().numpy()
        np.testing.assert_allclose(spec.rope_inv_freq(), expected, rtol=1e-6)


def test_memory_estimate_shrinks_with_sharding_and_checkpointing():
    spec = get_preset("exaone-3.5-7.8b")
    one = spec.memory_bytes(4096)
    many = spec.memory_bytes(4096, devices=8)
    assert many["weights"] == pytest.approx(one["weights"] / 8)
    # bf16 weights + grads + fp32 master + two fp32 moments = 16 bytes per parameter
    assert one["weights"] + one["grads"] + one["optimizer"] == 16 * spec.parameter_count()
    checkpointed = spec.memory_bytes(4096, activation_checkpointing=True)
    assert checkpointed["activations"] < one["activations"]
    # activation checkpointing keeps a block's input per layer (2·d bytes a token in bf16), and one
    # block's activations live again while the backward pass recomputes it
    block = (one["activations"] - 4096 * spec.vocab_size * 4) / spec.n_layers
    kept = spec.n_layers * 4096 * 2 * spec.d_model + block
    assert checkpointed["activations"] == pytest.approx(kept + 4096 * spec.vocab_size * 4)


# ---- laws added for mutation testing (benchmarks/mutations.py) ----------------------------------

# meta-llama/Llama-3.1-8B config.json: the scaling `RopeScaling()` stands for.
LLAMA_3_1_ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192}  # fmt: skip


def small_spec(**changes) -> ModelSpec:
    """Every dimension distinct, so a formula that swaps two of them shows."""
    fields = {"vocab_size": 1000, "d_model": 64, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2, "d_ff": 160,
              "max_seq_len": 256, "tie_embeddings": False}  # fmt: skip
    return ModelSpec(**{**fields, **changes})


def test_parameter_count_is_the_tensors_of_every_head_and_tying():
    """The count is the sum of model.safetensors' shapes for a tied, an untied and a reward model;
    without embeddings it leaves out exactly the input embedding (a tied head is the same tensor)."""
    from orchestration.core.checkpoint import parameter_names

    tiny = PRESETS["tiny"]
    for spec in (tiny, tiny.replace(tie_embeddings=False), tiny.replace(head="score"), small_spec()):
        shapes = parameter_names(spec)
        total = sum(int(np.prod(shape)) for shape in shapes.values())
        assert spec.parameter_count() == total
        embedding = int(np.prod(shapes["model.embed_tokens.weight"]))
        assert spec.parameter_count(embeddings=False) == total - embedding


def test_head_dim_is_an_integer():
    """Backends reshape by it: d_model / n_heads as an int, not a float that equals it."""
    spec = small_spec()
    assert isinstance(spec.head_dim, int) and spec.head_dim * spec.n_heads == spec.d_model


def test_flops_are_6nd_plus_attention():
    spec, T = small_spec(), 100
    assert spec.training_flops(1e9) == 6 * spec.parameter_count() * 1e9  # Kaplan et al.: 6·N·D
    # per layer and token, QK^T and AV each take 2·d·T FLOPs forward; backward costs twice forward
    forward = spec.n_layers * 2 * (2 * spec.d_model * T)
    assert spec.attention_flops_per_token(T) == 3 * forward
    assert spec.attention_flops_per_token() == spec.attention_flops_per_token(spec.max_seq_len)
    assert spec.flops_per_token(T) == spec.training_flops(1) + spec.attention_flops_per_token(T)
    assert spec.flops_per_token() == spec.flops_per_token(spec.max_seq_len)


@pytest.mark.parametrize("devices", [1, 4])
def test_memory_of_weights_grads_and_adamw_per_parameter(devices):
    """Weights and grads in param_bytes; AdamW's two fp32 moments (8 bytes), plus a fp32 master
    copy (4 bytes) only for weights below fp32; all sharded over the devices; total is the sum."""
    spec = small_spec()
    n = spec.parameter_count()
    for param_bytes, master, optimizer in [(2, True, 12), (2, False, 8), (4, True, 8), (4, False, 8)]:
        m = spec.memory_bytes(devices=devices, param_bytes=param_bytes, master_weights=master)
        assert m["weights"] == m["grads"] == n * param_bytes / devices
        assert m["optimizer"] == n * optimizer / devices
        assert m["total"] == m["weights"] + m["grads"] + m["optimizer"] + m["activations"]


def test_activation_memory_per_token_layer_and_vocabulary():
    """Activations grow with the tokens of a micro-batch, by the same bytes per layer (bf16: the
    block's input alone under activation checkpointing; else 13 d-wide tensors and the SwiGLU's 3
    d_ff-wide ones: gate, up, their product), plus the fp32 logits (4 bytes per vocabulary id);
    checkpointing adds one block's activations, live while the backward pass recomputes it."""

    def activations(spec, tokens=100, **kwargs):
        return spec.memory_bytes(tokens, **kwargs)["activations"]

    spec = small_spec()
    assert spec.memory_bytes() == spec.memory_bytes(spec.max_seq_len, micro_batch=1)
    for checkpointing in (False, True):
        act = activations(spec, activation_checkpointing=checkpointing)
        assert activations(spec, 200, activation_checkpointing=checkpointing) == 2 * act
        assert activations(spec, micro_batch=2, activation_checkpointing=checkpointing) == 2 * act
        wider = spec.replace(vocab_size=1500)
        assert activations(wider, activation_checkpointing=checkpointing) - act == 100 * 500 * 4

    def per_layer(spec, checkpointing):
        deeper = spec.replace(n_layers=spec.n_layers + 1)
        kwargs = {"activation_checkpointing": checkpointing}
        return (activations(deeper, **kwargs) - activations(spec, **kwargs)) / 100

    assert per_layer(spec, True) == 2 * spec.d_model
    assert per_layer(spec.replace(d_ff=spec.d_ff + 10), False) - per_layer(spec, False) == 2 * 3 * 10
    wide = spec.replace(d_model=spec.d_model + 32)
    assert per_layer(wide, False) - per_layer(spec, False) == 2 * 13 * 32
    one_block = activations(spec.replace(n_layers=1))  # one layer's activations and the logits
    inputs = spec.n_layers * 100 * 2 * spec.d_model
    assert activations(spec, activation_checkpointing=True) == inputs + one_block


def test_score_head_init_is_that_of_lm_human_preferences():
    """Ziegler et al. (2019), lm-human-preferences: the reward head's init_scale = 1/sqrt(n_embd + 1)."""
    for spec in (small_spec(), get_preset("exaone-3.5-7.8b")):
        assert spec.score_init_std == pytest.approx(1 / np.sqrt(spec.d_model + 1), rel=1e-12)


def test_a_language_models_spec_json_has_no_head_a_reward_models_does(tmp_path):
    """spec.json of a language model is what it was before heads existed (its bytes key caches)."""
    lm = PRESETS["tiny"]
    assert "head" not in lm.to_dict() and set(lm.to_dict()) == {f for f in lm.__dataclass_fields__} - {"head"}
    score = lm.replace(head="score")
    assert score.head == "score" and score.to_dict()["head"] == "score"
    score.save(tmp_path / "spec.json")
    assert ModelSpec.load(tmp_path / "spec.json") == score


def test_errors_name_the_key_path(tmp_path):
    """From a table the key path starts with 'spec.'; from a file, the file and then the key."""
    bad = {**PRESETS["tiny"].to_dict(), "d_model": 65}
    with pytest.raises(ConfigError, match=r"^spec\.d_model \(65\)"):
        ModelSpec.from_dict(bad)
    (tmp_path / "spec.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError) as err:
        ModelSpec.load(tmp_path / "spec.json")
    assert str(err.value).startswith(f"{tmp_path / 'spec.json'}: d_model (65)")


def test_specs_are_frozen():
    import dataclasses

    spec = PRESETS["tiny"].replace(rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.d_model = 128
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.rope_scaling.factor = 4.0
    assert len({spec, PRESETS["tiny"].replace(rope_scaling={"rope_type": "linear", "factor": 2.0})}) == 1


def test_left_out_fields_mean_what_a_llama_config_leaving_them_out_means():
    """A spec table without rope_theta, max_seq_len or tie_embeddings reads as transformers'
    LlamaConfig reads a config.json without them; RopeScaling() is Llama 3.1's scaling; norm_eps,
    which every preset leaves out, is EXAONE 3.5's layer_norm_epsilon (1e-5; LlamaConfig's is 1e-6)."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaConfig()
    spec = ModelSpec(vocab_size=300, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128)
    assert spec.rope_theta == hf.rope_parameters["rope_theta"]
    assert spec.max_seq_len == hf.max_position_embeddings
    assert spec.tie_embeddings is hf.tie_word_embeddings is False
    assert spec.head == "lm" and spec.rope_scaling is None
    assert RopeScaling() == RopeScaling(**LLAMA_3_1_ROPE_SCALING)
    assert get_preset("exaone-3.5-7.8b").norm_eps == 1e-5


@pytest.mark.parametrize(
    "scaling, accepted",
    [
        ({"factor": 1.0}, True),  # no longer: allowed
        ({"factor": 1.5}, True),
        ({"factor": 0.99}, False),
        ({"low_freq_factor": 4.0, "high_freq_factor": 4.0}, False),
        ({"low_freq_factor": 0.0}, False),
        ({"low_freq_factor": 0.5}, True),
        ({"rope_type": "linear", "low_freq_factor": 4.0, "high_freq_factor": 4.0}, True),  # llama3 only
    ],
)
def test_rope_scaling_limits(scaling, accepted):
    if accepted:
        spec = PRESETS["tiny"].replace(rope_scaling=scaling)
        assert spec.rope_scaling == RopeScaling(**scaling)
    else:
        with pytest.raises(ConfigError, match="factor"):
            RopeScaling(**scaling)


@pytest.mark.parametrize(
    "change, accepted",
    [({"rope_theta": 1.0}, False), ({"rope_theta": 1.5}, True), ({"norm_eps": 1.0}, False),
     ({"norm_eps": 1.5}, False), ({"norm_eps": 0.5}, True), ({"n_layers": True}, False), ({"n_layers": 1}, True)],
)  # fmt: skip
def test_spec_limits(change, accepted):
    data = {**PRESETS["tiny"].to_dict(), **change}
    if accepted:
        assert getattr(ModelSpec.from_dict(data), next(iter(change))) == next(iter(change.values()))
    else:
        with pytest.raises(ConfigError, match=next(iter(change))):
            ModelSpec(**data)


def test_rope_inv_freq_at_another_theta_is_that_of_the_spec_with_it():
    spec = PRESETS["tiny"]
    np.testing.assert_array_equal(spec.rope_inv_freq(rope_theta=50_000.0),
                                  spec.replace(rope_theta=50_000.0).rope_inv_freq())  # fmt: skip
    assert not np.allclose(spec.rope_inv_freq(rope_theta=50_000.0), spec.rope_inv_freq())


def test_rope_inv_freq_of_linear_scaling_and_band_edges_match_transformers():
    """Linear scaling, and llama3 scaling with a frequency exactly on the low-frequency edge (the
    first: wavelength 2·pi, with original / low_freq_factor = 2·pi): transformers scales it by 1/factor."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from orchestration.core.export_hf import llama_config

    old = 64
    edge = PRESETS["tiny"].replace(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": old / (2 * np.pi),
                                                 "high_freq_factor": 4 * old / (2 * np.pi),
                                                 "original_max_position_embeddings": old})  # fmt: skip
    linear = PRESETS["tiny"].replace(rope_scaling={"rope_type": "linear", "factor": 4.0})
    for spec in (linear, edge):
        config = transformers.LlamaConfig(**{k: v for k, v in llama_config(spec).items() if k != "architectures"})
        expected = ROPE_INIT_FUNCTIONS[spec.rope_scaling.rope_type](config, "cpu")[0].double().numpy()
        np.testing.assert_allclose(spec.rope_inv_freq(), expected, rtol=1e-6)
    assert edge.rope_inv_freq()[0] == pytest.approx(1 / 8.0)
    np.testing.assert_allclose(linear.rope_inv_freq(), PRESETS["tiny"].rope_inv_freq() / 4.0, rtol=1e-15)
