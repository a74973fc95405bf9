"""Chat data for SFT: conversations -> the EXAONE 3.5 chat template -> input_ids + loss_mask shards.

A record becomes a conversation from one of three layouts (field names configurable, `ChatConfig`):
`messages: [{role, content}, ...]` (also ShareGPT's `conversations: [{from, value}]`), or
instruction / input / output, or question / answer columns. It is rendered exactly as
tokenizer/specials.py's CHAT_TEMPLATE renders it (a test holds the two byte-equal), tokenized, and
written in the dataset contract (orchestration/data/shards.py) plus one column:

    loss_mask  list<int8>  1 on the tokens of assistant content and the [|endofturn|] that closes
                           each assistant turn; 0 on BOS, EOS, system and user turns, role tokens
                           and the newlines after a turn.

Reasoning (EXAONE Deep) stays inside assistant content, `<thought>...</thought>` included, so it is
trained on. orchestration/data/chat_dataset.py writes the dataset (`prepare_chat`); the loader
(orchestration/data/loader.py) carries the column into `Batch.loss_mask`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from hanyeong.errors import ConfigError
from tokenizer.specials import NAMED_SPECIALS

ROLES = ("system", "user", "assistant")
# Other datasets' role names (ShareGPT: human/gpt); anything else is dropped with its name.
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}
# [PAD] [BOS] [EOS] [UNK] and the four turn tokens: content holding one would forge a turn.
STRUCTURAL = NAMED_SPECIALS[:8]
SYSTEM, ENDOFTURN = "[|system|]", "[|endofturn|]"


@dataclass(frozen=True)
class ChatConfig:
    """`[run.datasets.chat]`: which record fields hold a conversation, and how shards are cut."""

    messages_fields: tuple[str, ...] = ("messages", "conversations")
    """Fields holding a list of turns; the first present is used."""
    role_fields: tuple[str, ...] = ("role", "from")
    """Fields of a turn naming its role: system, user, assistant (or human / gpt / bot / model)."""
    content_fields: tuple[str, ...] = ("content", "value")
    """Fields of a turn holding its text."""
    instruction_fields: tuple[str, ...] = ("instruction",)
    """Instruction records: the user's request."""
    input_fields: tuple[str, ...] = ("input",)
    """Instruction records: optional context, appended to the instruction after a blank line."""
    output_fields: tuple[str, ...] = ("output", "response")
    """Instruction records: the assistant's answer."""
    question_fields: tuple[str, ...] = ("Q", "question")
    """Question/answer records (e.g. CSV columns Q, A): the user's turn."""
    answer_fields: tuple[str, ...] = ("A", "answer")
    """Question/answer records: the assistant's turn."""
    system_fields: tuple[str, ...] = ("system",)
    """A record-level system prompt, used when the turns have no system turn."""
    system_prompt: str = ""
    """System prompt for conversations that have none; "" keeps the template's empty system turn."""
    dedup: bool = True
    """Drop conversations whose rendering repeats an earlier one exactly."""
    documents_per_shard: int = 50_000
    """Conversations per Parquet shard."""
    compression: str = "zstd"
    """Parquet compression: zstd, snappy, gzip or none."""

    def __post_init__(self) -> None:
        if self.documents_per_shard < 1:
            raise ConfigError(
                f"documents_per_shard must be positive, got {self.documents_per_shard}"
            )
        if self.compression not in ("zstd", "snappy", "gzip", "none"):
            raise ConfigError(
                f"compression must be zstd, snappy, gzip or none, got {self.compression!r}"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "chat") -> ChatConfig:
        from orchestration.core.config import build

        return build(cls, data, where)

    @property
    def fields(self) -> tuple[str, ...]:
        """Every top-level field a record may use (CSV and Parquet readers need one of them)."""
        return (*self.messages_fields, *self.instruction_fields, *self.input_fields, *self.output_fields,
                *self.question_fields, *self.answer_fields, *self.system_fields)  # fmt: skip


# ---- records -> conversations -------------------------------------------------------------------


def _first(record: dict, names: tuple[str, ...]):
    return next((record[n] for n in names if record.get(n) is not None), None)


def conversation(record: object, config: ChatConfig) -> tuple[list[dict] | None, str | None]:
    """A record as `[{"role", "content"}, ...]`, or None and the reason it is not a conversation
    to train on."""
    messages, reason = turns_of(record, config)
    reason = reason or check_conversation(messages)
    return (None, reason) if reason else (messages, None)


