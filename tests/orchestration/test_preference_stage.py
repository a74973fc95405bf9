"""Preference data and stages: HH-RLHF / VAIV / AlpacaEval shapes become pairs (bad records counted),
the two answers share their prompt tokens, and a DPO stage run through run_stage learns a rule its
chosen answers follow and the rejected ones break (answer in the prompt's language)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from orchestration.data.loader import MixtureConfig, SourceWeight
from orchestration.data.pair_loader import PairLoader
from orchestration.data.preference import PreferenceConfig, pair, prepare_preference
from orchestration.pipeline.recipe import Recipe
from orchestration.pipeline.stage import run_stage
from tests.conftest import quickstart_english, quickstart_korean

torch = pytest.importorskip("torch")

VOCAB = 3000  # the small_tokenizer fixture's

RECORDS = [
    {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: fine, thanks",
     "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: go away"},
    {"prompt": "안녕하세요?", "chosen": "네, 안녕하세요.<|endoftext|>", "rejected": "\u200b<|endoftext|>"},
    {"instruction": "Name a color.", "output_1": "Blue.", "output_2": "Seven.", "preference": 1},
    {"instruction": "Name a color.", "output_1": "Blue.", "output_2": "Blue.", "preference": 1.5},
    {"prompt": "Same?", "chosen": "yes", "rejected": "yes"},
    {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"},
    {"messages": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
     "rejected": {"role": "assistant", "content": "5"}},
]  # fmt: skip


def test_record_shapes_become_pairs_or_reasons():
    found = [pair(r, PreferenceConfig()) for r in RECORDS]
    assert found[0][0] == ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                            {"role": "user", "content": "how are you?"}], "fine, thanks", "go away")  # fmt: skip
    assert [reason for _, reason in found] == [None, "empty answer", None, "no preference",
                                               "identical answers", "unparsable transcript", None]  # fmt: skip
    assert found[2][0][1:] == ("Blue.", "Seven.") and found[6][0][1:] == ("4", "5")


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    return path


def test_prepared_pairs_share_the_prompt_and_count_drops(small_tokenizer_dir, tmp_path):
    long = {"prompt": "word " * 400, "chosen": "yes " * 100, "rejected": "no " * 100}
    source = write_jsonl(tmp_path / "mixed.jsonl", [*RECORDS, long])
    manifest = prepare_preference([str(source)], small_tokenizer_dir, tmp_path / "pairs",
                                  PreferenceConfig(max_tokens=128))  # fmt: skip
    entry = manifest["sources"]["mixed"]
    assert entry["documents"] == 4 and entry["truncated"] == 1
    assert Counter(entry["dropped"]) == Counter({"pair:empty answer": 1, "pair:no preference": 1,
                                                 "pair:identical answers": 1, "pair:unparsable transcript": 1})  # fmt: skip
    mixture = MixtureConfig(sources=(SourceWeight(str(tmp_path / "pairs")),), split_documents=False)
    loader = PairLoader(mixture, 128, 4, seed=0)
    for (ci, cm), (ri, rm) in loader.pairs:
        start = int(np.argmax(cm > 0))
        assert start == int(np.argmax(rm > 0)) and np.array_equal(ci[:start], ri[:start])
        assert len(ci) <= 129 and cm.sum() > 0 and rm.sum() > 0
    first = [loader.next_batch() for _ in range(3)]
    loader.load_state({"epoch": 0, "position": 4})
    assert np.array_equal(loader.next_batch().inputs, first[1].inputs)  # resumable cursor


def language_pairs(korean: list[str], english: list[str]) -> list[dict]:
    """Chosen: an answer in the prompt's language; rejected: one in the other language."""
    records = []
    for i, (ko, en) in enumerate(zip(korean, english)):
        ko_answer, en_answer = korean[-1 - i][:40], english[-1 - i][:40]
        records.append({"prompt": ko[:40], "chosen": ko_answer, "rejected": en_answer})
        records.append({"prompt": en[:40], "chosen": en_answer, "rejected": ko_answer})
    return records


