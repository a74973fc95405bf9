"""The laws a tokenizer must hold, for every string and every id sequence (hypothesis)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenizer.bbpe import BBPETokenizer
from hanyeong.errors import DataError
from tokenizer.export import export_tiktoken, load_tiktoken_encoding

import pytest

from tests.conftest import quickstart_english, quickstart_korean

# Every valid Unicode string: st.text() excludes lone surrogates (category Cs) by default, so it
# covers emoji, combining marks, NFD jamo, NUL, mixed scripts and whitespace runs.
TEXT = st.text(max_size=200) | st.text(alphabet=st.characters(min_codepoint=0x1100, max_codepoint=0xD7A3), max_size=60)
FIXED = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FIXED
@given(text=TEXT)
def test_decode_encode_is_identity(small_tokenizer, text):
    assert small_tokenizer.decode(small_tokenizer.encode(text)) == text


@pytest.mark.parametrize("text", ["", "\x00", "e\u0301", "\u1112\u1161\u11ab", "  \t\n\n  ", "🎉👨‍👩‍👧", "[BOS] 안녕", "한国語 text"])
def test_decode_encode_edge_cases(small_tokenizer, text):
    assert small_tokenizer.decode(small_tokenizer.encode(text)) == text


def test_lone_surrogate_is_a_clear_error(small_tokenizer):
    with pytest.raises(DataError, match="lone surrogate U\\+D800 at index 2"):
        small_tokenizer.encode("ab\ud800cd")


@FIXED
@given(ids=st.lists(st.integers(0, 2999), max_size=60))
def test_stream_decode_concatenates_to_batch_decode(small_tokenizer, ids):
    assert small_tokenizer.stream_decoder().decode(ids) == small_tokenizer.decode(ids)


def test_stream_never_shows_a_broken_syllable(small_tokenizer):
    text = " ".join(quickstart_korean(300))
    ids = small_tokenizer.encode(text)
    stream = small_tokenizer.stream_decoder()
    pieces = [stream.step(i) for i in ids] + [stream.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text
    # ...and syllables really are split across tokens in this text, so the test means something.
    assert any(p == "" for p in pieces)


def test_skip_special_tokens_in_stream(small_tokenizer):
    ids = small_tokenizer.encode("[BOS]안녕[EOS]")
    assert small_tokenizer.stream_decoder(skip_special_tokens=True).decode(ids) == small_tokenizer.decode(ids, True) == "안녕"


@FIXED
@given(text=TEXT)
def test_saved_and_reloaded_tokenizer_encodes_identically(small_tokenizer, tmp_path_factory, text):
    directory = tmp_path_factory.mktemp("saved")
    small_tokenizer.save(directory)
    assert BBPETokenizer.load(directory).encode(text) == small_tokenizer.encode(text)


@pytest.fixture(scope="module")
def tiktoken_encoding(small_tokenizer, tmp_path_factory):
    return load_tiktoken_encoding(export_tiktoken(small_tokenizer, tmp_path_factory.mktemp("tt")))


@FIXED
@given(text=TEXT)
def test_tiktoken_export_encodes_identically(small_tokenizer, tiktoken_encoding, text):
    # Both match special-token text in raw input ("[BOS]" -> id 1), as transformers does.
    assert tiktoken_encoding.encode(text, allowed_special="all") == small_tokenizer.encode(text)


def test_tiktoken_export_on_real_text(small_tokenizer, tiktoken_encoding):
    docs = quickstart_korean(3000) + quickstart_english("alice_in_wonderland")
    assert tiktoken_encoding.encode_batch(docs, allowed_special="all") == small_tokenizer.encode_batch(docs)
    assert tiktoken_encoding.decode(small_tokenizer.encode("한영 tokenizer")) == "한영 tokenizer"
