"""Chat data for SFT: conversations -> the EXAONE chat template -> input_ids + loss_mask shards.

A record becomes a conversation from one of three layouts (field names configurable, `ChatConfig`):
`messages: [{role, content}, ...]` (also ShareGPT's `conversations: [{from, value}]`), or
instruction / input / output, or question / answer columns. It is rendered exactly as
tokenizer/specials.py's CHAT_TEMPLATE renders it (a test holds the two byte-equal), tokenized, and
written in the dataset contract (orchestration/data/shards.py) plus one column:

    loss_mask  list<int8>  1 on the tokens of assistant content and the [|endofturn|] that closes
                           each assistant turn (reasoning: the last one only); 0 on BOS, EOS,
                           system and user turns, role tokens and the newlines after a turn.

By default reasoning stays inside assistant content, `<thought>...</thought>` included, and every
assistant turn is trained on. With `reasoning` (ChatConfig.reasoning, `segments`/`render`/`encode`)
a conversation is a trace rendered as EXAONE Deep's REASONING_TEMPLATE renders it: every turn but
the last assistant turn loses its thought, as the template drops thoughts from history; the last
assistant turn keeps `<thought>...</thought>` and is the only one trained (an earlier answer without
its thought is not what the model says after `[|assistant|]<thought>`). The trained text continues
the template's generation prompt, `[|assistant|]<thought>\n`, when the thought opens that way.

orchestration/data/chat_dataset.py writes the dataset (`prepare_chat`); the loader
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
THOUGHT, END_THOUGHT = "<thought>", "</thought>"


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
    reasoning: bool = False
    """Reasoning traces (EXAONE Deep): earlier turns lose their <thought>...</thought> as
    REASONING_TEMPLATE drops them; the last assistant turn keeps it and is the only one trained."""
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
        out = asdict(self)
        if not self.reasoning:  # left out when off: datasets prepared before it keep their hash
            del out["reasoning"]
        return out

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
    reason = reason or check_conversation(messages, config.reasoning)
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


def check_conversation(messages: list[dict], reasoning: bool = False) -> str | None:
    """Why the conversation cannot be trained on (with `reasoning`, as a trace), or None."""
    for i, m in enumerate(messages):
        if not isinstance(m["content"], str):
            return "content is not text"
        if m["role"] == "system" and i > 0:
            return "system turn not first"
        if any(token in m["content"] for token in STRUCTURAL):
            return "content holds a special token"
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    if not any(answers):
        return "no assistant text"
    if reasoning and not answers[-1]:
        return "last assistant turn empty"  # the only turn a trace trains
    return None


# ---- rendering: the templates, in Python -------------------------------------------------------


def drop_thought(text: str) -> str:
    """`text` without its reasoning: what follows the last `</thought>`, leading newlines removed
    (REASONING_TEMPLATE's rule, applied to every turn)."""
    return text.split(END_THOUGHT)[-1].lstrip("\n") if END_THOUGHT in text else text


def segments(
    messages: list[dict], add_generation_prompt: bool = False, *, reasoning: bool = False,
    keep_last_thought: bool = False,
) -> list[tuple[str, bool, bool]]:  # fmt: skip
    """The rendering as (text, is_special_token, trained) pieces; no two text pieces adjacent.

    CHAT_TEMPLATE: an empty system turn unless the first turn is one; `[|role|]content`, then a
    newline after a user turn, `[|endofturn|]` and a newline after any other. Every assistant turn
    is trained.

    `reasoning`, REASONING_TEMPLATE: the same empty system turn; `[|role|]` and the content without
    its thought (`drop_thought`), `[|endofturn|]` after any turn but a user's, a newline between
    turns; the generation prompt is a newline, `[|assistant|]<thought>` and a newline. Only the last
    assistant turn is trained; `keep_last_thought` keeps its content whole (the trace trained on).
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
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    for i, m in enumerate(messages):
        trained = m["role"] == "assistant" and (not reasoning or i == last)
        content = m["content"]
        if reasoning and not (keep_last_thought and i == last):
            content = drop_thought(content)
        add(f"[|{m['role']}|]", True)
        add(content, trained=trained)
        if m["role"] != "user":
            add(ENDOFTURN, True, trained=trained)
        if not reasoning or i < len(messages) - 1:
            add("\n")
    if add_generation_prompt and reasoning:
        add("\n"), add("[|assistant|]", True), add(THOUGHT, True), add("\n")
    elif add_generation_prompt:
        add("[|assistant|]", True)
    return pieces


def render(
    messages: list[dict], add_generation_prompt: bool = False, *, reasoning: bool = False,
    keep_last_thought: bool = False,
) -> str:  # fmt: skip
    """The conversation as CHAT_TEMPLATE renders it, or with `reasoning` REASONING_TEMPLATE
    (byte-equal unless `keep_last_thought`; tests/orchestration/data/test_chat.py and
    test_reasoning_template.py)."""
    pieces = segments(messages, add_generation_prompt, reasoning=reasoning,
                      keep_last_thought=keep_last_thought)  # fmt: skip
    return "".join(text for text, _, _ in pieces)


def encode(
    tokenizer, conversations: list[list[dict]], *, reasoning: bool = False
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(input_ids int32 [BOS ... EOS], loss_mask int8) per conversation; with `reasoning`, the
    trace form: REASONING_TEMPLATE's history and the last assistant turn whole, the one trained.

    Each text piece between special tokens is encoded on its own, which is what the tokenizer does
    with the whole rendering (added tokens split the text before pre-tokenization), so the ids equal
    tokenizer.encode(render(...)) with BOS and EOS around.
    """
    hf = tokenizer.hf
    bos, eos = hf.token_to_id("[BOS]"), hf.token_to_id("[EOS]")
    rendered = [segments(messages, reasoning=reasoning, keep_last_thought=reasoning)
                for messages in conversations]  # fmt: skip
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


def template_of(config: ChatConfig) -> str:
    """The jinja template data prepared with `config` follows: EXAONE Deep's with reasoning, else
    EXAONE 3.5's (a prepared dataset's manifest records it)."""
    from tokenizer.specials import CHAT_TEMPLATE, REASONING_TEMPLATE

    return REASONING_TEMPLATE if config.reasoning else CHAT_TEMPLATE