@pytest.mark.parametrize("kind", ["dpo", "simper"])
def test_a_preference_stage_learns_the_rule(small_tokenizer_dir, tmp_path, kind):
    from cuda_model.backend import TorchBackend
    from orchestration.pipeline.preference_stage import preference_accuracy
    from orchestration.data.pair_loader import answer_logps

    torch.set_num_threads(1)
    korean = [t for t in quickstart_korean(600) if len(t) > 20][:240]
    english = [t for t in quickstart_english() if len(t) > 30][:240]
    train = write_jsonl(tmp_path / "train.jsonl", language_pairs(korean[:200], english[:200]))
    held = write_jsonl(tmp_path / "held.jsonl", language_pairs(korean[200:], english[200:]))
    prepare_preference([str(train)], small_tokenizer_dir, tmp_path / "train")
    prepare_preference([str(held)], small_tokenizer_dir, tmp_path / "held")
    stage = {"name": "align", "kind": kind, "start": "init", "token_budget": 64 * 16 * 40, "seq_len": 64,
             "batch_tokens": 64 * 16, "data": {"sources": [{"dataset": "pairs", "weight": 1.0}]},
             "optim": {"lr": 3e-3 if kind == "dpo" else 3e-2, "warmup_steps": 2},
             "preference": {"beta": 0.1}}  # fmt: skip
    # SimPER's gradient is exp(mean log pi) / |answer|: ~3e-4 at a random init (SimPER starts from an
    # SFT model), hence its larger lr here
    tables = {"run": {"name": "t", "preset": "tiny", "vocab_size": VOCAB, "backend": "torch",
                      "tokenizer": {"path": str(small_tokenizer_dir)},
                      "datasets": [{"name": "pairs", "path": str(tmp_path / "train"), "format": "preference"}]},
              "stage": [stage]}  # fmt: skip
    recipe = Recipe.from_dict(tables)
    result = run_stage({"recipe": recipe.to_dict(), "index": 0, "stage_dir": str(tmp_path / "stage"),
                        "tokenizer": str(small_tokenizer_dir), "datasets": {"pairs": str(tmp_path / "train")},
                        "backend": "torch"})  # fmt: skip
    assert result["steps"] == 40
    assert (kind == "dpo") == any((tmp_path / "stage").glob("reference/*.npy"))
    lines = [json.loads(line) for line in (tmp_path / "stage" / "metrics.jsonl").read_text().splitlines()]
    first, last = lines[0], lines[-1]
    for line in (first, last):
        assert line["rewards/margins"] == pytest.approx(line["rewards/chosen"] - line["rewards/rejected"], abs=1e-5)
        assert 0 <= line["rewards/accuracies"] <= 1 and line["lengths/chosen"] >= 1
        assert line["logps/chosen"] < 0 and line["counted_tokens"] == 16  # pairs
    if kind == "dpo":  # step 1 scores the start model, the reference: rewards 0, loss log 2
        assert first["rewards/chosen"] == pytest.approx(0, abs=1e-4) and first["loss"] == pytest.approx(np.log(2), abs=1e-4)
    assert last["rewards/margins"] > first["rewards/margins"] and last["rewards/accuracies"] >= 0.9
    held = json.loads((tmp_path / "stage" / "preference.json").read_text())
    assert held["held_out"] == 40  # a tenth of the 400 pairs (held_out 64 by default)
    assert held["end"]["accuracy"] >= 0.9 > held["start"]["accuracy"] and result["notes"][0].startswith("held-back")
    if kind == "dpo":
        assert held["start"] == {"accuracy": 0.5, "margin": 0.0, "logp_accuracy": held["start"]["logp_accuracy"]}
    backend = TorchBackend("cpu")
    start = backend.init(recipe.run.model_spec(), seed=recipe.run.seed)
    mixture = MixtureConfig(sources=(SourceWeight(str(tmp_path / "held")),), split_documents=False)
    loader = PairLoader(mixture, 64, 16, seed=0)
    if kind == "dpo":
        loader.reference = answer_logps(backend, start, loader, np.arange(len(loader.pairs)))
    before = preference_accuracy(backend, start, loader)
    after = preference_accuracy(backend, backend.load(result["checkpoint"]), loader)
    print(kind, before, after)
    assert after["accuracy"] >= 0.9 and after["margin"] > before["margin"]


