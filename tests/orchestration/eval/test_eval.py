"""`hanyeong eval`: a model whose answers are known scores what it must; the metrics, the task
files, the results files and the command's errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from orchestration.eval import scoring
from orchestration.eval.tasks import TASKS, Item, Selected, load_items, read_records
from tests.conftest import cli
from tests.orchestration.eval.conftest import BENCHMARKS, needs_benchmarks


class PrefersTokens:
    """A constructed backend: every target token costs 1 nat, those in `disliked` 10 more."""

    def __init__(self, disliked: set[int]):
        self.disliked = disliked

    def load(self, path):
        return None

    def logprobs_at(self, model, tokens, rows, positions, ids):
        return -1.0 - 10.0 * np.isin(ids, list(self.disliked)).astype(np.float32)


def run_with(backend, monkeypatch, ckpt, tokenizer_dir, tasks: str, limit: int = 40) -> dict:
    from orchestration.core import backends
    from orchestration.eval.evaluate import EvalConfig, evaluate

    monkeypatch.setattr(backends, "get_backend", lambda name, device=None: backend)
    return evaluate(ckpt, EvalConfig(tasks=tasks, limit=limit), tokenizer_dir)


@needs_benchmarks
def test_a_model_that_always_says_yes_scores_the_share_of_yes_answers(tiny_ckpt, small_tokenizer,
                                                                      small_tokenizer_dir, monkeypatch):  # fmt: skip
    no, yes = set(small_tokenizer.encode(" 아니오")), set(small_tokenizer.encode(" 예"))
    results = run_with(PrefersTokens(no - yes), monkeypatch, tiny_ckpt, small_tokenizer_dir, "kobest_boolq")
    task = TASKS["kobest_boolq"]
    golds = [item.gold for item in load_items(Selected(task, BENCHMARKS / task.path, None), 40)]
    assert 0 < sum(golds) < 40  # both answers occur, so the accuracy tells the model's choice
    assert results["tasks"]["kobest_boolq"]["metrics"]["acc"] == pytest.approx(sum(golds) / 40)


@needs_benchmarks
def test_a_model_that_always_answers_a_scores_the_share_of_a_on_kmmlu(tiny_ckpt, small_tokenizer,
                                                                     small_tokenizer_dir, monkeypatch):  # fmt: skip
    others = {t for letter in "BCD" for t in small_tokenizer.encode(f" {letter}")} - set(small_tokenizer.encode(" A"))
    results = run_with(PrefersTokens(others), monkeypatch, tiny_ckpt, small_tokenizer_dir, "kmmlu", limit=60)
    answers = [int(float(r["answer"])) for r in read_records(BENCHMARKS / TASKS["kmmlu"].path)[:60]]
    assert results["tasks"]["kmmlu"]["metrics"]["acc"] == pytest.approx(answers.count(1) / 60)
    assert results["tasks"]["kmmlu"]["metrics"]["acc_norm"] == pytest.approx(answers.count(1) / 60)


def test_acc_norm_divides_by_the_choices_length_in_characters():
    item = Item("q", ("ab", "abcd"), gold=1)
    assert scoring.choice_metrics([item], [[-3.0, -4.0]]) == {"acc": 0.0, "acc_norm": 1.0}


def test_loglikelihoods_sum_the_continuation_only_whatever_the_batching():
    class Position:
        def logprobs_at(self, model, tokens, rows, positions, ids):  # log p(a token) = -(its id)
            return -ids.astype(np.float32)

    requests = [([5, 6], [7, 8]), ([1], [2]), ([9, 9, 9, 9], [3])]
    for rows in (1, 2, 3):
        assert scoring.loglikelihoods(Position(), None, requests, 100, rows) == [-15.0, -2.0, -3.0]
    # left-truncated to the context: the continuation keeps every token it can
    assert scoring.loglikelihoods(Position(), None, [([1, 2, 3], [4, 5])], 3, 1) == [-9.0]


def test_bits_per_byte_is_nats_over_ln2_over_utf8_bytes(small_tokenizer):
    class Uniform:
        def logprobs_at(self, model, tokens, rows, positions, ids):
            return np.full(ids.shape, -np.log(2), np.float32)  # one bit per token

    texts = ["한국어 문장입니다.", "An English line."]
    n_tokens = sum(len(ids) for ids in small_tokenizer.encode_batch(texts))
    got = scoring.bits_per_byte(Uniform(), None, small_tokenizer, texts, 4, 3, bos_id=1)
    n_bytes = sum(len(t.encode()) for t in texts)
    assert got["bytes"] == n_bytes and got["bits_per_byte"] == pytest.approx(n_tokens / n_bytes)


def test_fewshot_prompts_hold_solved_examples_but_never_the_item_itself():
    items = [Item(f"q{i}", ("x", "y"), i % 2) for i in range(5)]
    shots = scoring.with_fewshot(items, items, 2, " ", same_pool=True)
    for i, item in enumerate(shots):
        parts = item.context.split("\n\n")
        assert len(parts) == 3 and parts[-1] == f"q{i}" and f"q{i} " not in item.context


def test_every_task_reads_its_file(tmp_path):
    if not BENCHMARKS.is_dir():
        pytest.skip(f"needs {BENCHMARKS}")
    for name, task in TASKS.items():
        if task.kind == "choice":
            items = load_items(Selected(task, BENCHMARKS / task.path, None), 5)
            assert len(items) == 5 and all(0 <= it.gold < len(it.choices) for it in items), name


@needs_benchmarks
def test_eval_command_writes_json_and_markdown(tiny_ckpt, small_tokenizer_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "results"
    code, stdout, _ = cli(monkeypatch, capsys, "eval", str(tiny_ckpt), "--tasks", "kobest_copa,bpb_ko",
                          "--limit", "4", "-t", str(small_tokenizer_dir), "--out", str(out), "--items")  # fmt: skip
    assert code == 0 and "| kobest_copa | 4 |" in stdout and "| bpb_ko | 4 |" in stdout
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert len(results["tasks"]["kobest_copa"]["items"]) == 4
    assert results["tasks"]["bpb_ko"]["metrics"]["bits_per_byte"] > 0
    assert "| kobest_copa |" in (out / "results.md").read_text(encoding="utf-8")


def test_eval_command_mistakes_are_one_line(tiny_ckpt, small_tokenizer_dir, tmp_path, monkeypatch, capsys):
    code, _, err = cli(monkeypatch, capsys, "eval", str(tiny_ckpt), "--tasks", "nope", "-t", str(small_tokenizer_dir))
    assert code == 1 and err.startswith("error: --tasks: unknown task 'nope'") and err.count("\n") == 1
    code, _, err = cli(monkeypatch, capsys, "eval", str(tiny_ckpt), "--tasks", "kobest_copa")
    assert code == 1 and "give --tokenizer" in err and err.count("\n") == 1
    missing = tmp_path / "missing.tsv"
    code, _, err = cli(monkeypatch, capsys, "eval", str(tiny_ckpt), "--tasks", f"kobest_copa={missing}",
                       "-t", str(small_tokenizer_dir))  # fmt: skip
    assert code == 1 and "no such benchmark file" in err
