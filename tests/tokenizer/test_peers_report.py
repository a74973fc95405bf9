"""Metrics, peer formats and the compression report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import PEERS, needs_peers, quickstart_english, quickstart_korean
from tokenizer.metrics import char_to_byte_offsets, hangul_single_token_share, ksx1001_hangul, measure
from tokenizer.peers import load_peer
from tokenizer.report import compression_report, markdown_tables, plot


class CharEncoder:
    """One token per character: every number below is known by hand."""

    name = "chars"
    kind = "test"

    def __init__(self):
        self.alphabet = {}

    def encode_batch(self, texts):
        return [[self.alphabet.setdefault(c, len(self.alphabet)) for c in t] for t in texts]

    @property
    def token_bytes(self):
        table = [b""] * len(self.alphabet)
        for c, i in self.alphabet.items():
            table[i] = c.encode()
        return table


def test_measure_by_hand():
    result = measure(CharEncoder(), ["ab 가", "c"])
    assert (result.words, result.tokens, result.chars, result.bytes) == (3, 5, 5, 7)
    assert result.tokens_per_word == 5 / 3
    assert result.single_token_words == 2 / 3  # "가" and "c" are one token each; "ab" is two


def test_morpheme_alignment_by_hand():
    # "학교에" tokens 학|교|에, Kiwi boundary before 에 (byte 6): 1 of 2 token cuts is a morpheme cut.
    result = measure(CharEncoder(), ["학교에"], morpheme_cuts=[np.array([6])])
    assert result.morpheme_precision == 0.5 and result.morpheme_recall == 1.0


def test_byte_offsets_and_ksx1001():
    assert char_to_byte_offsets("a가😀").tolist() == [0, 1, 4, 8]
    syllables = ksx1001_hangul()
    assert len(syllables) == len(set(syllables)) == 2350
    assert syllables[0] == "가" and syllables[-1] == "힝"
    assert hangul_single_token_share(CharEncoder()) == 1.0


def test_our_tokenizer_in_every_peer_format_measures_the_same(small_tokenizer, small_tokenizer_dir, tmp_path):
    from tokenizer.export import export_tiktoken

    export_tiktoken(small_tokenizer, tmp_path / "tt")
    vocab = small_tokenizer.hf.get_vocab(with_added_tokens=False)
    (tmp_path / "files").mkdir()
    model = json.loads(small_tokenizer.hf.to_str())["model"]
    (tmp_path / "files" / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (tmp_path / "files" / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) if isinstance(m, list) else m for m in model["merges"]) + "\n"
    )
    docs = quickstart_korean(500) + quickstart_english("alice_in_wonderland")[:500]
    # Rank files carry no pre-tokenizer: pass ours, as load_tiktoken_encoding does.
    from tokenizer.export import split_pattern_of
    from tokenizer.peers import load_tiktoken

    peers = [
        load_peer(small_tokenizer_dir),
        load_peer(small_tokenizer_dir / "tokenizer.json"),
        load_tiktoken(tmp_path / "tt" / "tokenizer.tiktoken", "tt", split_pattern_of(small_tokenizer)),
    ]
    counts = {p.kind: measure(p, docs).tokens for p in peers}
    assert len(set(counts.values())) == 1, counts
    assert load_peer(tmp_path / "tt" / "tokenizer.tiktoken").kind == "tiktoken"
    assert load_peer(tmp_path / "files").kind == "vocab.json+merges.txt"


def test_sentencepiece_peer(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    text = tmp_path / "t.txt"
    text.write_text("\n".join(quickstart_korean(2000)), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "sp"), vocab_size=2000, byte_fallback=True,
                                   character_coverage=0.98, minloglevel=2,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False)
    peer = load_peer(tmp_path / "sp.model")
    result = measure(peer, quickstart_korean(200), prefix_space=peer.prefix_space)
    assert peer.kind == "sentencepiece" and result.unaligned_documents == 0 and result.tokens_per_word > 1


def test_unknown_tokenizer_file_is_a_clear_error(tmp_path):
    from hanyeong.errors import DataError

    (tmp_path / "x.bin").write_bytes(b"\x00\x01garbage")
    with pytest.raises(DataError, match="not a tokenizer.json, tiktoken rank file or SentencePiece model"):
        load_peer(tmp_path / "x.bin")


@needs_peers
@pytest.mark.parametrize(
    "folder, kind, size",
    [
        ("exaone-3.5", "vocab.json+merges.txt", 102_400),
        ("gpt2", "vocab.json+merges.txt", 50_257),
        ("qwen2", "vocab.json+merges.txt", 151_646),
        ("llama3", "tiktoken", 128_000),
        ("llama4", "tiktoken", 200_000),
        ("cl100k_base", "tiktoken", 100_256),
        ("o200k_base", "tiktoken", 199_998),
        ("mistral-v1", "sentencepiece", 32_000),
        ("mistral-v3", "sentencepiece", 32_768),
    ],
)
def test_shared_peers_load(folder, kind, size):
    peer = load_peer(PEERS / folder)
    assert (peer.kind, peer.vocab_size) == (kind, size)
    result = measure(peer, quickstart_korean(300) + quickstart_english()[:300], prefix_space=peer.prefix_space)
    assert result.unaligned_documents == 0 and 1.0 < result.tokens_per_word < 10


@needs_peers
def test_known_encodings_of_peers():
    assert load_peer(PEERS / "gpt2").encode_batch(["Hello world"]) == [[15496, 995]]
    assert load_peer(PEERS / "cl100k_base").encode_batch(["Hello world"]) == [[9906, 1917]]
    exaone = load_peer(PEERS / "exaone-3.5")
    assert len(exaone.encode_batch(["2024"])[0]) == 4  # EXAONE splits every digit


def test_report_structure_markdown_and_plot(small_tokenizer, small_tokenizer_dir, tmp_path):
    texts = [("ko", "ko", quickstart_korean(300)), ("en", "en", quickstart_english()[:300])]
    report = compression_report(small_tokenizer, texts, compare=[str(small_tokenizer_dir)])
    assert [t["name"] for t in report["texts"]] == ["ko", "en"]
    assert len(report["results"]) == 4
    assert all(abs(r["vs_baseline"]) < 1e-12 for r in report["results"])  # same tokenizer twice
    ko = report["results"][0]
    assert ko["morpheme_precision"] is not None and ko["alignment_documents"] == 300
    assert "| tokens/word |" in markdown_tables(report)
    plot(report, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def byte_peer():
    """One token per UTF-8 byte: a peer that compresses far worse than a trained BPE."""
    from tokenizer.peers import Peer

    encode = lambda texts: [list(t.encode("utf-8")) for t in texts]  # noqa: E731
    return Peer("bytes", "test", 256, False, encode, [bytes([i]) for i in range(256)])


def test_vs_baseline_is_each_tokenizers_tokens_per_word_over_the_firsts(small_tokenizer):
    """Checked against tokens per word measured apart; bytes need more tokens than BPE: positive."""
    from tokenizer.report import as_encoder

    texts = [("ko", "ko", quickstart_korean(200)), ("en", "en", quickstart_english()[:200])]
    report = compression_report(small_tokenizer, texts, compare=[byte_peer()], alignment_bytes=0)
    for name, _, docs in texts:
        ours = measure(as_encoder(small_tokenizer), docs).tokens_per_word
        theirs = measure(byte_peer(), docs).tokens_per_word
        rows = {r["tokenizer"]: r for r in report["results"] if r["text"] == name}
        assert rows["hanyeong"]["vs_baseline"] == 0.0
        assert rows["bytes"]["vs_baseline"] == pytest.approx(theirs / ours - 1, rel=1e-12)
        assert rows["bytes"]["vs_baseline"] > 0.5
    # the Markdown column shows the same figure, signed
    expected = f"{rows['bytes']['vs_baseline']:+.1%}"
    assert f"| bytes | {rows['bytes']['tokens_per_word']:.3f} | {expected} |" in markdown_tables(report)
