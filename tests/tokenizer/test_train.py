"""Training end to end: the vocabulary contract, the morpheme law, both engines, the outputs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tokenizer.bbpe import BBPETokenizer
from hanyeong.errors import ConfigError, DataError
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
    aware_config = TrainConfig(vocab_size=540, morphemes=("E",), min_frequency=1, sample=sample)
    aware = train_tokenizer([str(corpus)], tmp_path / "aware", aware_config, cache_dir=tmp_path)
    plain_vocab = vocab_texts(BBPETokenizer.load(plain.out_dir))
    aware_vocab = vocab_texts(BBPETokenizer.load(aware.out_dir))
    # Plain BPE learns whole eojeols; Kiwi cuts stems (먹, 읽) from the ending chain (었습니다).
    assert " 먹었습니다" in plain_vocab
    assert not [t for t in aware_vocab if "먹었" in t or "읽었" in t]
    assert "었습니다" in aware_vocab


def test_keep_whole_leaves_frequent_words_mergeable_and_cuts_the_tail(tmp_path):
    lines = ["밥을 먹었습니다"] * 300 + ["책을 읽었습니다"] * 4 + ["물을 마셨습니다"] * 300
    corpus = write_lines(tmp_path / "c.txt", lines)
    sample = SampleConfig(dedup=False, holdout_fraction=0.0)
    config = TrainConfig(vocab_size=545, morphemes=("E",), keep_whole=50, min_frequency=1, sample=sample)
    result = train_tokenizer([str(corpus)], tmp_path / "out", config, cache_dir=tmp_path)
    vocab = vocab_texts(BBPETokenizer.load(result.out_dir))
    assert " 먹었습니다" in vocab  # seen 300 times: left whole, so BPE may merge it
    assert not [t for t in vocab if "읽었" in t]  # seen 4 times: still cut at the stem
    assert result.report["morphemes"]["runs_kept_whole"] == 4  # 밥을 먹었습니다 물을 마셨습니다


@pytest.mark.parametrize("kwargs", [{"keep_whole": 0, "morphemes": ("E",)}, {"keep_whole": 50},
                                    {"keep_whole": 50, "morphemes": ("E",), "engine": "kiwi"}])  # fmt: skip
def test_keep_whole_without_cuts_to_apply_to_is_a_config_error(kwargs):
    with pytest.raises(ConfigError, match="keep_whole"):
        TrainConfig(**kwargs)


def test_sources_are_capped_excluded_and_reported(tmp_path):
    (tmp_path / "ko" / "law").mkdir(parents=True)
    write_lines(tmp_path / "ko" / "law" / "a.txt", [f"제{i}조 이 법은 공포한 날부터 시행한다 {i}" for i in range(3000)])
    for name in ("news", "essays", "reviews"):
        (tmp_path / "ko" / name).mkdir()
        write_lines(tmp_path / "ko" / name / "b.txt", [f"{name} 문서 {i}번째 한국어 문장입니다" for i in range(400)])
    write_lines(tmp_path / "ko" / "news" / "held_out.txt", ["시험용 문서"] * 50)
    sample = SampleConfig(ko_share=None, source_cap=0.3, cap_floor=0, holdout_fraction=0.0)
    config = TrainConfig(vocab_size=580, morphemes=(), sample=sample, exclude=("*/held_out.txt",))
    result = train_tokenizer([str(tmp_path / "ko")], tmp_path / "out", config)
    sources = result.report["sample"]["sources"]
    assert set(sources) == {"ko/law (ko)", "ko/news (ko)", "ko/essays (ko)", "ko/reviews (ko)"}
    total = sum(r["train"] for r in sources.values())
    assert sources["ko/law (ko)"]["read"] > 0.5 * sum(r["read"] for r in sources.values())
    assert sources["ko/law (ko)"]["train"] <= 0.3 * total + 100  # one line's overshoot at most
    assert not [f for f in result.report["files"] if "held_out" in f["path"]]
    assert "| ko/law (ko) |" in (tmp_path / "out" / "report.md").read_text()


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
    config = TrainConfig(vocab_size=800, sample=SampleConfig(ko_share=None))
    result = train_tokenizer([str(tmp_path / "in")], tmp_path / "out", config)
    skipped = [f for f in result.report["files"] if f["error"]]
    assert [f["path"].split("/")[-1] for f in skipped] == ["legacy.txt"]
    assert "legacy.txt" in (tmp_path / "out" / "report.md").read_text()


def test_nothing_readable_is_one_clear_error(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="no readable text"):
        train_tokenizer([str(tmp_path)], tmp_path / "out")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the inherited ru_maxrss is Linux's")
def test_peak_memory_is_the_training_process_own_not_its_parents():
    """A training launched by a big process (a notebook, a benchmark) reports its own peak: Linux
    carries the parent's RSS into a child's ru_maxrss across fork and exec."""
    parent = bytearray(400 * 2**20)  # 400 MiB held while the child runs
    parent[:: 4096] = b"\x01" * len(parent[:: 4096])  # touched, so resident
    code = "from tokenizer.train import _peak_rss_mb; print(_peak_rss_mb())"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(child.stdout) < 300
