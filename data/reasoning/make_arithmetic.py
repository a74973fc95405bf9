"""Writes the synthetic arithmetic reasoning data beside this script (committed; rerun to remake it).

    python data/reasoning/make_arithmetic.py

A verifiable task small enough for a 2-layer model on a laptop CPU, in Korean and English:
"What is 3 plus 4?" / "3 더하기 4는 얼마인가요?", answered with one `<thought>` block, then the answer.

- arithmetic-traces.jsonl: SFT traces. Each question appears three times: with the right sum, the
  sum plus one and the sum plus two (consistent wrong rules, in the thought and the answer). A
  model fitted to it answers right about a third of the time, whatever the question: the starting
  point GRPO needs (mean reward between 0.2 and 0.6), where only the reward tells the rules apart.
- arithmetic-prompts.jsonl: every question once with its right answer: the GRPO prompts, each
  with a reference for the `numeric` reward.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
QUESTION = {"en": "What is {a} plus {b}?", "ko": "{a} 더하기 {b}는 얼마인가요?"}
ANSWER = {"en": "The answer is {s}.", "ko": "답은 {s}입니다."}


def trace(a: int, b: int, s: int, language: str) -> str:
    return f"<thought>\n{a} + {b} = {s}\n</thought>\n" + ANSWER[language].format(s=s)


def record(a: int, b: int, s: int, language: str) -> dict:
    return {"question": QUESTION[language].format(a=a, b=b), "answer": trace(a, b, s, language)}


def main() -> None:
    questions = [(a, b, lang) for a in range(10) for b in range(10) for lang in ("en", "ko")]
    traces = [record(a, b, a + b + wrong, lang) for a, b, lang in questions for wrong in (0, 1, 2)]
    prompts = [record(a, b, a + b, lang) for a, b, lang in questions]
    for name, rows in (("arithmetic-traces.jsonl", traces), ("arithmetic-prompts.jsonl", prompts)):
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        (HERE / name).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
