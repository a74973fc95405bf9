"""Benchmark tasks read from local files: each turns a file's records into scored items.

A multiple-choice item is a context and its choices; the model's answer is the choice of highest
log-likelihood after the context (`acc`), or of highest log-likelihood per character of the choice
(`acc_norm`, lm-evaluation-harness's definition: lm_eval/api/task.py `lls / completion_len`,
completion_len = len(choice) in characters, without the delimiter). Prompts are lm-evaluation-
harness's where it has the task (lm_eval/tasks/kobest/*.yaml and utils.py, kmmlu/default), so the
two give the same numbers on the same files (tests/orchestration/eval/test_lm_eval_parity.py).

A chat task (MT-Bench, KoMT-Bench) is FastChat's question.jsonl: two-turn questions the model
answers and a judge scores (chat_bench.py); its reference answers and judge prompts lie beside it.

A bits-per-byte task is plain text: one document per non-empty line (.txt) or per record's "text"
(.jsonl); gzip when the name ends in .gz.

The files live in the benchmarks folder (../shared/data/benchmarks; HANYEONG_BENCHMARKS or
--benchmarks); `NAME=PATH` on the command line points a task at any file of the same shape.
"""

from __future__ import annotations

import ast
import csv
import gzip
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hanyeong.errors import ConfigError, DataError
from orchestration.eval import chat_bench, generative

ENV_BENCHMARKS = "HANYEONG_BENCHMARKS"
DEFAULT_BENCHMARKS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "benchmarks"


@dataclass(frozen=True)
class Item:
    """One multiple-choice question: the model scores `delimiter + choice` after `context`."""

    context: str
    choices: tuple[str, ...]
    gold: int
    """Index of the right choice."""


@dataclass(frozen=True)
class Task:
    """A benchmark: where its records are, how a record becomes an Item (or a text for bpb)."""

    name: str
    kind: str
    """'choice' (multiple choice by log-likelihood), 'bpb' (bits per byte of text), 'generate'
    (the model writes an answer that `check` scores: generative.py) or 'chat' (two-turn questions,
    answered and then judged: chat_bench.py)."""
    path: str
    """The evaluated file (or folder of .json files), relative to the benchmarks folder."""
    item: Callable[[dict], Item] | None = None
    """Record -> Item ('choice' tasks) or generative.GenItem ('generate' tasks)."""
    fewshot_path: str | None = None
    """Where few-shot examples come from (a train split); None: other items of the same file."""
    delimiter: str = " "
    """Between the context and a choice (lm-evaluation-harness's target_delimiter)."""
    until: tuple[str, ...] = ()
    """'generate': the answer ends before the first of these strings."""
    check: Callable | None = None
    """'generate': (items, completions, config) -> [{"correct": bool, ...}] per item."""
    metric: str = "acc"
    """'generate': the name of the share of correct answers ('exact_match', 'pass@1')."""


# ---- reading files -------------------------------------------------------------------------------


def open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def read_records(path: Path) -> list[dict]:
    """The records of a .tsv / .csv (with a header), .json (a list), .jsonl file, gzipped or not,
    or of every .json file under a folder (in path order)."""
    if path.is_dir():
        return [r for file in sorted(path.rglob("*.json")) for r in read_records(file)]
    if not path.is_file():
        raise DataError(f"{path}: no such benchmark file")
    name = path.name.removesuffix(".gz")
    with open_text(path) as f:
        if name.endswith(".tsv"):
            return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        if name.endswith(".csv"):
            return list(csv.DictReader(f))
        if name.endswith(".jsonl"):
            return [json.loads(line) for line in f if line.strip()]
        if name.endswith(".json"):
            return json.load(f)
    raise DataError(f"{path}: not a .tsv, .csv, .json or .jsonl file")


