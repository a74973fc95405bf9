"""Training end to end: the vocabulary contract, the morpheme law, both engines, the outputs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tokenizer.bbpe import BBPETokenizer
from hanyeong.errors import DataError
from tokenizer.sampling import SampleConfig
from tokenizer.specials import NAMED_SPECIALS, SPECIAL_BLOCK
from tokenizer.train import TrainConfig, train_tokenizer


def test_vocabulary_is_exact_with_the_special_block_first(small_tokenizer):
    hf = small_tokenizer.hf
    assert small_tokenizer.vocab_size == 3000
    assert [hf.id_to_token(i) for i in range(len(NAMED_SPECIALS))] == list(NAMED_SPECIALS)
    assert hf.id_to_token(SPECIAL_BLOCK - 1) == f"[|reserved_{SPECIAL_BLOCK - len(NAMED_SPECIALS) - 1}|]"
    assert small_tokenizer.special_ids == list(range(SPECIAL_BLOCK))
    assert small_tokenizer.encode("[|user|]안녕[|endofturn|]")[0] == NAMED_SPECIALS.index("[|user|]")


def test_outputs_and_report(small_tokenizer_dir):
    names = {p.name for p in small_tokenizer_dir.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "report.json", "report.md"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    report = json.loads((small_tokenizer_dir / "report.json").read_text())
    assert report["vocab_size"] == 3000 and report["merges"] == 3000 - 512
    assert report["morphemes"]["distinct_runs"] > 1000
    texts = {t["language"] for t in report["compression"]["texts"]}
    assert texts == {"ko", "en"}
    ko = next(r for r in report["compression"]["results"] if r["text"] == "held-out ko")
    assert 1.0 < ko["tokens_per_word"] < 5.0 and ko["morpheme_precision"] > 0.5
    assert "Compression on held-out text" in (small_tokenizer_dir / "report.md").read_text()


def test_loads_in_transformers_with_the_chat_template(small_tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(small_tokenizer_dir / "tokenizer.json"))
    assert fast.decode(fast.encode("안녕하세요 hello")) == "안녕하세요 hello"
    auto = transformers.AutoTokenizer.from_pretrained(str(small_tokenizer_dir))
    assert (auto.bos_token, auto.eos_token, auto.pad_token_id) == ("[BOS]", "[EOS]", 0)
    chat = auto.apply_chat_template([{"role": "user", "content": "안녕?"}], tokenize=False, add_generation_prompt=True)
    assert chat == "[|system|][|endofturn|]\n[|user|]안녕?\n[|assistant|]"


def test_tokenizer_file_loads_without_kiwi(small_tokenizer_dir):
    code = (
        "import sys; sys.modules['kiwipiepy'] = None\n"
        "from tokenizers import Tokenizer\n"
        f"t = Tokenizer.from_file({str(small_tokenizer_dir / 'tokenizer.json')!r})\n"
        "assert t.decode(t.encode('먹었습니다').ids) == '먹었습니다'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def vocab_texts(tokenizer):
    return [bytes(tokenizer.token_bytes[i]).decode("utf-8", "replace") for i in range(tokenizer.vocab_size)]


def test_merges_never_cross_the_selected_morpheme_boundaries(tmp_path):
    corpus = write_lines(tmp_path / "c.txt", ["밥을 먹었습니다", "빵을 먹었습니다", "책을 읽었습니다", "물을 마셨습니다"] * 300)
    sample = SampleConfig(dedup=False, holdout_fraction=0.0)
    plain_config = TrainConfig(vocab_size=540, morphemes=(), min_frequency=1, sample=sample)
    plain = train_tokenizer([str(corpus)], tmp_path / "plain", plain_config)
    aware_config = TrainConfig(vocab_size=540, min_frequency=1, sample=sample)
    aware = train_tokenizer([str(corpus)], tmp_path / "aware", aware_config, cache_dir=tmp_path)
    plain_vocab = vocab_texts(BBPETokenizer.load(plain.out_dir))
    aware_vocab = vocab_texts(BBPETokenizer.load(aware.out_dir))
    # Plain BPE learns whole eojeols; Kiwi cuts stems (먹, 읽) from the ending chain (었습니다).
    assert " 먹었습니다" in plain_vocab
    assert not [t for t in aware_vocab if "먹었" in t or "읽었" in t]
    assert "었습니다" in aware_vocab


def test_kiwi_engine_gives_the_same_contract(tmp_path, small_corpus):
    result = train_tokenizer([str(small_corpus / "ko.jsonl")], tmp_path, TrainConfig(vocab_size=1200, engine="kiwi", sample=SampleConfig(ko_share=None)), workers=2)
    tok = BBPETokenizer.load(result.out_dir)
    assert tok.vocab_size == 1200 and tok.hf.id_to_token(1) == "[BOS]"
    assert tok.decode(tok.encode("먹었습니다 12345 ok")) == "먹었습니다 12345 ok"


def test_corpus_too_small_for_the_vocabulary_says_how_far_it_got(tmp_path):
    corpus = write_lines(tmp_path / "c.txt", ["작은 말뭉치 small corpus"] * 10)
    with pytest.raises(DataError, match=r"supports only [\d,]+ merges.*lower --vocab-size to \d+"):
        train_tokenizer([str(corpus)], tmp_path / "out", TrainConfig(vocab_size=5000, morphemes=()))
    assert not (tmp_path / "out" / "tokenizer.json").exists()


def test_unreadable_inputs_are_skipped_by_name_and_reported(tmp_path, small_corpus):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "good.jsonl").write_bytes((small_corpus / "ko.jsonl").read_bytes())
    (tmp_path / "in" / "legacy.txt").write_bytes("한국어".encode("euc-kr") * 100)
    result = train_tokenizer([str(tmp_path / "in")], tmp_path / "out", TrainConfig(vocab_size=800, morphemes=()))
    skipped = [f for f in result.report["files"] if f["error"]]
    assert [f["path"].split("/")[-1] for f in skipped] == ["legacy.txt"]
    assert "legacy.txt" in (tmp_path / "out" / "report.md").read_text()


def test_nothing_readable_is_one_clear_error(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="no readable text"):
        train_tokenizer([str(tmp_path)], tmp_path / "out")
