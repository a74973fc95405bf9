"""Chat benchmarks (MT-Bench, KoMT-Bench): the model answers two-turn questions, a judge scores them.

Answers (chat_answers.py): turn 1 of every question is asked as a user turn of the chat template,
turn 2 after the question's own turn-1 answer, each question at its category's temperature as
FastChat does (or at the one `--chat-temperature` forces). They are written in FastChat's answer
format (fastchat/llm_judge/gen_model_answer.py: question_id, answer_id, model_id,
choices=[{"index": 0, "turns": [a1, a2]}], tstamp; sorted by question_id as its reorg_answer_file
does), so FastChat's gen_judgment.py can read them, with "generate_params" beside them.

Judging is pluggable, none ships. `--judge CMD` runs the shell command once per question and turn
with one JSON object on stdin (the question's turns, the model's answers, the reference answer for
the categories FastChat gives one, and the judge prompt FastChat would send) and reads the score
from its stdout as FastChat does: the first "[[8]]" / "[[8.5]]", else the first "[8]". Output
without a score is a failed judgment (FastChat's score -1): counted in `failed`, left out of the
means, never a 0. `--judgments FILE` reads FastChat's model_judgment/*_single.jsonl instead.

KoMT-Bench's rule for answers not in Korean (LG-AI-EXAONE/KoMT-Bench, FastChat/fastchat/llm_judge/
data/mt_bench/model_judgment/detector.py and README "Why penalize scores"): the score of such an
answer becomes its square root, except on questions 138 and 140 (their answers may rightly be JSON
or CSV); a failed judgment stays failed. Their detector is MediaPipe's language model; here an
answer is Korean when tokenizer.language.detect_language says 'ko' (Hangul letters weigh 2.5 Latin
ones; code, an empty answer and English are not Korean), applied to the turn being scored.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from hanyeong.errors import ConfigError, DataError
from hanyeong.files import write_atomic
from orchestration.eval import chat_answers
from orchestration.eval.plan import Plan

NEED_REF_CATS = ("math", "reasoning", "coding")  # fastchat/llm_judge/common.py: judged against a reference
KOREAN_EXEMPT = (138, 140)  # KoMT-Bench detector.py: no penalty on these questions
JUDGE_CALLS = 8  # judge commands running at once
JUDGE_TIMEOUT_S = 600  # one judgment; an API judge retrying for longer is stuck
ONE_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")  # fastchat/llm_judge/common.py one_score_pattern
ONE_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")  # ... and one_score_pattern_backup

# FastChat's single-answer judge prompts, copied from lm-sys/FastChat fastchat/llm_judge/data/
# judge_prompts.jsonl (Apache-2.0), only the four MT-Bench's single grading uses. KoMT-Bench ships
# its translation (judge_prompts_ko.jsonl) beside its questions.
_RATE = ('After providing your explanation, you must rate the response on a scale of 1 to 10 by strictly '
         'following this format: "[[rating]]", for example: "Rating: [[5]]".')  # fmt: skip
_JUDGE = "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant"
_GENERAL = ("Your evaluation should consider factors such as the helpfulness, relevance, accuracy, depth, "
            "creativity, and level of detail of the response.")  # fmt: skip
_MATH = ("Your evaluation should consider correctness and helpfulness. You will be given a reference answer "
         "and the assistant's answer.")  # fmt: skip
_CORRECT = ("comparing the assistant's answer with the reference answer. Identify and correct any mistakes. "
            "Be as objective as possible. ")  # fmt: skip
_CONVERSATION = ("<|The Start of Assistant A's Conversation with User|>\n\n### User:\n{question_1}\n\n"
                 "### Assistant A:\n{answer_1}\n\n### User:\n{question_2}\n\n### Assistant A:\n{answer_2}\n\n"
                 "<|The End of Assistant A's Conversation with User|>")  # fmt: skip
MT_BENCH_JUDGE_PROMPTS = {
    "single-v1": {
        "system_prompt": "You are a helpful assistant.",
        "prompt_template": f"[Instruction]\n{_JUDGE} to the user question displayed below. {_GENERAL} Begin your "
        f"evaluation by providing a short explanation. Be as objective as possible. {_RATE}\n\n[Question]\n"
        "{question}\n\n[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]",
    },
    "single-math-v1": {
        "system_prompt": "You are a helpful assistant.",
        "prompt_template": f"[Instruction]\n{_JUDGE} to the user question displayed below. {_MATH} Begin your "
        f"evaluation by {_CORRECT}{_RATE}\n\n[Question]\n{{question}}\n\n[The Start of Reference Answer]\n"
        "{ref_answer_1}\n[The End of Reference Answer]\n\n[The Start of Assistant's Answer]\n{answer}\n"
        "[The End of Assistant's Answer]",
    },
    "single-v1-multi-turn": {
        "system_prompt": f"{_JUDGE} to the user question displayed below. {_GENERAL} You evaluation should focus "
        "on the assistant's answer to the second user question. Begin your evaluation by providing a short "
        f"explanation. Be as objective as possible. {_RATE}\n\n",
        "prompt_template": _CONVERSATION,
    },
    "single-math-v1-multi-turn": {
        "system_prompt": f"{_JUDGE} to the user question. {_MATH} You evaluation should focus on the assistant's "
        f"answer to the second question. Begin your evaluation by {_CORRECT}{_RATE}\n\n",
        "prompt_template": "<|The Start of Reference Answer|>\n\n### User:\n{question_1}\n\n### Reference answer:\n"
        "{ref_answer_1}\n\n### User:\n{question_2}\n\n### Reference answer:\n{ref_answer_2}\n\n"
        "<|The End of Reference Answer|>\n\n\n" + _CONVERSATION,
    },
}  # fmt: skip


@dataclass(frozen=True)
class ChatBench:
    """What a chat benchmark reads beside its question file."""

    reference_file: str
    """GPT-4's reference answers (FastChat answer format), for the NEED_REF_CATS questions."""
    judge_prompts_file: str | None
    """FastChat-shaped judge prompts; None: FastChat's English ones (MT_BENCH_JUDGE_PROMPTS)."""
    korean: bool
    """Apply KoMT-Bench's square-root rule to answers not in Korean."""


