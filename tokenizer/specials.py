"""The fixed block of special tokens at the start of the vocabulary, and the chat templates."""

from __future__ import annotations

# EXAONE's names. Ids 0..len-1 in this order, so every hanyeong vocabulary agrees on them.
NAMED_SPECIALS = (
    "[PAD]",
    "[BOS]",
    "[EOS]",
    "[UNK]",
    "[|system|]",
    "[|user|]",
    "[|assistant|]",
    "[|endofturn|]",
    "<thought>",
    "</thought>",
)
# The block is this large whatever is named: later tokens (tools, images) take a reserved slot,
# so adding them never changes the vocabulary size or any other token's id (Llama 3 reserves 256).
SPECIAL_BLOCK = 256

# EXAONE 3.5's template: a default empty system turn, user turns end with a newline, every other
# turn with [|endofturn|]. Under it, reasoning (<thought>...</thought>) is plain assistant content.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}{{ '[|system|][|endofturn|]\\n' }}{% endif %}"
    "{{ '[|' + message['role'] + '|]' + message['content'] }}"
    "{% if message['role'] == 'user' %}{{ '\\n' }}{% else %}{{ '[|endofturn|]\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
)

# EXAONE Deep's template, verbatim: the llama.cpp `--chat-template` of LG's README (github.com/
# LG-AI-EXAONE/EXAONE-Deep, "Run Locally", set "to handle reasoning steps properly"; the README
# says the shipped tokenizer does the same). Every turn's text before `</thought>` is dropped, and
# the newlines after it, so no earlier reasoning stays in the history. User turns end bare, others
# with [|endofturn|]; turns are joined by a newline, none after the last. The generation prompt
# opens the thought: '\n[|assistant|]<thought>\n'. It drops the last assistant turn's thought as
# well: it renders prompts and history, and training on a trace keeps that turn whole
# (orchestration/data/chat.py `encode(..., reasoning=True)`).
REASONING_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}{{ '[|system|][|endofturn|]\\n' }}{% endif %}"
    "{% set content = message['content'] %}"
    "{% if '</thought>' in content %}"
    "{% set content = content.split('</thought>')[-1].lstrip('\\n') %}"
    "{% endif %}"
    "{{ '[|' + message['role'] + '|]' + content }}"
    "{% if not message['role'] == 'user' %}{{ '[|endofturn|]' }}{% endif %}"
    "{% if not loop.last %}{{ '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n[|assistant|]<thought>\\n' }}{% endif %}"
)


def special_tokens(block: int = SPECIAL_BLOCK) -> list[str]:
    """The named specials followed by reserved slots, `block` tokens in all."""
    if block < len(NAMED_SPECIALS):
        raise ValueError(f"the special block must hold at least {len(NAMED_SPECIALS)} tokens")
    reserved = [f"[|reserved_{i}|]" for i in range(block - len(NAMED_SPECIALS))]
    return [*NAMED_SPECIALS, *reserved]


def tokenizer_config(model_max_length: int = 32_768) -> dict:
    """The `tokenizer_config.json` that transformers' PreTrainedTokenizerFast reads."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "[BOS]",
        "eos_token": "[EOS]",
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "additional_special_tokens": list(NAMED_SPECIALS[4:]),
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": model_max_length,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
