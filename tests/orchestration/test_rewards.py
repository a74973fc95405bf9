"""The reward functions of orchestration/sampling/rewards.py: examples of each, and purity."""

from __future__ import annotations

import copy
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hanyeong.errors import ConfigError
from orchestration.sampling.prompts import Prompt
from orchestration.sampling.rewards import (
    REWARDS,
    get_reward,
    language,
    length_penalty,
    numeric,
    prompt_text,
    register_reward,
    thought_format,
)

# GSM8K's first training answer, as the dataset writes it.
GSM8K = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n"
    "#### 72"
)
KOREAN_QUESTION = "나탈리아는 4월에 48명의 친구에게 클립을 팔았습니다. 4월과 5월에 모두 몇 개를 팔았나요?"
ENGLISH_QUESTION = "Natalia sold clips to 48 of her friends in April. How many did she sell in all?"


def plain(text: str) -> Prompt:
    return Prompt(index=0, messages=None, text=text)


def chat(*turns: str) -> Prompt:
    """A chat prompt alternating user and assistant turns, the last a user turn."""
    roles = ["user", "assistant"] * len(turns)
    return Prompt(index=0, messages=tuple({"role": r, "content": c} for r, c in zip(roles, turns)), text=None)


# ---- numeric --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    ["#### 72", "The answer is 72.", "72 apples", "72원", "72 dollars", "$72", "72.0", "\\boxed{72}",
     "so \\boxed{72} clips", "#### 5\nwait, no.\n#### 72", "\\boxed{7} ... \\boxed{72}", "#### $72.00",
     "<thought>48/2 = 24, 48 + 24 = 72</thought>\n정답은 72개입니다."],
)  # fmt: skip
def test_numeric_accepts_72_however_it_is_written(answer):
    assert numeric(answer, GSM8K, None) == 1.0
    assert numeric(answer, "72", None) == 1.0
    assert numeric(answer, "\\boxed{72}", None) == 1.0


@pytest.mark.parametrize(
    ("answer", "reference"),
    [("#### 1,234,567", "#### 1234567"), ("It costs $1,000.", "1000"), ("#### -5", "-5"),
     ("The temperature fell to -5 degrees", "#### -5"), ("0.5", "#### .5"), ("#### 2.50", "2.5"),
     ("\\boxed{\\frac{3}{4}}", "0.75"), ("#### 3/4", "\\boxed{\\dfrac{3}{4}}"), ("\\boxed{-\\frac{1}{2}}", "-0.5"),
     ("\\boxed{1{,}000}", "1000"), ("\\boxed{72\\text{ apples}}", "72")],
)  # fmt: skip
def test_numeric_reads_commas_negatives_decimals_and_fractions(answer, reference):
    assert numeric(answer, reference, None) == 1.0


@pytest.mark.parametrize(
    "answer",
    ["#### 71", "72 then 73", "", "no idea", "\\boxed{\\frac{1}{72}}", "#### 72\n#### 73",
     "<thought>The answer is 72</thought> 73", "<thought>The answer is 72</thought>", "<thought>so it is 72",
     "<thought>a</thought> 72 <thought>maybe 73"],
)  # fmt: skip
def test_numeric_refuses_wrong_missing_and_thought_only_answers(answer):
    assert numeric(answer, GSM8K, None) == 0.0


def test_numeric_grades_only_the_text_after_the_last_thought():
    assert numeric("<thought>maybe 70</thought><thought>no, 71</thought> #### 72", GSM8K, None) == 1.0
    assert numeric("<thought>72</thought>71", GSM8K, None) == 0.0


def test_numeric_without_a_usable_reference_scores_zero():
    assert numeric("72", None, None) == 0.0
    assert numeric("72", "no number here", None) == 0.0
    assert numeric("72", "<thought>72", None) == 0.0  # a reference whose thought never closes


# ---- format ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer", ["<thought>48/2 = 24</thought>72", "\n  <thought>생각</thought>\n\n정답: 72", "<thought></thought> 72"]
)
def test_format_accepts_one_leading_thought_then_an_answer(answer):
    assert thought_format(answer, None, None) == 1.0


@pytest.mark.parametrize(
    "answer",
    ["72", "<thought>a</thought><thought>b</thought>72", "<thought>a</thought>", "<thought>a</thought> \n\t",
     "Sure. <thought>a</thought>72", "<thought>a then 72", "a</thought>72", "<thought>a</thought>72</thought>",
     "<thought>a</thought>72<thought>", "<thought><thought>a</thought>72", ""],
)  # fmt: skip
def test_format_refuses_anything_else(answer):
    assert thought_format(answer, None, None) == 0.0


# ---- language -------------------------------------------------------------------------------------


def test_language_wants_korean_answers_to_korean_questions():
    for prompt in (plain(KOREAN_QUESTION), chat(KOREAN_QUESTION)):
        assert language("모두 72개를 팔았습니다.", None, prompt) == 1.0
        assert language("<thought>Let me think in English.</thought>모두 72개입니다.", None, prompt) == 1.0
        assert language("She sold 72 clips in all.", None, prompt) == 0.0
        assert language("<thought>생각해 보면</thought>She sold 72 clips.", None, prompt) == 0.0


def test_language_wants_english_answers_to_english_questions():
    for prompt in (plain(ENGLISH_QUESTION), chat(ENGLISH_QUESTION)):
        assert language("She sold 72 clips in all.", None, prompt) == 1.0
        assert language("모두 72개를 팔았습니다.", None, prompt) == 0.0


