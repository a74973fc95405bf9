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
    assert spec.memory_bytes(4096, activation_checkpointing=True)["activations"] < one["activations"]
