"""Generation tasks: GSM8K's tolerant numeric match, HumanEval's pass@1 with every program run in a
separate limited process; a model whose answers are known scores what it must."""

from __future__ import annotations

import time

import pytest

from orchestration.eval import generative, sandbox
from orchestration.eval.tasks import TASKS, read_records
from tests.conftest import cli
from tests.orchestration.eval.conftest import BENCHMARKS, needs_benchmarks


@pytest.mark.parametrize(("text", "number"), [
    ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
    ("so the answer is $1,000.00.", "1000.00"),
    ("It takes 3 bolts, 1000 dollars in all", "1000"),
    ("The result is -4.5 meters.", "-4.5"),
    ("#### 1,234", "1234"),
    ("no number here", None),
])  # fmt: skip
def test_the_answer_is_the_number_after_hashes_else_the_last_number(text, number):
    assert generative.extract_number(text) == number


def test_numbers_match_whatever_their_commas_units_and_decimals():
    assert generative.same_number("1000.00", "#### 1,000")
    assert generative.same_number("18", "18") and not generative.same_number("17", "18")
    assert not generative.same_number(None, "18")


class Answers:
    """A constructed backend: generate answers the last question of each prompt from a table."""

    def __init__(self, tokenizer, answers: dict[str, str], key):
        self.tokenizer, self.answers, self.key = tokenizer, answers, key
        self.prompts: list[str] = []

    def load(self, path):
        return None

    def generate(self, model, prompts, max_new_tokens, temperature, top_p, seed, stop_ids, **kw):
        out = []
        for ids in prompts:
            text = self.tokenizer.decode(ids[1:])
            self.prompts.append(text)
            out.append(self.tokenizer.encode(self.answers.get(self.key(text), " I do not know.")))
        return out


def run_with(backend, monkeypatch, ckpt, tokenizer_dir, tasks: str, **config) -> dict:
    from orchestration.core import backends
    from orchestration.eval.evaluate import EvalConfig, evaluate

    monkeypatch.setattr(backends, "get_backend", lambda name, device=None: backend)
    return evaluate(ckpt, EvalConfig(tasks=tasks, items=True, **config), tokenizer_dir)


@needs_benchmarks
def test_gsm8k_scores_right_and_wrong_answers_and_shows_few_shot_examples(tiny_ckpt, small_tokenizer,
                                                                         small_tokenizer_dir, monkeypatch):  # fmt: skip
    records = read_records(BENCHMARKS / TASKS["gsm8k"].path)[:6]
    answers = {}
    for i, r in enumerate(records):  # the first four right (two ways of writing it), the rest wrong
        number = r["answer"].split("####")[-1].strip()
        answers[r["question"]] = (f" Adding up, #### {number}\n\nQuestion: next" if i < 2
                                  else f" The total is ${int(number):,} in all." if i < 4 else " 0.5")  # fmt: skip
    backend = Answers(small_tokenizer, answers, lambda text: text.rsplit("Question: ", 1)[-1].split("\nAnswer:")[0])
    results = run_with(backend, monkeypatch, tiny_ckpt, small_tokenizer_dir, "gsm8k", limit=6, num_fewshot=1,
                       max_new_tokens=8)  # fmt: skip
    task = results["tasks"]["gsm8k"]
    assert task["metrics"]["exact_match"] == pytest.approx(4 / 6)
    assert [i["correct"] for i in task["items"]] == [True] * 4 + [False] * 2
    assert "Question:" not in task["items"][0]["completion"]  # cut at the stop string
    assert all(p.endswith("\nAnswer:") for p in backend.prompts)  # the last tokens of longer prompts
    assert all("\n#### " in p and "\n\nQuestion: " in p for p in backend.prompts)  # after a solved example


def test_humaneval_runs_programs_in_another_process(tiny_ckpt, small_tokenizer, small_tokenizer_dir,
                                                    monkeypatch):  # fmt: skip
    if not (BENCHMARKS / TASKS["humaneval"].path).is_file():
        pytest.skip("needs the HumanEval file")
    records = read_records(BENCHMARKS / TASKS["humaneval"].path)[:3]
    answers = {r["prompt"][-60:]: r["canonical_solution"] for r in records[:2]}  # prompts keep their ends
    answers[records[2]["prompt"][-60:]] = "    import os\n    os._exit(0) if os.getpid() == -1 else None\n    return None\n"
    backend = Answers(small_tokenizer, answers, lambda text: text[-60:])
    results = run_with(backend, monkeypatch, tiny_ckpt, small_tokenizer_dir, "humaneval", limit=3)
    task = results["tasks"]["humaneval"]
    assert [i["status"] for i in task["items"]] == ["passed", "passed", "failed"]
    assert task["metrics"]["pass@1"] == pytest.approx(2 / 3)


def test_a_correct_program_passes_and_a_failing_one_fails():
    assert sandbox.run_program("def f(x):\n    return x + 1\n\nassert f(1) == 2\n").status == "passed"
    outcome = sandbox.run_program("assert 1 + 1 == 3\n")
    assert outcome.status == "failed" and "AssertionError" in outcome.output


def test_loops_allocations_forks_network_and_writes_outside_are_stopped_and_the_rest_goes_on(tmp_path):
    outside = tmp_path / "outside.txt"
    programs = {
        "loop": "while True:\n    pass\n",
        "memory": "blocks = []\nwhile True:\n    blocks.append(bytearray(10 ** 7))\n",
        "fork": "import os\nwhile True:\n    os.fork()\n",
        "subprocess": "import subprocess\nsubprocess.run(['true'])\n",
        "network": "import socket\nsocket.create_connection(('127.0.0.1', 9))\n",
        "write outside": f"open({str(outside)!r}, 'w').write('x')\n",
        "remove outside": f"import os\nos.remove({str(tmp_path)!r})\n",
        "big file": "open('big', 'wb').write(b'x' * (64 << 20))\n",
        "in its folder": "open('mine.txt', 'w').write('ok')\nassert open('mine.txt').read() == 'ok'\n",
    }
    started = time.perf_counter()
    outcomes = dict(zip(programs, sandbox.run_programs(list(programs.values()), timeout=3, memory_mb=512)))
    assert time.perf_counter() - started < 30
    assert outcomes["loop"].status == "timeout"
    assert "MemoryError" in outcomes["memory"].output
    for name in ("fork", "subprocess", "network", "write outside", "remove outside"):
        assert outcomes[name].status == "failed" and "PermissionError" in outcomes[name].output, name
    assert outcomes["big file"].status == "failed"
    assert outcomes["in its folder"].status == "passed"
    assert not outside.exists() and tmp_path.exists()


def test_gsm8k_through_the_command_on_a_real_checkpoint(tiny_ckpt, small_tokenizer_dir, tmp_path, monkeypatch,
                                                        capsys):  # fmt: skip
    path = tmp_path / "gsm8k.jsonl"
    path.write_text('{"question": "1 + 1?", "answer": "1 + 1 = 2\\n#### 2"}\n' * 2, encoding="utf-8")
    code, out, err = cli(monkeypatch, capsys, "eval", str(tiny_ckpt), "-t", str(small_tokenizer_dir),
                         "--tasks", f"gsm8k={path}", "--max-new-tokens", "6", "--out", str(tmp_path))  # fmt: skip
    assert code == 0, err
    assert "| gsm8k | 2 |" in out and "exact_match" in (tmp_path / "results.md").read_text()