def test_language_counts_korean_with_english_terms_as_korean():
    prompt = plain("Python에서 list comprehension을 설명해줘")
    assert language("list comprehension은 리스트를 한 줄로 만드는 문법입니다.", None, prompt) == 1.0
    code = "```python\nsquares = [x * x for x in range(10)]\nprint(squares)\n```\n이렇게 씁니다."
    assert language(code, None, prompt) == 1.0  # code is not English


def test_language_lets_answers_without_letters_pass_and_no_answer_fail():
    korean = chat(KOREAN_QUESTION)
    for answer in ("72", "#### 72", "\\boxed{72}", "<thought>Let me count.</thought> 72", "B", "x = 72"):
        assert language(answer, None, korean) == 1.0, answer
    for answer in ("", "  \n", "<thought>생각 중", "<thought>생각</thought>  "):
        assert language(answer, None, korean) == 0.0, answer
    for prompt in (None, plain("48 + 24 = ?")):  # a question without letters: any language will do
        assert language("모두 72개", None, prompt) == language("72 in all", None, prompt) == 1.0


def test_prompt_text_is_the_last_user_turn():
    assert prompt_text(None) == ""
    assert prompt_text(plain("hello")) == "hello"
    assert prompt_text(chat("first question", "an answer", "두 번째 질문")) == "두 번째 질문"
    system = Prompt(0, ({"role": "system", "content": "Answer in English."}, {"role": "user", "content": "안녕"}), None)
    assert prompt_text(system) == "안녕"
    decoded = "[|system|]You are a helpful assistant.[|endofturn|]\n[|user|]몇 개인가요?\n[|assistant|]"
    assert prompt_text(plain(decoded)) == "몇 개인가요?\n"
    assert language("72개입니다", None, plain(decoded)) == 1.0


# ---- length ---------------------------------------------------------------------------------------


def test_length_is_zero_to_soft_then_falls_to_minus_one_at_hard():
    short = length_penalty(100, 300)
    assert short("x" * 0, None, None) == short("x" * 100, None, None) == 0.0
    assert short("x" * 200, None, None) == pytest.approx(-0.5)
    assert short("x" * 150, None, None) == pytest.approx(-0.25)
    assert short("x" * 300, None, None) == -1.0
    assert short("x" * 10_000, None, None) == -1.0
    assert short("<thought>" + "x" * 91 + "</thought>", None, None) < 0  # the thought counts
    assert get_reward("length")("x" * 2048, None, None) == 0.0
    assert get_reward("length")("x" * 3072, None, None) == pytest.approx(-0.5)
    assert get_reward("length")("x" * 4096, None, None) == -1.0


@pytest.mark.parametrize(("soft", "hard"), [(-1, 10), (10, 10), (20, 10), (1.5, 10), (0, "10"), (True, 10)])
def test_length_penalty_refuses_bad_limits(soft, hard):
    with pytest.raises(ConfigError, match="0 <= soft < hard"):
        length_penalty(soft, hard)


def test_a_registered_reward_is_found_by_name():
    register_reward("length_short", length_penalty(200, 400))
    try:
        assert get_reward("length_short")("x" * 300, None, None) == pytest.approx(-0.5)
    finally:
        del REWARDS["length_short"]


def test_an_unknown_reward_names_the_known_ones():
    with pytest.raises(ConfigError, match=r"format, language, length, numeric.*'nope'"):
        get_reward("nope")


# ---- purity ---------------------------------------------------------------------------------------

FRAGMENTS = ["<thought>", "</thought>", "####", "#### ", "\\boxed{", "}", "{", "72", "-3.5", "1,000", "$", "/",
             "정답은", "개", "ㅋ", "answer", " ", "\n", "```", "[|user|]", "[|assistant|]"]  # fmt: skip
texts = st.lists(st.one_of(st.text(max_size=12), st.sampled_from(FRAGMENTS)), max_size=12).map("".join)
prompts = st.one_of(
    st.none(),
    st.builds(plain, texts),
    st.lists(st.tuples(st.sampled_from(["system", "user", "assistant"]), texts), min_size=1, max_size=3).map(
        lambda turns: Prompt(0, tuple({"role": r, "content": c} for r, c in turns), None)
    ),
)
RANGES = {"numeric": (0.0, 1.0), "format": (0.0, 1.0), "language": (0.0, 1.0), "length": (-1.0, 0.0)}


@settings(max_examples=300, deadline=None)
@given(answer=texts, reference=st.one_of(st.none(), texts), prompt=prompts)
def test_every_reward_is_pure_finite_and_in_range(answer, reference, prompt):
    messages = copy.deepcopy(prompt.messages) if prompt is not None else None
    for name, (low, high) in RANGES.items():
        reward = get_reward(name)
        value = reward(answer, reference, prompt)
        assert isinstance(value, float) and math.isfinite(value) and low <= value <= high, name
        assert reward(answer, reference, prompt) == value, name
        if low == 0.0 and high == 1.0:
            assert value in (0.0, 1.0), name
    if prompt is not None:
        assert prompt.messages == messages


def test_long_runs_of_spaces_are_graded_at_once():
    import time

    spaces = " " * 20_000  # a degenerate sample; these once backtracked for minutes
    start = time.perf_counter()
    for answer in (f"\\boxed{{{spaces}x}}", f"#### -{spaces}x", f"#### 3{spaces}/{spaces}4", f"`{spaces}"):
        for name in RANGES:
            get_reward(name)(answer, GSM8K, None)
    assert time.perf_counter() - start < 1.0