BENCHES = {
    "mt_bench": ChatBench("reference_answer_gpt-4.jsonl", None, korean=False),
    "komt_bench": ChatBench("reference_answer_ko_gpt-4.jsonl", "judge_prompts_ko.jsonl", korean=True),
}


@dataclass(frozen=True)
class Question:
    question_id: int
    category: str
    turns: tuple[str, str]


def question(r: dict) -> Question:
    """A question.jsonl record (the Task's item parser: KeyError / ValueError become a DataError)."""
    turns = tuple(str(t) for t in r["turns"]) if isinstance(r["turns"], list) else ()
    if len(turns) != 2:
        raise ValueError(f"question {r['question_id']} has {len(turns)} turns, not 2")
    return Question(int(r["question_id"]), str(r["category"]), turns)


def default_model_id(ckpt: str | Path) -> str:
    """The checkpoint's folder name; a stage's `checkpoint` folder takes its stage's name."""
    path = Path(ckpt).resolve()
    return path.parent.name if path.name == "checkpoint" else path.name


def write_jsonl(path: Path, records: list[dict]) -> str:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return str(path)


# ---- judging --------------------------------------------------------------------------------------


def judge_prompt(prompts: dict, q: Question, answers: list[str], ref: list[str] | None, turn: int) -> dict:
    """The prompt FastChat's gen_judgment.py sends for this question and turn (single grading)."""
    name = ("single-math-v1" if ref else "single-v1") + ("-multi-turn" if turn == 2 else "")
    if name not in prompts:
        raise DataError(f"the judge prompts have no {name!r} (have {', '.join(map(str, prompts))})")
    fields = {"ref_answer_1": ref[0], "ref_answer_2": ref[1]} if ref else {}
    if turn == 1:
        fields |= {"question": q.turns[0], "answer": answers[0]}
    else:
        fields |= {"question_1": q.turns[0], "question_2": q.turns[1], "answer_1": answers[0], "answer_2": answers[1]}
    try:
        p = prompts[name]
        return {"name": name, "system_prompt": p["system_prompt"], "user_prompt": p["prompt_template"].format(**fields)}
    except (KeyError, IndexError) as err:  # a prompt without its fields, or a template asking for another
        raise DataError(f"judge prompt {name!r}: {type(err).__name__} {err}") from None


def parse_score(text: str) -> float | None:
    """The score in a judge's output as FastChat reads it; None (FastChat's -1) when there is none."""
    match = ONE_SCORE.search(text) or ONE_SCORE_BACKUP.search(text)
    return float(match.group(1)) if match else None  # FastChat's literal_eval, which "08" would crash


def call_judge(command: str, payload: dict, where: str) -> str:
    """The judge command's stdout for one payload; ConfigError when it fails or hangs."""
    try:
        done = subprocess.run(command, shell=True, input=json.dumps(payload, ensure_ascii=False), capture_output=True,
                              encoding="utf-8", errors="replace", timeout=JUDGE_TIMEOUT_S)  # fmt: skip
    except subprocess.TimeoutExpired:
        raise ConfigError(f"--judge {command!r} ran past {JUDGE_TIMEOUT_S} s on {where}") from None
    if done.returncode != 0:
        said = (done.stderr.strip().splitlines() or [""])[-1]
        raise ConfigError(f"--judge {command!r} failed on {where} (exit status {done.returncode})"
                          + (f": {said}" if said else ""))  # fmt: skip
    return done.stdout


