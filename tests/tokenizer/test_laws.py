"""The laws a tokenizer must hold, for every string and every id sequence (hypothesis)."""

from __future__ import annotations

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tokenizer.bbpe import BBPETokenizer
from hanyeong.errors import DataError
from tokenizer.export import export_tiktoken, load_tiktoken_encoding

import pytest

from tests.conftest import quickstart_english, quickstart_korean

# Every valid Unicode string: st.text() excludes lone surrogates (category Cs) by default, so it
# covers emoji, combining marks, NFD jamo, NUL, mixed scripts and whitespace runs. A small alphabet of
# line breaks and spaces makes "\r\n", "\n\r", "\r\r" and mixed runs common: a tokenizer (or its
# pre-tokenizer) that normalizes line endings would otherwise pass with only rare random hits.
LINE_BREAKS = st.text(alphabet="\r\n\t \x0b\x0c\x85\u2028\u3000가a.", max_size=40)
TEXT = (
    st.text(max_size=200)
    | st.text(alphabet=st.characters(min_codepoint=0x1100, max_codepoint=0xD7A3), max_size=60)
    | LINE_BREAKS
)
FIXED = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FIXED
@given(text=TEXT)
@example(text="a\r\nb\r\n\r\n")
def test_decode_encode_is_identity(small_tokenizer, text):
    assert small_tokenizer.decode(small_tokenizer.encode(text)) == text


EDGE_CASES = ["", "\x00", "e\u0301", "\u1112\u1161\u11ab", "  \t\n\n  ", "🎉👨‍👩‍👧", "[BOS] 안녕", "한国語 text",
              "\r\n", "a\r\nb", "\r", "x\ry", "\n\r", "one\r\n\r\ntwo\r\n", "\u2028\x85\x0b\x0c"]  # fmt: skip


@pytest.mark.parametrize("text", EDGE_CASES)
def test_decode_encode_edge_cases(small_tokenizer, text):
    assert small_tokenizer.decode(small_tokenizer.encode(text)) == text


def test_lone_surrogate_is_a_clear_error(small_tokenizer):
    with pytest.raises(DataError, match="lone surrogate U\\+D800 at index 2"):
        small_tokenizer.encode("ab\ud800cd")
    with pytest.raises(DataError, match="lone surrogate U\\+DC00 at index 1"):
        small_tokenizer.encode_batch(["fine", "a\udc00"])


def test_encode_adds_no_special_tokens_even_where_the_file_has_a_post_processor(small_tokenizer):
    """Data preparation adds BOS/EOS itself: a tokenizer.json whose post-processor adds them (as
    many published ones do) must not add them a second time through encode."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing

    hf = Tokenizer.from_str(small_tokenizer.hf.to_str())
    hf.post_processor = TemplateProcessing(single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 1), ("[EOS]", 2)])
    assert hf.encode("안녕").ids[0] == 1  # the post-processor is live
    with_template = BBPETokenizer(hf, small_tokenizer.config)
    assert with_template.encode("안녕") == small_tokenizer.encode("안녕")
    assert with_template.encode_batch(["안녕", "hi"]) == small_tokenizer.encode_batch(["안녕", "hi"])


@FIXED
@given(texts=st.lists(TEXT, max_size=5))
def test_encode_batch_is_encode_of_each(small_tokenizer, texts):
    assert small_tokenizer.encode_batch(texts) == [small_tokenizer.encode(t) for t in texts]


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


def test_stream_refuses_an_id_outside_the_vocabulary(small_tokenizer):
    n = len(small_tokenizer.token_bytes)
    assert isinstance(small_tokenizer.stream_decoder().step(n - 1), str)  # the last id is in it
    for bad in (-1, n, n + 7):
        with pytest.raises(ValueError, match=rf"token id {bad} is outside the vocabulary \(0\.\.{n - 1}\)"):
            small_tokenizer.stream_decoder().step(bad)


def test_skip_special_tokens_in_stream(small_tokenizer):
    ids = small_tokenizer.encode("[BOS]안녕[EOS]")
    assert small_tokenizer.stream_decoder(skip_special_tokens=True).decode(ids) == small_tokenizer.decode(ids, True) == "안녕"


@FIXED
@given(text=TEXT)
def test_saved_and_reloaded_tokenizer_encodes_identically(small_tokenizer, tmp_path_factory, text):
    directory = tmp_path_factory.mktemp("saved")
    small_tokenizer.save(directory)
    assert BBPETokenizer.load(directory).encode(text) == small_tokenizer.encode(text)


def test_save_writes_the_hugging_face_files_and_load_reads_them_back(small_tokenizer, tmp_path):
    import json

    small_tokenizer.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8")) == small_tokenizer.config
    assert small_tokenizer.config["eos_token"] == "[EOS]"  # the config is not empty
    for path in (tmp_path, tmp_path / "tokenizer.json"):  # the folder, or the file beside its config
        loaded = BBPETokenizer.load(path)
        assert loaded.config == small_tokenizer.config
        assert loaded.vocab_size == small_tokenizer.vocab_size == 3000
        assert loaded.special_ids == small_tokenizer.special_ids and 1 in loaded.special_ids
    with pytest.raises(DataError, match="no tokenizer.json there"):
        BBPETokenizer.load(tmp_path / "elsewhere")
    (tmp_path / "tokenizer.json").write_text("{", encoding="utf-8")
    with pytest.raises(DataError, match="not a tokenizers file"):
        BBPETokenizer.load(tmp_path)


def test_vocab_size_counts_tokens_added_past_the_trained_vocabulary(small_tokenizer):
    from tokenizers import Tokenizer

    hf = Tokenizer.from_str(small_tokenizer.hf.to_str())
    hf.add_special_tokens(["<|extra|>"])
    extended = BBPETokenizer(hf)
    assert extended.vocab_size == small_tokenizer.vocab_size + 1  # an embedding row for every id
    assert extended.special_ids[-1] == small_tokenizer.vocab_size


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
