"""Generation tasks: the model writes an answer, which is then checked.

GSM8K (exact numeric match): lm-evaluation-harness's prompt ("Question: ...\\nAnswer:", few-shot
examples from the train split joined by blank lines, greedy, until "Question:"), and a tolerant
answer: the number after "#### " when the model wrote one, else the last number of the answer;
"$1,000.00", "1000 dollars" and "1000." all read 1000 (tests/orchestration/eval/test_generative.py).
With the chat template the examples are earlier user/assistant turns and the answer ends the turn.

HumanEval (pass@1, greedy): the model completes the function's prompt until a new top-level
statement ("\\ndef", "\\nclass", "\\nif", "\\nprint", "\\n#"); prompt + completion + the task's
tests + `check(entry_point)` then run in a separate, limited process (sandbox.py), never here.

Generation goes through the backend protocol's batched `generate` (greedy, stop ids [|endofturn|]
and [EOS], the special block suppressed); the text stops are applied to the decoded text. A prompt
longer than the model's context keeps its last tokens.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

from hanyeong.errors import DataError
from orchestration.eval import sandbox
from orchestration.eval.plan import Plan

FEWSHOT_SEED = 1234
GSM8K_UNTIL = ("Question:", "</s>", "<|im_end|>")
HUMANEVAL_UNTIL = ("\ndef ", "\nclass ", "\nif ", "\nprint(", "\n#")


@dataclass(frozen=True)
class GenItem:
    """One generation question: the prompt, the reference the answer is checked against, and
    (for few-shot) the solved answer an example shows."""

    prompt: str
    reference: str
    solution: str = ""
    extra: dict = field(default_factory=dict)


def record_field(record: dict, name: str, where: str) -> str:
    if name not in record or record[name] is None:
        raise DataError(f"{where}: a record has no {name!r} field (has {', '.join(map(str, record))})")
    return str(record[name])


# ---- GSM8K ----------------------------------------------------------------------------------------

ANSWER = re.compile(r"####\s*([-$]?\s*[\d.,]*\d)")
NUMBER = re.compile(r"-?\$?\s?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+")


def gsm8k(r: dict) -> GenItem:
    question, answer = record_field(r, "question", "gsm8k"), record_field(r, "answer", "gsm8k")
    match = ANSWER.search(answer)
    return GenItem(f"Question: {question}\nAnswer:", match.group(1) if match else answer, answer)


def extract_number(text: str) -> str | None:
    """The answer's number: after '#### ' if present, else the last number; None without one."""
    match = ANSWER.search(text)
    found = match.group(1) if match else (NUMBER.findall(text) or [None])[-1]
    if found is None:
        return None
    return found.replace("$", "").replace(",", "").replace(" ", "").rstrip(".")


def same_number(answer: str | None, reference: str) -> bool:
    if answer is None:
        return False
    try:
        return abs(float(answer) - float(extract_number(reference) or "nan")) < 1e-6
    except ValueError:
        return False


def check_gsm8k(items: Sequence[GenItem], completions: Sequence[str], config) -> list[dict]:
    out = []
    for item, text in zip(items, completions):
        answer = extract_number(text)
        out.append({"answer": answer, "correct": same_number(answer, item.reference)})
    return out


# ---- HumanEval ------------------------------------------------------------------------------------


def humaneval(r: dict) -> GenItem:
    prompt = record_field(r, "prompt", "humaneval")
    tests = record_field(r, "test", "humaneval")
    entry = record_field(r, "entry_point", "humaneval")
    return GenItem(prompt, entry, r.get("canonical_solution", ""), {"test": tests, "task_id": r.get("task_id")})


def program(item: GenItem, completion: str) -> str:
    """The file the sandbox runs: the prompt, the completion, the tests, the check call."""
    return f"{item.prompt}{completion}\n\n{item.extra['test']}\n\ncheck({item.reference})\n"


def check_humaneval(items: Sequence[GenItem], completions: Sequence[str], config) -> list[dict]:
    outcomes = sandbox.run_programs([program(i, c) for i, c in zip(items, completions)],
                                    timeout=config.code_timeout)  # fmt: skip
    return [{"correct": o.passed, "status": o.status, "seconds": o.seconds} for o in outcomes]


# ---- prompts and generation -----------------------------------------------------------------------