def turns_of(record: object, config: ChatConfig) -> tuple[list[dict] | None, str | None]:
    """A record's turns, whatever their content (a prompt may lack the answer), or None and why."""
    if not isinstance(record, dict):
        return None, "not a record"
    turns = _first(record, config.messages_fields)
    if turns is not None:
        messages, reason = _turns(turns, config)
        if messages is None:
            return None, reason
    elif _first(record, config.instruction_fields) is not None:
        request, context = (
            _first(record, config.instruction_fields),
            _first(record, config.input_fields),
        )
        if isinstance(context, str) and context.strip():
            request = f"{request}\n\n{context}" if isinstance(request, str) else request
        messages = [{"role": "user", "content": request},
                    {"role": "assistant", "content": _first(record, config.output_fields)}]  # fmt: skip
    elif _first(record, config.question_fields) is not None:
        messages = [{"role": "user", "content": _first(record, config.question_fields)},
                    {"role": "assistant", "content": _first(record, config.answer_fields)}]  # fmt: skip
    else:
        return None, "no conversation fields"
    system = _first(record, config.system_fields)
    system = system if isinstance(system, str) and system else config.system_prompt
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return messages, None


def _turns(turns: object, config: ChatConfig) -> tuple[list[dict] | None, str | None]:
    if not isinstance(turns, list) or not turns:
        return None, "turns are not a non-empty list"
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            return None, "a turn is not a record"
        role = _first(turn, config.role_fields)
        role = ROLE_ALIASES.get(str(role).lower(), str(role).lower())
        if role not in ROLES:
            return None, f"role {_first(turn, config.role_fields)!r} not supported"
        messages.append({"role": role, "content": _first(turn, config.content_fields)})
    return messages, None


def check_conversation(messages: list[dict]) -> str | None:
    """Why the conversation cannot be trained on, or None."""
    for i, m in enumerate(messages):
        if not isinstance(m["content"], str):
            return "content is not text"
        if m["role"] == "system" and i > 0:
            return "system turn not first"
        if any(token in m["content"] for token in STRUCTURAL):
            return "content holds a special token"
    if not any(m["role"] == "assistant" and m["content"] for m in messages):
        return "no assistant text"
    return None


# ---- rendering: the template, in Python --------------------------------------------------------


def segments(
    messages: list[dict], add_generation_prompt: bool = False
) -> list[tuple[str, bool, bool]]:
    """The rendering as (text, is_special_token, trained) pieces; no two text pieces adjacent.

    CHAT_TEMPLATE: an empty system turn unless the first turn is one; `[|role|]content`, then a
    newline after a user turn, `[|endofturn|]` and a newline after any other.
    """
    pieces: list[tuple[str, bool, bool]] = []

    def add(text: str, special: bool = False, trained: bool = False) -> None:
        if pieces and not special and not pieces[-1][1] and text:
            if pieces[-1][2] != trained:
                raise AssertionError("trained and untrained text would be tokenized together")
            pieces[-1] = (pieces[-1][0] + text, False, trained)
        elif special or text:
            pieces.append((text, special, trained))

    if messages and messages[0]["role"] != "system":
        add(SYSTEM, True), add(ENDOFTURN, True), add("\n")
    for m in messages:
        assistant = m["role"] == "assistant"
        add(f"[|{m['role']}|]", True)
        add(m["content"], trained=assistant)
        if m["role"] == "user":
            add("\n")
        else:
            add(ENDOFTURN, True, trained=assistant), add("\n")
    if add_generation_prompt:
        add("[|assistant|]", True)
    return pieces


def render(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as CHAT_TEMPLATE renders it (byte-equal; tests/orchestration/data/test_chat.py)."""
    return "".join(text for text, _, _ in segments(messages, add_generation_prompt))


def encode(tokenizer, conversations: list[list[dict]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(input_ids int32 [BOS ... EOS], loss_mask int8) per conversation.

    Each text piece between special tokens is encoded on its own, which is what the tokenizer does
    with the whole rendering (added tokens split the text before pre-tokenization), so the ids equal
    tokenizer.encode(render(...)) with BOS and EOS around.
    """
    hf = tokenizer.hf
    bos, eos = hf.token_to_id("[BOS]"), hf.token_to_id("[EOS]")
    rendered = [segments(messages) for messages in conversations]
    texts = [text for pieces in rendered for text, special, _ in pieces if not special]
    encoded = iter(tokenizer.encode_batch(texts))
    out = []
    for pieces in rendered:
        ids, mask = [bos], [0]
        for text, special, trained in pieces:
            piece = [hf.token_to_id(text)] if special else next(encoded)
            ids += piece
            mask += [int(trained)] * len(piece)
        out.append((np.array(ids + [eos], np.int32), np.array(mask + [0], np.int8)))
    return out