def judge_inputs(name: str, folder: Path, questions: list[Question]) -> tuple[dict, list[list[str] | None]]:
    """The judge prompts by name and each question's reference answer (None outside NEED_REF_CATS),
    read before any answer is generated so a missing file fails fast."""
    from orchestration.eval.tasks import read_records

    bench = BENCHES[name]
    prompts, path = MT_BENCH_JUDGE_PROMPTS, folder / (bench.judge_prompts_file or bench.reference_file)
    try:
        if bench.judge_prompts_file:
            prompts = {r["name"]: r for r in read_records(path)}
        path = folder / bench.reference_file
        refs = {r["question_id"]: r["choices"][0]["turns"] for r in read_records(path)}
    except (KeyError, IndexError, TypeError, ValueError):
        raise DataError(f"{path}: not FastChat judge prompts / answer lines") from None
    missing = [q.question_id for q in questions if q.category in NEED_REF_CATS and q.question_id not in refs]
    if missing:
        raise DataError(f"{folder / bench.reference_file}: no reference answer for question {missing[0]}")
    return prompts, [refs[q.question_id] if q.category in NEED_REF_CATS else None for q in questions]


def run_judge(name: str, questions: list[Question], answers: list[list[str]], prompts: dict,
              refs: list[list[str] | None], config) -> list[dict]:  # fmt: skip
    """FastChat single-judgment lines (score -1 where the judge gave none) for every question and
    turn, in order. JUDGE_CALLS commands run at once: a judge is usually a remote model's API, so the
    time is spent waiting; the first failure stops the run (its one line)."""
    from concurrent.futures import ThreadPoolExecutor

    asks = []
    for q, a, ref in zip(questions, answers, refs):
        for turn in (1, 2):
            prompt = judge_prompt(prompts, q, a, ref, turn)
            payload = {"task": name, "question_id": q.question_id, "category": q.category, "turn": turn,
                       "questions": list(q.turns), "answers": a, "reference": ref,
                       "judge_prompt": prompt}  # fmt: skip
            asks.append((q, turn, prompt, payload))

    def judged(ask) -> dict:
        q, turn, prompt, payload = ask
        output = call_judge(config.judge, payload, f"{name} question {q.question_id} turn {turn}")
        score = parse_score(output)
        return {"question_id": q.question_id, "model": config.model_id, "judge": [config.judge, prompt["name"]],
                "user_prompt": prompt["user_prompt"], "judgment": output, "score": -1 if score is None else score,
                "turn": turn, "tstamp": time.time()}  # fmt: skip

    with ThreadPoolExecutor(JUDGE_CALLS) as pool:
        return list(pool.map(judged, asks))


def judgments_file(spec: str, name: str, tasks: str) -> Path | None:
    """The file `--judgments` gives for this task: FILE (one chat task asked) or TASK=FILE,..."""
    from orchestration.eval.tasks import TASKS

    entries = [e.strip() for e in spec.split(",") if e.strip()]
    asked = [n.partition("=")[0].strip() for n in tasks.split(",")]
    chat = [n for n in asked if n in TASKS and TASKS[n].kind == "chat"]
    named = dict(e.split("=", 1) for e in entries if "=" in e)
    if any("=" not in e for e in entries):
        if len(entries) > 1 or len(chat) > 1:
            raise ConfigError("--judgments: name each file's task (mt_bench=FILE,komt_bench=FILE)")
        return Path(entries[0])
    if unknown := [n for n in named if n not in chat]:
        raise ConfigError(f"--judgments: {', '.join(unknown)} is not a chat task asked for ({', '.join(chat)})")
    return Path(named[name]) if name in named else None


def read_judgments(path: Path, model_id: str) -> list[dict]:
    """The lines of a FastChat *_single.jsonl judgment file about this model (or its only model)."""
    if not path.is_file():
        raise DataError(f"{path}: no such judgments file")
    lines = []
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, 1):
            try:
                line = json.loads(text) if text.strip() else None
                if line is not None:
                    lines.append(line | {"question_id": int(line["question_id"]), "turn": int(line["turn"]),
                                         "score": float(line["score"])})  # fmt: skip
            except (ValueError, KeyError, TypeError):
                raise DataError(f"{path}: line {number} is not a FastChat single judgment "
                                "(JSON with question_id, score, turn)") from None  # fmt: skip
    models = {line.get("model") for line in lines}
    if model_id not in models and len(models) > 1:
        raise DataError(f"{path}: no judgments of {model_id!r} (has {', '.join(sorted(map(str, models)))}); "
                        "give --model-id")  # fmt: skip
    return [line for line in lines if line.get("model") == model_id or model_id not in models]


