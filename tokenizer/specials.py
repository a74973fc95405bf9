"""The fixed block of special tokens at the start of the vocabulary, and the chat template."""

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
# turn with [|endofturn|]. Reasoning (EXAONE Deep) puts <thought>...</thought> in assistant content.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}{{ '[|system|][|endofturn|]\\n' }}{% endif %}"
    "{{ '[|' + message['role'] + '|]' + message['content'] }}"
    "{% if message['role'] == 'user' %}{{ '\\n' }}{% else %}{{ '[|endofturn|]\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
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
