"""MT-Bench and KoMT-Bench: answers in FastChat's format, turn 2 asked after the model's turn-1 answer,
each question at its category's temperature and seeded; a judge command scores every question and
turn, KoMT-Bench's rule for answers not in Korean, failed judgments, judgment files read back, and
the command's errors."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from orchestration.eval import chat_bench
from tests.conftest import cli
from tests.orchestration.eval.conftest import BENCHMARKS, needs_benchmarks

STUB = Path(__file__).with_name("judge_stub.py")
MT, KO = BENCHMARKS / "mt-bench", BENCHMARKS / "komt-bench"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def judge(mode: str, log: Path) -> str:
    return f"{sys.executable} {STUB} {mode} {log}"


def test_scores_are_read_as_fastchat_reads_them():
    assert chat_bench.parse_score("Explanation... Rating: [[8]]") == 8
    assert chat_bench.parse_score("[[8.5]] then [[3]]") == 8.5  # the first one
    assert chat_bench.parse_score("Rating: [7]") == 7  # FastChat's backup pattern
    assert chat_bench.parse_score("The answer is good.") is None  # a failed judgment, not 0


def test_komt_bench_takes_the_square_root_of_answers_not_in_korean_except_on_138_and_140():
    assert chat_bench.korean_rule(9.0, "The capital of Korea is Seoul.", 81) == 3.0
    assert chat_bench.korean_rule(9.0, "한국의 수도는 서울입니다. Seoul이라고 씁니다.", 81) == 9.0
    assert chat_bench.korean_rule(9.0, '{"iPhone": 8.5, "Galaxy": 8.3}', 138) == 9.0
    assert chat_bench.korean_rule(4.0, "", 81) == 2.0  # an empty answer is not Korean either


class Spy:
    """The real backend, with every generate call's prompts and token budget kept."""

    def __init__(self, real):
        self.real, self.calls = real, []

    def __getattr__(self, name):
        return getattr(self.real, name)

    def generate(self, model, prompts, max_new_tokens, *args, **kwargs):
        self.calls.append(([list(p) for p in prompts], max_new_tokens))
        return self.real.generate(model, prompts, max_new_tokens, *args, **kwargs)


@needs_benchmarks
def test_answers_are_fastchat_lines_and_turn_two_follows_the_models_turn_one(tiny_ckpt, small_tokenizer,
                                                                           small_tokenizer_dir, tmp_path,
                                                                           monkeypatch, capsys):  # fmt: skip
    from orchestration.core import backends

    spy = Spy(backends.get_backend("torch", device="cpu"))
    monkeypatch.setattr(backends, "get_backend", lambda name, device=None: spy)
    code, out, err = cli(monkeypatch, capsys, "eval", str(tiny_ckpt), "-t", str(small_tokenizer_dir),
                         "--tasks", "mt_bench,komt_bench", "--limit", "2", "--max-new-tokens", "5",
                         "--out", str(tmp_path), "--chat-temperature", "0")  # fmt: skip
    assert code == 0, err
    assert len(spy.calls) == 4  # greedy: per task, turn 1 of both questions in one batch, then turn 2
    assert all(len(prompts) == 2 and budget == 5 for prompts, budget in spy.calls)
    tasks = [("mt_bench", MT / "question.jsonl"), ("komt_bench", KO / "question_ko.jsonl")]
    for n, (task, questions) in enumerate(tasks):
        lines = read_jsonl(tmp_path / f"{task}_answers.jsonl")
        asked = read_jsonl(questions)[:2]
        fastchat = {"question_id", "answer_id", "model_id", "choices", "tstamp"}  # gen_model_answer.py's
        assert [set(line) for line in lines] == [fastchat | {"generate_params"}] * 2
        assert all(line["generate_params"]["temperature"] == 0.0 for line in lines)
        assert [line["question_id"] for line in lines] == [q["question_id"] for q in asked]
        assert all(line["model_id"] == tiny_ckpt.name and isinstance(line["tstamp"], float) for line in lines)
        assert all(len(line["choices"]) == 1 and line["choices"][0]["index"] == 0 for line in lines)
        assert all(len(line["choices"][0]["turns"]) == 2 for line in lines)
        second = [small_tokenizer.decode(ids) for ids in spy.calls[2 * n + 1][0]]
        for line, q in zip(lines, asked):
            a1 = line["choices"][0]["turns"][0]
            prompt = next(p for p in second if p.endswith(f"[|user|]{q['turns'][1]}\n[|assistant|]"))
            assert f"[|assistant|]{a1}[|endofturn|]\n[|user|]{q['turns'][1]}" in prompt
        assert any(line["choices"][0]["turns"][0] for line in lines)  # the check above is not vacuous
        assert f"- {task}: answers in {tmp_path}/{task}_answers.jsonl; no score" in out
    assert json.loads((tmp_path / "results.json").read_text())["tasks"]["mt_bench"]["metrics"] == {}


