"""Reasoning traces (EXAONE Deep): the rendering is REASONING_TEMPLATE's, byte for byte, as Jinja and
transformers' apply_chat_template render it; a trace is trained as that history plus its last
assistant turn whole, whose thought, answer and [|endofturn|] are the only trained tokens; the trained
text continues the template's generation prompt; the default (EXAONE 3.5) mode is untouched."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestration.data.chat import ChatConfig, conversation, drop_thought, encode, render
from orchestration.sampling.prompts import Prompt, prompt_ids
from tokenizer.specials import REASONING_TEMPLATE

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30).filter(
    lambda t: "[" not in t and "thought>" not in t
)
FAST = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@st.composite
def contents(draw) -> str:
    """Plain text, or a trace: <thought>, reasoning, </thought>, newlines, the answer."""
    if not draw(st.booleans()):
        return draw(TEXT)
    gap = draw(st.sampled_from(["", "\n", "\n\n"]))
    return f"<thought>\n{draw(TEXT)}\n</thought>{gap}{draw(TEXT)}"


@st.composite
def conversations(draw) -> list[dict]:
    turns = draw(st.lists(st.sampled_from(["user", "assistant"]), min_size=1, max_size=6))
    messages = [{"role": r, "content": draw(contents())} for r in turns]
    if draw(st.booleans()):
        messages.insert(0, {"role": "system", "content": draw(contents())})
    return messages


def jinja_render(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The template as transformers compiles it (apply_chat_template's environment)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(REASONING_TEMPLATE).render(
        messages=messages, add_generation_prompt=add_generation_prompt
    )


# EXAONE Deep's usage guideline: reasoning is enclosed by <thought>\n...\n</thought>.
TRACE = "<thought>\n2와 2를 더하면 4다.\n</thought>\n\n답은 **4**입니다."
HISTORY = [
    {"role": "user", "content": "2+2는?"},
    {"role": "assistant", "content": "<thought>\n간단한 덧셈.\n</thought>\n\n4입니다."},
    {"role": "user", "content": "Then 4+4? Please reason step by step."},
]
CONVERSATIONS = [
    HISTORY,  # earlier thought in the history, a user turn last: a prompt
    [
        {"role": "system", "content": "간결하게 답하세요."},
        *HISTORY,
        {"role": "assistant", "content": "<thought>\n4+4=8\n</thought>\n8"},
    ],
    [
        {"role": "user", "content": "안녕?"},
        {"role": "assistant", "content": "안녕하세요!"},
        {"role": "user", "content": "<thought>forged</thought>\n\n사용자의 생각?"},
    ],
    [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "a</thought>b</thought>\nc"},
    ],
]


@FAST
@given(messages=conversations(), prompt=st.booleans())
def test_reasoning_rendering_equals_the_jinja_template(messages, prompt):
    assert render(messages, prompt, reasoning=True) == jinja_render(messages, prompt)


def test_reasoning_rendering_equals_transformers_apply_chat_template(small_tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(small_tokenizer_dir))
    for messages in CONVERSATIONS:
        for prompt in (False, True):
            text = hf.apply_chat_template(messages, chat_template=REASONING_TEMPLATE,
                                          tokenize=False, add_generation_prompt=prompt)  # fmt: skip
            assert render(messages, prompt, reasoning=True) == text


def test_the_template_drops_every_thought_and_opens_one():
    text = render([*HISTORY, {"role": "assistant", "content": TRACE}], reasoning=True)
    assert text == (
        "[|system|][|endofturn|]\n[|user|]2+2는?\n[|assistant|]4입니다.[|endofturn|]\n"
        "[|user|]Then 4+4? Please reason step by step.\n[|assistant|]답은 **4**입니다.[|endofturn|]"
    )
    assert render(HISTORY, True, reasoning=True).endswith("step by step.\n[|assistant|]<thought>\n")


@pytest.mark.parametrize("text, answer", [
    ("<thought>\nreason\n</thought>\n\nanswer", "answer"),
    ("no thought here\n", "no thought here\n"),
    ("a</thought>b</thought>\n\n c\n", " c\n"),
    ("<thought>unclosed", "<thought>unclosed"),
])  # fmt: skip
def test_drop_thought_keeps_what_follows_the_last_closing_tag(text, answer):
    assert drop_thought(text) == answer


def test_a_trace_is_the_history_and_its_last_turn_whole(small_tokenizer):
    messages = [{"role": "system", "content": "간결하게."}, *HISTORY,
                {"role": "assistant", "content": TRACE}]  # fmt: skip
    [(ids, mask)] = encode(small_tokenizer, [messages], reasoning=True)
    text = render(messages, reasoning=True, keep_last_thought=True)
    bos, eos, thought = (small_tokenizer.hf.token_to_id(t) for t in ("[BOS]", "[EOS]", "<thought>"))
    assert ids.tolist() == [bos, *small_tokenizer.encode(text), eos]
    assert small_tokenizer.decode(ids[mask == 1].tolist()) == TRACE + "[|endofturn|]"
    assert ids.tolist().count(thought) == 1  # the earlier turn's thought is gone
    assert (mask[: ids.tolist().index(thought)] == 0).all()  # the earlier answer is not trained
    # the trained text continues EXAONE Deep's generation prompt for the history
    prompt = jinja_render(messages[:-1], add_generation_prompt=True)
    assert text == prompt + TRACE.removeprefix("<thought>\n") + "[|endofturn|]"
    [opened] = prompt_ids(small_tokenizer, [Prompt(0, tuple(messages[:-1]), None)], reasoning=True)
    assert ids.tolist()[: len(opened)] == opened
    assert mask[len(opened) - 2 : len(opened)].tolist() == [1, 1]  # <thought> and its newline


@FAST
@given(messages=conversations(), last=contents())
def test_only_the_last_assistant_turn_is_trained(small_tokenizer, messages, last):
    messages.append({"role": "assistant", "content": last})
    [(ids, mask)] = encode(small_tokenizer, [messages], reasoning=True)
    bos, eos = (small_tokenizer.hf.token_to_id(t) for t in ("[BOS]", "[EOS]"))
    text = render(messages, reasoning=True, keep_last_thought=True)
    assert ids.tolist() == [bos, *small_tokenizer.encode(text), eos]
    assert mask[0] == mask[-1] == 0 and len(ids) == len(mask)
    assert small_tokenizer.decode(ids[mask == 1].tolist()) == last + "[|endofturn|]"
    history = render(messages[:-1], reasoning=True)  # at least one turn: the template's own
    assert text == history + "\n[|assistant|]" + last + "[|endofturn|]"


def test_the_default_mode_is_exaone_3_5s(small_tokenizer):
    messages = [*HISTORY, {"role": "assistant", "content": TRACE}]
    assert render(messages).count("<thought>") == 2  # every thought stays, in every assistant turn
    [(ids, mask)] = encode(small_tokenizer, [messages])
    trained = small_tokenizer.decode(ids[mask == 1].tolist())
    assert trained == HISTORY[1]["content"] + "[|endofturn|]" + TRACE + "[|endofturn|]"
    [plain] = prompt_ids(small_tokenizer, [Prompt(0, tuple(HISTORY), None)])
    assert plain == [small_tokenizer.hf.token_to_id("[BOS]"),
                     *small_tokenizer.encode(render(HISTORY, add_generation_prompt=True))]  # fmt: skip


def test_a_trace_needs_a_last_answer():
    record = {"messages": [*HISTORY[:2], {"role": "user", "content": "?"},
                           {"role": "assistant", "content": ""}]}  # fmt: skip
    assert conversation(record, ChatConfig())[1] is None
    assert conversation(record, ChatConfig(reasoning=True)) == (None, "last assistant turn empty")


def test_the_chat_config_carries_reasoning():
    assert "reasoning" not in ChatConfig().to_dict()  # prepared datasets keep their inputs hash
    config = ChatConfig.from_dict({"reasoning": True})
    assert config.reasoning and ChatConfig.from_dict(config.to_dict()) == config
    assert ChatConfig.from_dict(ChatConfig().to_dict()) == ChatConfig()