def test_decontamination_drops_pairs_sharing_a_window_with_a_benchmark(small_tokenizer_dir, tmp_path):
    """A preference dataset's config (a prepare.toml) decontaminates its pairs as a text dataset's
    does: a benchmark item in the prompt or in either answer drops the pair, counted by benchmark."""
    from orchestration.pipeline.run_config import DatasetConfig

    item = "The quick brown fox jumps over the lazy dog while the small cat watches from the tall fence."
    write_jsonl(tmp_path / "bench.jsonl", [{"text": item}])
    (tmp_path / "prepare.toml").write_text('[decontaminate]\nroot = "."\n[[decontaminate.benchmarks]]\n'
                                           'name = "toy"\nfiles = ["bench.jsonl"]\n')  # fmt: skip
    records = [{"prompt": f"Repeat: {item.upper()}", "chosen": "ok", "rejected": "no"},
               {"prompt": "Say something.", "chosen": "hello", "rejected": f"well, {item}"},
               {"prompt": "Name a color.", "chosen": "Blue.", "rejected": "Seven."},
               {"prompt": "2+2?", "chosen": "4", "rejected": "5"}]  # fmt: skip
    source = write_jsonl(tmp_path / "pairs.jsonl", records)
    dataset = DatasetConfig(name="pairs", inputs=(str(source),), format="preference",
                            config=str(tmp_path / "prepare.toml"))  # fmt: skip
    entry = dataset.prepare(small_tokenizer_dir, tmp_path / "out")["sources"]["pairs"]
    assert entry["documents"] == 2 and entry["dropped"] == {"decontaminate:toy": 2}
    plain = DatasetConfig(name="pairs", inputs=(str(source),), format="preference")
    assert plain.prepare(small_tokenizer_dir, tmp_path / "plain")["sources"]["pairs"]["documents"] == 4
    assert dataset.settings() != plain.settings()  # the benchmarks are part of its identity


def test_live_reference_equals_cached(small_tokenizer_dir, tmp_path):
    """`reference = "live"` (the start model kept loaded, scoring each batch as drawn) gives the
    first step's loss and metrics of the cached reference on the same data, within 1e-5; it stores
    nothing; the stage's end writes its reward plot (preference.png)."""
    torch.set_num_threads(1)
    korean = [t for t in quickstart_korean(200) if len(t) > 20][:40]
    english = [t for t in quickstart_english() if len(t) > 30][:40]
    write_jsonl(tmp_path / "train.jsonl", language_pairs(korean, english))
    prepare_preference([str(tmp_path / "train.jsonl")], small_tokenizer_dir, tmp_path / "train")
    firsts = {}
    for mode in ("cached", "live"):
        stage = {"name": "align", "kind": "dpo", "start": "init", "token_budget": 64 * 8 * 2, "seq_len": 64,
                 "batch_tokens": 64 * 8, "data": {"sources": [{"dataset": "pairs", "weight": 1.0}]},
                 "optim": {"lr": 3e-3, "warmup_steps": 0}, "preference": {"beta": 0.1, "reference": mode}}  # fmt: skip
        tables = {"run": {"name": "t", "preset": "tiny", "vocab_size": VOCAB, "backend": "torch",
                          "tokenizer": {"path": str(small_tokenizer_dir)},
                          "datasets": [{"name": "pairs", "path": str(tmp_path / "train"), "format": "preference"}]},
                  "stage": [stage]}  # fmt: skip
        out = tmp_path / mode
        result = run_stage({"recipe": Recipe.from_dict(tables).to_dict(), "index": 0, "stage_dir": str(out),
                            "tokenizer": str(small_tokenizer_dir), "datasets": {"pairs": str(tmp_path / "train")},
                            "backend": "torch"})  # fmt: skip
        assert result["steps"] == 2
        assert (mode == "cached") == any(out.glob("reference/*.npy"))
        firsts[mode] = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        assert (out / "preference.png").stat().st_size > 0
    timing = {"tokens_per_s", "step_seconds", "time"}
    cached, live = firsts["cached"], firsts["live"]
    assert set(cached) == set(live)
    for key, value in cached.items():
        if key not in timing and isinstance(value, float):
            assert live[key] == pytest.approx(value, abs=1e-5), key
    assert cached["loss"] == pytest.approx(np.log(2), abs=1e-4)


def test_reference_mode_is_checked():
    from hanyeong.errors import ConfigError
    from orchestration.pipeline.preference_stage import PreferenceSettings

    with pytest.raises(ConfigError, match="^reference must be one of cached, live"):
        PreferenceSettings(reference="online")
