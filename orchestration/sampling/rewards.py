"""Reward functions: plain Python callables that score an answer, by name.

    score = REWARDS["numeric"](answer, reference, prompt)      # 1.0 or 0.0

A reward function takes the answer's text, the record's reference answer (None when it had none)
and the Prompt (orchestration/sampling/prompts.py), and returns a float. A verifier is one that
returns 1.0 for a correct answer and 0.0 otherwise; rejection sampling by a verifier keeps only
answers it scores 1.0. `register_reward` adds a user's function under a name a command or recipe
can then give.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from hanyeong.errors import ConfigError
from orchestration.eval.generative import extract_number, same_number

Reward = Callable[[str, "str | None", object], float]
BOXED = re.compile(r"\\boxed\{([^{}]*)\}")

REWARDS: dict[str, Reward] = {}


def register_reward(name: str, function: Reward) -> None:
    """Make `function` the reward called `name` (replacing one of that name)."""
    REWARDS[name] = function


def get_reward(name: str) -> Reward:
    """The reward function called `name`; ConfigError listing the known ones."""
    try:
        return REWARDS[name]
    except KeyError:
        raise ConfigError(f"reward must be one of {', '.join(sorted(REWARDS))}, got {name!r}") from None


def final_number(text: str) -> str | None:
    """The number an answer ends on: the last \\boxed{...} when there is one, else after '#### ',
    else its last number (commas, '$' and a trailing '.' dropped: GSM8K's eval rules)."""
    boxed = BOXED.findall(text)
    if boxed:
        return extract_number(boxed[-1])
    return extract_number(text)


def numeric(answer: str, reference: str | None, prompt: object = None) -> float:
    """1.0 when the answer's final number equals the reference's (GSM8K '#### 72' or \\boxed{72})."""
    if reference is None:
        return 0.0
    return float(same_number(final_number(answer), final_number(reference) or reference))


register_reward("numeric", numeric)
