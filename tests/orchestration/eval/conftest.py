"""A tiny random checkpoint whose vocabulary is the small test tokenizer's, in a run-less folder."""

from __future__ import annotations

import pytest

from tests.conftest import SHARED_DATA

BENCHMARKS = SHARED_DATA / "benchmarks"
needs_benchmarks = pytest.mark.skipif(not BENCHMARKS.is_dir(), reason=f"needs {BENCHMARKS}")


@pytest.fixture(scope="session")
def tiny_ckpt(small_tokenizer, tmp_path_factory):
    from orchestration.core.backends import get_backend
    from orchestration.core.presets import get_preset

    spec = get_preset("tiny").replace(vocab_size=small_tokenizer.vocab_size, max_seq_len=256)
    torch = get_backend("torch", device="cpu")
    path = tmp_path_factory.mktemp("eval") / "ckpt"
    torch.save(torch.init(spec, seed=3), path)
    return path
