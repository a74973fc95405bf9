"""The backend-neutral half of generate: prompt checks, left padding, suppressed ids, stopping."""

from __future__ import annotations

import numpy as np
import pytest

from hanyeong.errors import ConfigError, DataError
from orchestration.core.generation import Rows, prepare, suppressed_ids
from tokenizer.specials import NAMED_SPECIALS, SPECIAL_BLOCK

EOS, THOUGHT, END_THOUGHT = (NAMED_SPECIALS.index(t) for t in ("[EOS]", "<thought>", "</thought>"))


def test_the_special_block_is_suppressed_but_the_stop_and_allowed_ids():
    ids = set(suppressed_ids(102_400, stop_ids=[EOS]).tolist())
    assert ids == set(range(SPECIAL_BLOCK)) - {EOS}
    allowed = set(suppressed_ids(102_400, [EOS], allow_ids=[THOUGHT, END_THOUGHT]).tolist())
    assert allowed == ids - {THOUGHT, END_THOUGHT}
    # a model vocabulary rounded up past its tokenizer's: the ids no token has are never sampled
    padded = set(suppressed_ids(1000, tokenizer_size=900).tolist())
    assert padded == set(range(SPECIAL_BLOCK)) | set(range(900, 1000))
    # too small to hold the special block and the 256 bytes: no hanyeong tokenizer, nothing to mask
    assert suppressed_ids(SPECIAL_BLOCK + 255).size == 0
    assert suppressed_ids(SPECIAL_BLOCK + 256).size == SPECIAL_BLOCK


def test_prompts_are_left_padded_into_their_own_document():
    plan = prepare([[5, 6, 7], [9]], max_new_tokens=4, vocab_size=600, max_seq_len=16)
    np.testing.assert_array_equal(plan.tokens, [[5, 6, 7], [0, 0, 9]])
    np.testing.assert_array_equal(plan.segments, [[1, 1, 1], [0, 0, 1]])
    assert plan.capacity == 7 and plan.suppress.shape == (600,)
    assert plan.suppress[:SPECIAL_BLOCK].all() and not plan.suppress[SPECIAL_BLOCK:].any()


def test_an_explicit_suppression_replaces_the_default():
    plan = prepare([[300]], 1, 600, max_seq_len=8, stop_ids=[7], suppress_ids=[3, 7, 400])
    assert np.flatnonzero(plan.suppress).tolist() == [3, 400]  # a stop id always stays samplable
    assert not prepare([[300]], 1, 600, 8, suppress_ids=()).suppress.any()


@pytest.mark.parametrize(("prompts", "new", "error", "message"), [
    ([[1, 2], []], 1, DataError, "prompt 1 is empty"),
    ([[1, 600]], 1, DataError, r"prompt 0 has an id outside the vocabulary \[0, 600\)"),
    ([[1, 2, 3]], 6, ConfigError, "3 prompt \\+ 6 new tokens exceed spec.max_seq_len \\(8\\)"),
])  # fmt: skip
def test_bad_prompts_are_refused(prompts, new, error, message):
    with pytest.raises(error, match=message):
        prepare(prompts, new, vocab_size=600, max_seq_len=8)


def test_suppressing_every_id_is_refused():
    with pytest.raises(ConfigError, match="all 10 ids are suppressed"):
        prepare([[1]], 1, vocab_size=10, max_seq_len=8, suppress_ids=range(10))


def test_a_row_ends_at_its_first_stop_id_which_it_keeps():
    rows = Rows(3, stop_ids=[2])
    assert not rows.add([5, 2, 6])
    assert not rows.add([2, 7, 8])  # row 1 is done: its 7 is dropped
    assert rows.add([9, 9, 2])
    assert rows.tokens == [[5, 2], [2], [6, 8, 2]]