class Answers:
    """A constructed backend: Korean to a question's turn 1, English to its turn 2."""

    def __init__(self, tokenizer, questions: list[dict]):
        self.tokenizer, self.questions = tokenizer, questions

    def load(self, path):
        return None

    def generate(self, model, prompts, max_new_tokens, temperature, top_p, seed, stop_ids, **kw):
        out = []
        for ids in prompts:
            asked = self.tokenizer.decode(ids).removesuffix("\n[|assistant|]")
            turn = next(t for q in self.questions for t in (1, 2) if asked.endswith(q["turns"][t - 1][-40:]))
            out.append(self.tokenizer.encode(" 네, 답은 이렇습니다." if turn == 1 else " Here is my answer."))
        return out


@pytest.fixture
def benches(tmp_path, small_tokenizer, monkeypatch):
    """MT-Bench questions 81 (writing) and 111 (math: judged against a reference), KoMT-Bench 81
    and 138 (exempt from the Korean rule), each in a folder with its reference and judge prompts;
    the model answers through `Answers`."""
    if not BENCHMARKS.is_dir():
        pytest.skip(f"needs {BENCHMARKS}")
    from orchestration.core import backends

    picked = []
    for source, name, ids, extra in [(MT, "question.jsonl", (81, 111), ["reference_answer_gpt-4.jsonl"]),
                                     (KO, "question_ko.jsonl", (81, 138),
                                      ["reference_answer_ko_gpt-4.jsonl", "judge_prompts_ko.jsonl"])]:  # fmt: skip
        folder = tmp_path / source.name
        folder.mkdir()
        questions = [q for q in read_jsonl(source / name) if q["question_id"] in ids]
        (folder / name).write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in questions), "utf-8")
        for file in extra:
            shutil.copy(source / file, folder / file)
        picked += questions
    backend = Answers(small_tokenizer, picked)
    monkeypatch.setattr(backends, "get_backend", lambda name, device=None: backend)
    return f"mt_bench={tmp_path / MT.name / 'question.jsonl'},komt_bench={tmp_path / KO.name / 'question_ko.jsonl'}"


def run(monkeypatch, capsys, ckpt, tokenizer_dir, tasks, out, *options):
    return cli(monkeypatch, capsys, "eval", str(ckpt), "-t", str(tokenizer_dir), "--tasks", tasks,
               "--max-new-tokens", "8", "--out", str(out), *options)  # fmt: skip


def test_the_judge_scores_every_question_and_turn_and_komt_bench_penalises_english(
        benches, tiny_ckpt, small_tokenizer_dir, tmp_path, monkeypatch, capsys):  # fmt: skip
    log = tmp_path / "judge.jsonl"
    code, out, err = run(monkeypatch, capsys, tiny_ckpt, small_tokenizer_dir, benches, tmp_path / "r",
                         "--judge", judge("score", log))  # fmt: skip
    assert code == 0, err
    calls = read_jsonl(log)
    asked = (("mt_bench", (81, 111)), ("komt_bench", (81, 138)))
    assert sorted((c["task"], c["question_id"], c["turn"]) for c in calls) == sorted(
        (task, q, turn) for task, ids in asked for q in ids for turn in (1, 2))  # every question and turn, once
    by_key = {(c["task"], c["question_id"], c["turn"]): c for c in calls}
    writing, math = by_key["mt_bench", 81, 1], by_key["mt_bench", 111, 2]
    assert writing["reference"] is None and writing["judge_prompt"]["name"] == "single-v1"
    assert writing["judge_prompt"]["user_prompt"].endswith(
        f"[Question]\n{writing['questions'][0]}\n\n[The Start of Assistant's Answer]\n{writing['answers'][0]}\n"
        "[The End of Assistant's Answer]")
    assert math["judge_prompt"]["name"] == "single-math-v1-multi-turn" and len(math["reference"]) == 2
    assert math["reference"][1] in math["judge_prompt"]["user_prompt"]
    korean = by_key["komt_bench", 81, 1]["judge_prompt"]  # from judge_prompts_ko.jsonl
    assert korean["name"] == "single-v1" and korean["system_prompt"] == "당신은 유용한 어시스턴트입니다."
    results = json.loads((tmp_path / "r" / "results.json").read_text(encoding="utf-8"))["tasks"]
    # mt_bench: Korean turn 1 -> 7, English turn 2 -> 9, no penalty
    assert results["mt_bench"]["metrics"] == {"judged": 4, "failed": 0, "missing": 0, "score": 8.0,
                                              "score_turn1": 7.0, "score_turn2": 9.0}  # fmt: skip
    # komt_bench: English turn 2 -> sqrt(9) = 3 on question 81, 9 on the exempt 138
    assert results["komt_bench"]["metrics"] == {"judged": 4, "failed": 0, "missing": 0, "score": 6.5,
                                                "score_turn1": 7.0, "score_turn2": 6.0}  # fmt: skip
    assert "| mt_bench | 2 |" in out and "| 8.00 | 7.00 | 9.00 |" in out and "| 6.50 | 7.00 | 6.00 |" in out
    judged = read_jsonl(tmp_path / "r" / "komt_bench_judgments.jsonl")  # FastChat's raw scores, no penalty
    assert {(j["question_id"], j["turn"], j["score"]) for j in judged} >= {(81, 2, 9), (138, 2, 9)}


