"""MT-Bench answers at FastChat's per-category temperatures: greedy categories batched, each sampled
answer alone from its own seed, the temperature recorded in its answer line; the same seed gives the
same answers, --chat-temperature 0 makes them all greedy."""

from __future__ import annotations

import json

import pytest

from hanyeong.errors import ConfigError
from orchestration.eval import chat_answers
from tests.conftest import cli
from tests.orchestration.eval.conftest import BENCHMARKS

# FastChat's temperature_config (fastchat/llm_judge/common.py), 0.7 for a category it does not list
EXPECTED = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0, "reasoning": 0.0,
            "stem": 0.1, "humanities": 0.1, "poetry": 0.7}  # fmt: skip


class Recorder:
    """The real backend, with each generate call's number of prompts, temperature and seed kept."""

    def __init__(self, real):
        self.real, self.calls = real, []

    def __getattr__(self, name):
        return getattr(self.real, name)

    def generate(self, model, prompts, max_new_tokens, temperature, top_p, seed, *args, **kwargs):
        self.calls.append((len(prompts), temperature, top_p, seed))
        return self.real.generate(model, prompts, max_new_tokens, temperature, top_p, seed, *args, **kwargs)


@pytest.fixture
def one_per_category(tmp_path):
    """A question file: the first MT-Bench question of every category, and one of a category
    FastChat's table does not list."""
    if not BENCHMARKS.is_dir():
        pytest.skip(f"needs {BENCHMARKS}")
    lines = (BENCHMARKS / "mt-bench" / "question.jsonl").read_text(encoding="utf-8").splitlines()
    firsts = {}
    for q in map(json.loads, lines):
        firsts.setdefault(q["category"], q)
    firsts["poetry"] = {**firsts["writing"], "question_id": 999, "category": "poetry"}
    path = tmp_path / "question.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in firsts.values()), encoding="utf-8")
    return path, list(firsts.values())


def answer_lines(ckpt, tokenizer_dir, path, **config) -> list[dict]:
    from orchestration.eval.evaluate import EvalConfig, evaluate

    config = EvalConfig(tasks=f"mt_bench={path}", max_new_tokens=4, **config)
    return evaluate(ckpt, config, tokenizer_dir)["tasks"]["mt_bench"]["answers"]


def test_the_category_table_is_fastchats():
    for category, temperature in EXPECTED.items():
        assert chat_answers.temperature(category, "category") == temperature, category
    assert chat_answers.temperature("writing", 0.0) == 0.0 and chat_answers.temperature("math", 0.3) == 0.3


def test_each_category_is_answered_at_its_temperature_and_records_it(one_per_category, tiny_ckpt,
                                                                     small_tokenizer_dir, monkeypatch):  # fmt: skip
    from orchestration.core import backends

    path, questions = one_per_category
    recorder = Recorder(backends.get_backend("torch", device="cpu"))
    monkeypatch.setattr(backends, "get_backend", lambda name, device=None: recorder)
    lines = answer_lines(tiny_ckpt, small_tokenizer_dir, path)
    category = {q["question_id"]: q["category"] for q in questions}
    assert sorted(line["question_id"] for line in lines) == sorted(category)
    for line in lines:
        params = line["generate_params"]
        assert params["temperature"] == EXPECTED[category[line["question_id"]]], category[line["question_id"]]
        assert params["do_sample"] == (params["temperature"] > 0) and params["top_p"] == 1.0
    greedy = sum(t == 0 for t in EXPECTED.values())
    # per turn: the greedy questions in one batch, each sampled one alone at its temperature
    assert sorted(c[:3] for c in recorder.calls if c[1] == 0) == [(greedy, 0.0, 1.0)] * 2
    sampled = [c for c in recorder.calls if c[1] > 0]
    assert sorted(t for _, t, _, _ in sampled) == sorted(2 * [t for t in EXPECTED.values() if t > 0])
    assert all(n == 1 for n, *_ in sampled) and len({seed for *_, seed in sampled}) == len(sampled)


def test_the_same_seed_gives_the_same_answers(one_per_category, tiny_ckpt, small_tokenizer_dir):
    path, questions = one_per_category
    temperature = {q["question_id"]: EXPECTED[q["category"]] for q in questions}

    def turns(**config) -> dict[int, list[str]]:
        return {line["question_id"]: line["choices"][0]["turns"]
                for line in answer_lines(tiny_ckpt, small_tokenizer_dir, path, **config)}  # fmt: skip

    first, again, other = turns(seed=5), turns(seed=5, batch_rows=3), turns(seed=6)
    assert first == again  # batching does not change them either
    sampled = [q for q, t in temperature.items() if t > 0]
    assert [first[q] for q in sampled] != [other[q] for q in sampled]  # another seed, other draws
    assert all(first[q] == other[q] for q, t in temperature.items() if t == 0)  # greedy: no draw
    forced = answer_lines(tiny_ckpt, small_tokenizer_dir, path, seed=5, chat_temperature=0)
    assert {line["generate_params"]["temperature"] for line in forced} == {0.0}


def test_a_bad_chat_temperature_is_one_line(tiny_ckpt, small_tokenizer_dir, monkeypatch, capsys):
    from orchestration.eval.evaluate import EvalConfig

    assert EvalConfig(tasks="mt_bench", chat_temperature="0.5").chat_temperature == 0.5
    for bad in ("hot", -1, "nan"):
        with pytest.raises(ConfigError, match="^chat_temperature"):
            EvalConfig(tasks="mt_bench", chat_temperature=bad)
    code, _, err = cli(monkeypatch, capsys, "eval", str(tiny_ckpt), "-t", str(small_tokenizer_dir), "--tasks",
                       "mt_bench", "--chat-temperature", "warm")  # fmt: skip
    assert code == 1 and err == ("error: chat_temperature (--chat-temperature) must be 'category' or a number "
                                 ">= 0, got 'warm'\n")  # fmt: skip
