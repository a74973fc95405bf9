"""Reward functions: plain Python callables that score an answer, by name.

    score = get_reward("numeric")(answer, reference, prompt)      # 1.0 or 0.0

A reward function takes the answer's text (a reasoning model's `<thought>...</thought>` kept in
it), the record's reference answer (None when it had none) and the Prompt
(orchestration/sampling/prompts.py, or None), and returns a finite float. It is pure: the same
inputs give the same value, and it changes none of them. A verifier returns 1.0 for a correct
answer and 0.0 otherwise; `data select --by verifier:NAME` keeps only answers it scores 1.0, and
GRPO sums the rewards it is given, each times its weight. The rewards (EXAONE Deep style RL):

    numeric   {0, 1}   the final answer's number is the reference's ('#### 72', \\boxed{72}, 72)
    format    {0, 1}   one <thought>...</thought> at the start, then a non-blank answer
    language  {0, 1}   the final answer is in the prompt's language, Korean or English
    length    [-1, 0]  DAPO's overlong penalty: 0 to 2048 characters, down to -1 at 4096

The final answer is the text after the last `</thought>` (the thought is not the answer); an
answer whose last `<thought>` never closes gave none. To add a reward:

    register_reward("short", length_penalty(200, 400))
    register_reward("polite", lambda answer, reference, prompt: float("please" in answer))
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from hanyeong.errors import ConfigError
from orchestration.eval.generative import extract_number, same_number

if TYPE_CHECKING:
    from orchestration.sampling.prompts import Prompt

Reward = Callable[[str, "str | None", "Prompt | None"], float]
THOUGHT_OPEN, THOUGHT_CLOSE = "<thought>", "</thought>"
BOXED = "\\boxed{"
# A fraction as the stated answer (\boxed{\frac{3}{4}}, '#### 3/4'): float() cannot read it.
FRACTION = re.compile(
    r"\s?(?:#### ?)?(?:(-) ?)?(?:\\[dt]?frac\{(\d+)\}\{(\d+)\}|(\d+) ?/ ?(\d+)(?![\d.]))"
)
# Not language: code, LaTeX commands (\boxed, \frac), chat-template and thought tokens.
MARKUP = re.compile(r"```.*?(?:```|\Z)|`[^`\n]*`|\\[A-Za-z]+|\[\|\w+\|\]|</?thought>", re.S)
TURN_TOKEN = re.compile(r"\[\|(?:system|user|assistant|endofturn)\|\]")
HANGUL = re.compile(r"[\u1100-\u11ff\u3130-\u318f\ua960-\ua97f\uac00-\ud7ff]")
# Korean text mixes in English terms ("Python에서 list comprehension을 설명해줘" is 23% Hangul
# letters, a syllable counting as one letter), while English text holds Hangul only in a quoted
# word or two; a fifth of the letters splits the two.
KOREAN_SHARE = 0.2
# Fewer letters than this ("B", "x = 5", "OK") say nothing about the language.
MIN_LETTERS = 3
# DAPO's overlong shaping, in characters of the whole answer: a GSM8K-style thought and answer
# runs a few hundred to ~1,500 characters, so 2048 leaves room to reason and 4096 (about 1-2k
# tokens) punishes a rambling trace before a typical generation budget truncates it.
LENGTH_SOFT, LENGTH_HARD = 2048, 4096

REWARDS: dict[str, Reward] = {}


def register_reward(name: str, function: Reward) -> None:
    """Make `function` the reward called `name` (replacing one of that name)."""
    REWARDS[name] = function


def get_reward(name: str) -> Reward:
    """The reward function called `name`; ConfigError listing the known ones."""
    try:
        return REWARDS[name]
    except KeyError:
        known = ", ".join(sorted(REWARDS))
        raise ConfigError(f"reward must be one of {known}, got {name!r}") from None


def final_answer(answer: str) -> str | None:
    """The text after the answer's last </thought> (all of it without one); None when its last
    <thought> never closes (it gave no answer)."""
    if answer.rfind(THOUGHT_OPEN) > answer.rfind(THOUGHT_CLOSE):
        return None
    return answer.rsplit(THOUGHT_CLOSE, 1)[-1]


def last_boxed(text: str) -> str | None:
    """The contents of the last \\boxed{...} (braces inside balanced); None without a closed one."""
    start = text.rfind(BOXED)
    if start < 0:
        return None
    depth = 1
    for i in range(start + len(BOXED), len(text)):
        depth += (text[i] == "{") - (text[i] == "}")
        if depth == 0:
            return text[start + len(BOXED) : i]
    return None


def final_number(text: str) -> str | None:
    """The number an answer ends on: the last \\boxed{...} when there is one, else after the last
    '#### ', else its last number (commas, '$' and a trailing '.' dropped: GSM8K's eval rules)."""
    boxed = last_boxed(text)
    if boxed is not None:
        text = boxed
    elif "####" in text:
        text = text[text.rindex("####") :]
    else:
        return extract_number(text)
    text = " ".join(text.split())  # runs of spaces make these patterns backtrack for seconds
    fraction = FRACTION.match(text)
    if fraction:
        top, bottom = float(fraction[2] or fraction[4]), float(fraction[3] or fraction[5])
        value = top / bottom if bottom else float("inf")
        return f"{fraction[1] or ''}{value:.12f}" if value < float("inf") else None  # not '1e+20'
    return extract_number(text.replace("{", "").replace("}", ""))  # LaTeX's 1{,}000


def numeric(answer: str, reference: str | None, prompt: Prompt | None = None) -> float:
    """1.0 when the final answer's number equals the reference's (a GSM8K answer's '#### 72',
    \\boxed{72} or a bare number); 0.0 otherwise, without a reference or without a final answer."""
    if reference is None:
        return 0.0
    answer, reference = final_answer(answer), final_answer(reference)
    if answer is None or reference is None:
        return 0.0
    truth = final_number(reference)
    return float(truth is not None and same_number(final_number(answer), truth))


def thought_format(answer: str, reference: str | None = None, prompt: Prompt | None = None
                   ) -> float:  # fmt: skip
    """1.0 when the answer is one <thought>...</thought> at its start (after whitespace), with no
    other thought tag, then a non-blank answer; 0.0 otherwise."""
    body = answer.lstrip()
    one_thought = body.count(THOUGHT_OPEN) == 1 and body.count(THOUGHT_CLOSE) == 1
    if not (one_thought and body.startswith(THOUGHT_OPEN)):
        return 0.0
    return float(bool(body.split(THOUGHT_CLOSE, 1)[1].strip()))


def prompt_text(prompt: Prompt | None) -> str:
    """What the user asked: the last user turn of a chat prompt (of a decoded chat template too),
    the text of a plain one; "" for None."""
    if prompt is None:
        return ""
    if prompt.messages is not None:
        asked = [m.get("content") for m in prompt.messages if m.get("role") == "user"]
        return asked[-1] if asked and isinstance(asked[-1], str) else ""
    text = prompt.text or ""
    if "[|user|]" in text:
        return TURN_TOKEN.split(text.rsplit("[|user|]", 1)[1], maxsplit=1)[0]
    return text


def language_of(text: str) -> str | None:
    """'ko' when Hangul is at least KOREAN_SHARE of the text's letters, else 'en'; None with fewer
    than MIN_LETTERS letters (digits, punctuation, code and LaTeX commands are not letters)."""
    letters = [c for c in MARKUP.sub(" ", text) if c.isalpha()]
    if len(letters) < MIN_LETTERS:
        return None
    hangul = sum(1 for c in letters if HANGUL.match(c))
    return "ko" if hangul >= KOREAN_SHARE * len(letters) else "en"


def language(answer: str, reference: str | None = None, prompt: Prompt | None = None) -> float:
    """1.0 when the final answer's language is the prompt's, or either has too few letters to tell
    (a number answering a Korean question); 0.0 on a mismatch or without a (non-blank) answer."""
    final = final_answer(answer)
    if final is None or not final.strip():
        return 0.0
    asked, answered = language_of(prompt_text(prompt)), language_of(final)
    return float(asked is None or answered is None or asked == answered)


def length_penalty(soft: int, hard: int) -> Reward:
    """A reward of 0 up to `soft` characters of answer (thought included), falling linearly to -1 at
    `hard` and -1 beyond (DAPO's overlong reward shaping); ConfigError unless 0 <= soft < hard."""
    if type(soft) is not int or type(hard) is not int or not 0 <= soft < hard:
        raise ConfigError(f"length penalty needs integers 0 <= soft < hard, got {soft!r}, {hard!r}")

    def length(answer: str, reference: str | None = None, prompt: Prompt | None = None) -> float:
        over = len(answer) - soft
        return 0.0 if over <= 0 else max(-1.0, -over / (hard - soft))

    length.__doc__ = f"0 up to {soft} characters of answer, then down to -1 at {hard} and beyond."
    return length


register_reward("numeric", numeric)
register_reward("format", thought_format)
register_reward("language", language)
register_reward("length", length_penalty(LENGTH_SOFT, LENGTH_HARD))