def test_a_judge_without_a_score_is_a_failed_judgment_not_a_zero(benches, tiny_ckpt, small_tokenizer_dir, tmp_path,
                                                                  monkeypatch, capsys):  # fmt: skip
    code, out, err = run(monkeypatch, capsys, tiny_ckpt, small_tokenizer_dir, benches, tmp_path / "r",
                         "--judge", judge("silent", tmp_path / "judge.jsonl"))  # fmt: skip
    assert code == 0, err
    metrics = json.loads((tmp_path / "r" / "results.json").read_text())["tasks"]["mt_bench"]["metrics"]
    assert metrics == {"judged": 0, "failed": 4, "missing": 0}  # no mean at all
    assert "4 failed" in out and "0.00" not in out


def test_a_judgments_file_read_back_gives_the_same_table(benches, tiny_ckpt, small_tokenizer_dir, tmp_path,
                                                         monkeypatch, capsys):  # fmt: skip
    first, second = tmp_path / "judged", tmp_path / "read"
    code, out, err = run(monkeypatch, capsys, tiny_ckpt, small_tokenizer_dir, benches, first,
                         "--judge", judge("score", tmp_path / "judge.jsonl"))  # fmt: skip
    assert code == 0, err
    files = f"mt_bench={first / 'mt_bench_judgments.jsonl'},komt_bench={first / 'komt_bench_judgments.jsonl'}"
    code, again, err = run(monkeypatch, capsys, tiny_ckpt, small_tokenizer_dir, benches, second, "--judgments", files)
    assert code == 0, err
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert table and table == [line for line in again.splitlines() if line.startswith("|")]
    read = json.loads((second / "results.json").read_text())["tasks"]
    assert read["komt_bench"]["metrics"]["score_turn2"] == 6.0  # the Korean rule applied on reading back


@needs_benchmarks
def test_chat_bench_mistakes_are_one_line(benches, tiny_ckpt, small_tokenizer_dir, tmp_path, monkeypatch, capsys):
    def fails(*options, says):
        code, _, err = run(monkeypatch, capsys, tiny_ckpt, small_tokenizer_dir, benches, tmp_path / "r", *options)
        assert code == 1 and err.startswith("error: ") and says in err and err.count("\n") == 1, err

    fails("--judge", judge("fail", tmp_path / "judge.jsonl"),
          says="failed on mt_bench question 81 turn 1 (exit status 3): judge: no API key")
    fails("--judgments", f"mt_bench={tmp_path / 'nowhere.jsonl'}", says="no such judgments file")
    fails("--judgments", str(tmp_path / "nowhere.jsonl"), says="name each file's task")
    fails("--judgments", "x.jsonl", "--judge", "true", says="not both")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 81, "turn": 1}\n', encoding="utf-8")
    fails("--judgments", f"mt_bench={bad}", says="line 1 is not a FastChat single judgment")
    code, _, err = cli(monkeypatch, capsys, "eval", str(tiny_ckpt), "-t", str(small_tokenizer_dir), "--tasks",
                       f"mt_bench={tmp_path / 'missing.jsonl'}")  # fmt: skip
    assert code == 1 and "no such benchmark file" in err and err.count("\n") == 1