def read_texts(path: Path) -> list[str]:
    """The documents of a text file: its non-empty lines, or each .jsonl record's "text"."""
    if not path.is_file():
        raise DataError(f"{path}: no such text file")
    if path.name.removesuffix(".gz").endswith(".jsonl"):
        return [r["text"] for r in read_records(path) if r.get("text", "").strip()]
    with open_text(path) as f:
        return [line.rstrip("\r\n") for line in f if line.strip()]


def field(record: dict, name: str, where: str) -> str:
    if name not in record or record[name] is None:
        raise DataError(f"{where}: a record has no {name!r} field (has {', '.join(map(str, record))})")
    return str(record[name])


# ---- records -> items: the prompts of lm-evaluation-harness where it has the task ---------------

TRUE = {"true", "1"}


def kobest_boolq(r: dict) -> Item:
    # lm_eval/tasks/kobest/kobest_boolq.yaml: "{{paragraph}} 질문: {{question}} 답변: "
    context = f"{field(r, 'Text', 'kobest_boolq')} 질문: {field(r, 'Question', 'kobest_boolq')} 답변: "
    return Item(context, ("아니오", "예"), int(r["Answer"].strip().lower() in TRUE))


def kobest_copa(r: dict) -> Item:
    # lm_eval/tasks/kobest/utils.py copa_doc_to_text: premise, a space, then " 왜냐하면"/" 그래서"
    connector = {"원인": " 왜냐하면", "결과": " 그래서"}[field(r, "question", "kobest_copa").strip()]
    return Item(f"{r['sentence']} {connector}", (r["1"], r["2"]), int(r["Answer"]) - 1)


def kobest_hellaswag(r: dict) -> Item:
    choices = tuple(field(r, f"choice{i}", "kobest_hellaswag") for i in range(1, 5))
    return Item(f"문장: {r['context']}", choices, int(r["label"]))


def kobest_sentineg(r: dict) -> Item:
    return Item(f"문장: {field(r, 'Text', 'kobest_sentineg')} 긍부정:", ("부정", "긍정"), int(r["Label"]))


def kobest_wic(r: dict) -> Item:
    context = (f"문장1: {field(r, 'SENTENCE1', 'kobest_wic')} 문장2: {r['SENTENCE2']} "
               f"두 문장에서 {r['Target']}가 같은 뜻으로 쓰였나?")  # fmt: skip
    return Item(context, ("아니오", "예"), int(r["ANSWER"].strip().lower() in TRUE))


def kmmlu(r: dict) -> Item:
    # lm_eval/tasks/kmmlu/default/_default_kmmlu_yaml (note the full-width colon)
    question = field(r, "question", "kmmlu").strip()
    context = f"{question}\nA. {r['A']}\nB. {r['B']}\nC. {r['C']}\nD. {r['D']}\n정답："
    return Item(context, ("A", "B", "C", "D"), int(float(r["answer"])) - 1)


def click(r: dict) -> Item:
    choices = tuple(str(c) for c in r["choices"])
    paragraph = str(r.get("paragraph") or "").strip()
    context = (f"{paragraph}\n" if paragraph else "") + f"질문: {field(r, 'question', 'click')}\n정답:"
    return Item(context, choices, choices.index(str(r["answer"])))


def truthfulqa_mc1(r: dict) -> Item:
    # MC1 from the CSV: the best answer against the listed incorrect ones (no few-shot preamble)
    wrong = [a.strip() for a in field(r, "Incorrect Answers", "truthfulqa_mc1").split(";") if a.strip()]
    return Item(f"Q: {r['Question']}\nA:", (r["Best Answer"].strip(), *wrong), 0)


def kobbq(r: dict) -> Item:
    choices = tuple(ast.literal_eval(field(r, "choices", "kobbq")))
    context = f"{r['context']}\n질문: {r['question']}\n정답:"
    return Item(context, choices, choices.index(r["answer"]))


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> None:
    """Add a task (a name `hanyeong eval --tasks` accepts)."""
    TASKS[task.name] = task