# ---- scores ---------------------------------------------------------------------------------------


def korean_rule(score: float, answer: str, question_id: int) -> float:
    """KoMT-Bench: the square root of the score of an answer not in Korean (not on 138, 140)."""
    from tokenizer.language import detect_language

    if question_id in KOREAN_EXEMPT or score < 0 or detect_language(answer) == "ko":
        return score
    return math.sqrt(score)


def scores(name: str, questions: list[Question], answers: list[list[str]], lines: list[dict],
           where: str) -> list[dict]:  # fmt: skip
    """One row per question and turn: the judged score (KoMT-Bench's rule applied), None when the
    judgment failed (-1) or is missing. The last line of a question and turn wins (reruns append)."""
    by_key = {(line["question_id"], line["turn"]): line for line in lines}
    rows = []
    for q, a in zip(questions, answers):
        for turn in (1, 2):
            line = by_key.get((q.question_id, turn))
            if line and "user_prompt" in line and a[turn - 1] not in line["user_prompt"]:
                raise DataError(f"{where}: the judgment of {name} question {q.question_id} turn {turn} is "
                                "about another answer than this run's (another checkpoint, --max-new-tokens "
                                "or --model-id?)")  # fmt: skip
            raw = None if line is None or line["score"] == -1 else line["score"]
            score = korean_rule(raw, a[turn - 1], q.question_id) if raw is not None and BENCHES[name].korean else raw
            rows.append({"question_id": q.question_id, "turn": turn, "judged": line is not None, "raw_score": raw,
                         "score": score})  # fmt: skip
    return rows


def summarize(rows: list[dict]) -> dict:
    """Mean score per turn and over all judged answers (FastChat's show_result), and the counts."""
    judged = [r["score"] for r in rows if r["score"] is not None]
    metrics = {"judged": len(judged), "failed": sum(r["judged"] and r["score"] is None for r in rows),
               "missing": sum(not r["judged"] for r in rows)}  # fmt: skip
    if judged:
        metrics["score"] = sum(judged) / len(judged)
    for turn in (1, 2):
        turn_scores = [r["score"] for r in rows if r["turn"] == turn and r["score"] is not None]
        if turn_scores:
            metrics[f"score_turn{turn}"] = sum(turn_scores) / len(turn_scores)
    return metrics


def plan_chat(chosen, config) -> Plan:
    """Inputs: the questions; results: both turns' answers (generated in shards or here); the
    judging and the scores in the driver (finish_chat). Every file the scoring needs is read
    here, before the (long) generation."""
    from orchestration.eval.tasks import read_records, to_item

    name = chosen.task.name
    config = replace(config, model_id=config.model_id or "hanyeong")  # a stage's eval names no checkpoint
    if name not in BENCHES:
        raise ConfigError(f"{name}: not a chat benchmark (known: {', '.join(BENCHES)})")
    questions = [to_item(chosen, r, i) for i, r in enumerate(read_records(chosen.path)[: config.limit])]
    judging = judge_inputs(name, chosen.path.parent, questions) if config.judge else None
    source = judgments_file(config.judgments, name, config.tasks) if config.judgments else None
    lines = read_judgments(source, config.model_id) if source is not None else None
    return Plan(questions, chat_answers.answer, partial(finish_chat, chosen, config, questions, judging, source, lines))


def finish_chat(chosen, config, questions: list[Question], judging: tuple | None, source: Path | None,
                lines: list[dict] | None, answered: list[dict]) -> dict:  # fmt: skip
    """Answers (written to config.answers_dir, else kept in the result) and, with a judge or a
    judgments file, the mean scores."""
    name = chosen.task.name
    answers = [a["turns"] for a in answered]
    records = chat_answers.answer_records(questions, answered, config)
    out = Path(config.answers_dir) if config.answers_dir else None
    result = {"kind": "chat", "path": str(chosen.path), "n": len(questions), "metrics": {},
              "answers": write_jsonl(out / f"{name}_answers.jsonl", records) if out else records}  # fmt: skip
    if judging is not None:  # the judgments are kept like the answers: FastChat's file, else in the result
        lines = run_judge(name, questions, answers, *judging, config)
        result["judgments"] = write_jsonl(out / f"{name}_judgments.jsonl", lines) if out else lines
        where = str(out / f"{name}_judgments.jsonl") if out else "--judge"
    elif lines is not None:
        where = result["judgments"] = str(source)
    else:
        return result  # answers only: no score
    rows = scores(name, questions, answers, lines, where)
    result["metrics"] = summarize(rows)
    if config.items:
        result["items"] = rows
    return result