def with_fewshot(items: Sequence[GenItem], pool: Sequence[GenItem], k: int, same_pool: bool) -> list[list[GenItem]]:
    """Each item preceded by k solved examples from `pool` (never itself), seeded."""
    rng, out = random.Random(FEWSHOT_SEED), []
    for index, item in enumerate(items):
        candidates = [i for i in range(len(pool)) if not (same_pool and i == index)]
        out.append([pool[i] for i in rng.sample(candidates, min(k, len(candidates)))] + [item])
    return out


def render(shots_and_item: list[GenItem], chat: bool) -> str:
    """Plain: solved examples and the question joined by blank lines. Chat: turns."""
    *shots, item = shots_and_item
    if not chat:
        return "\n\n".join([*(f"{s.prompt} {s.solution}" for s in shots), item.prompt])
    from orchestration.data.chat import render as render_chat

    turns = []
    for s in shots:
        turns += [{"role": "user", "content": s.prompt}, {"role": "assistant", "content": s.solution}]
    return render_chat([*turns, {"role": "user", "content": item.prompt}], add_generation_prompt=True)


def cut(text: str, until: Sequence[str]) -> str:
    """The text before the first of the stop strings."""
    ends = [text.find(u) for u in until if u in text]
    return text[: min(ends)] if ends else text


def generate_texts(backend, model, tokenizer, spec, texts: Sequence[str], max_new_tokens: int, batch_rows: int,
                   until: Sequence[str], temperature: float = 0.0, seed: int = 0) -> list[str]:  # fmt: skip
    """Completions of the texts ([BOS] + text), batched by length, cut at `until`: greedy, or
    sampled at `temperature` (top_p 1) from `seed` (each batch draws from seed + its index)."""
    from orchestration.core.generation import suppressed_ids

    stops = [tokenizer.hf.token_to_id("[|endofturn|]"), tokenizer.hf.token_to_id("[EOS]")]
    stops = [i for i in stops if i is not None]
    suppress = suppressed_ids(spec.vocab_size, stops, tokenizer_size=tokenizer.vocab_size)
    new = max(1, min(max_new_tokens, spec.max_seq_len // 2))
    keep = spec.max_seq_len - new
    bos = tokenizer.hf.token_to_id("[BOS]")
    prompts = [[bos, *ids][-keep:] for ids in tokenizer.encode_batch(list(texts))]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out = [""] * len(prompts)
    for lo in range(0, len(order), batch_rows):
        chunk = order[lo : lo + batch_rows]
        rows = backend.generate(model, [prompts[i] for i in chunk], new, temperature, 1.0, seed + lo // batch_rows,
                                stops, suppress_ids=suppress)  # fmt: skip
        for i, ids in zip(chunk, rows):
            ids = [t for t in ids if t not in stops]
            out[i] = cut(tokenizer.stream_decoder(skip_special_tokens=True).decode(ids), until)
    return out


def plan_generate(chosen, config) -> Plan:
    """Inputs: each item's prompt (few-shot examples drawn over all items, as one run would);
    results: the completions, checked and counted in the driver (generate_result)."""
    from orchestration.eval.tasks import read_records

    task = chosen.task
    items = [task.item(r) for r in read_records(chosen.path)[: config.limit]]
    if config.num_fewshot:
        same = chosen.fewshot_path is None
        pool = items if same else [task.item(r) for r in read_records(chosen.fewshot_path)]
        prompts = with_fewshot(items, pool, config.num_fewshot, same)
    else:
        prompts = [[item] for item in items]
    texts = [render(p, config.chat_template) for p in prompts]
    until = task.until if not config.chat_template or task.metric == "pass@1" else ()
    return Plan(texts, partial(complete, until=until), partial(generate_result, chosen, items, config))


def complete(backend, model, tokenizer, spec, config, texts: list[str], until: Sequence[str] = ()) -> list[str]:
    """Greedy completions of the prompts (plan_generate's per-item part)."""
    return generate_texts(backend, model, tokenizer, spec, texts, config.max_new_tokens, config.batch_rows, until)


def generate_result(chosen, items: list[GenItem], config, completions: list[str]) -> dict:
    """A generation task's metric (exact_match or pass@1) and, with config.items, each answer."""
    task = chosen.task
    checked = task.check(items, completions, config)
    n = max(len(items), 1)
    result = {"kind": task.kind, "path": str(chosen.path), "n": len(items),
              "metrics": {task.metric: sum(c["correct"] for c in checked) / n}}  # fmt: skip
    if config.items:
        result["items"] = [{"completion": text, **c} for text, c in zip(completions, checked)]
    return result