for _task in (
    Task("kobest_boolq", "choice", "kobest/BoolQ/test.tsv", kobest_boolq, "kobest/BoolQ/train.tsv"),
    Task("kobest_copa", "choice", "kobest/COPA/test.tsv", kobest_copa, "kobest/COPA/train.tsv"),
    Task("kobest_hellaswag", "choice", "kobest/HellaSwag/test.tsv", kobest_hellaswag,
         "kobest/HellaSwag/train.tsv"),
    Task("kobest_sentineg", "choice", "kobest/SentiNeg/test.tsv", kobest_sentineg,
         "kobest/SentiNeg/train.tsv"),
    Task("kobest_wic", "choice", "kobest/WiC/test.tsv", kobest_wic, "kobest/WiC/train.tsv"),
    Task("kmmlu", "choice", "kmmlu/criminal_kmmlu.csv", kmmlu),
    Task("click", "choice", "click", click),
    Task("truthfulqa_mc1", "choice", "truthfulqa/TruthfulQA.csv", truthfulqa_mc1),
    Task("kobbq", "choice", "kobbq/KoBBQ_test_samples.tsv.gz", kobbq),
    Task("gsm8k", "generate", "gsm8k/test.jsonl", generative.gsm8k, "gsm8k/train.jsonl.gz",
         until=generative.GSM8K_UNTIL, check=generative.check_gsm8k, metric="exact_match"),
    Task("humaneval", "generate", "humaneval/HumanEval.jsonl.gz", generative.humaneval,
         until=generative.HUMANEVAL_UNTIL, check=generative.check_humaneval, metric="pass@1"),
    # NAME=PATH: the reference answers (and KoMT-Bench's judge prompts) are read beside PATH
    Task("mt_bench", "chat", "mt-bench/question.jsonl", chat_bench.question),
    Task("komt_bench", "chat", "komt-bench/question_ko.jsonl", chat_bench.question),
    # held-back text, in neither the quickstart corpus nor the recipes' sources
    Task("bpb_ko", "bpb", "../ko/korean-hate-speech/news_title/dev.news_title.txt"),
    Task("bpb_en", "bpb", "../en/wikitext-2/valid.txt.gz"),
):  # fmt: skip
    register_task(_task)


def benchmarks_dir(given: Path | None = None) -> Path:
    """--benchmarks, else $HANYEONG_BENCHMARKS, else ../shared/data/benchmarks beside the checkout."""
    return Path(given or os.environ.get(ENV_BENCHMARKS) or DEFAULT_BENCHMARKS)


@dataclass(frozen=True)
class Selected:
    """A task as asked for: its definition and the file it reads."""

    task: Task
    path: Path
    fewshot_path: Path | None


def select(spec: str, root: Path) -> list[Selected]:
    """'a,b=PATH,c' -> the tasks, each on its default file under `root` or on PATH."""
    out = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, _, path = part.partition("=")
        if name not in TASKS:
            raise ConfigError(f"--tasks: unknown task {name!r}; known: {', '.join(TASKS)}")
        task = TASKS[name]
        fewshot = root / task.fewshot_path if task.fewshot_path and not path else None
        out.append(Selected(task, Path(path) if path else root / task.path, fewshot))
    if not out:
        raise ConfigError("--tasks: name at least one task")
    return out


def load_items(selected: Selected, limit: int | None = None) -> list[Item]:
    """The first `limit` items of a multiple-choice task's file."""
    records = read_records(selected.path)[:limit]
    return [to_item(selected, r, i) for i, r in enumerate(records)]


def to_item(selected: Selected, record: dict, index: int) -> Item:
    try:
        return selected.task.item(record)
    except (KeyError, ValueError, SyntaxError) as err:
        raise DataError(f"{selected.path}: record {index + 1} is not a {selected.task.name} record "
                        f"({type(err).__name__}: {err})") from None  # fmt: skip
