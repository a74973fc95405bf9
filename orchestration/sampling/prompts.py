"""Prompt datasets for generation: records -> prompts (chat or plain) -> token ids.

A record is read by the corpus reader the tokenizer and data preparation use (jsonl, json, csv,
tsv, parquet, txt, .gz), and becomes:

- a plain prompt: a `prompt` field, or a line of a .txt file; completed as text after [BOS] (with
  `chat=True`: asked as a user turn of the chat template);
- a chat prompt: any conversation layout chat data accepts (orchestration/data/chat.py: `messages`
  / `conversations` turns, instruction / input / output, question / answer). The turns up to the
  last user turn are the prompt, rendered with the assistant turn opened; an assistant turn after
  it is kept as the record's `reference` answer (a verifier's truth, e.g. GSM8K's `#### 72`).

A prompt's `index` is its position among the usable records of the files, in the order given: with
the job's seed it keys the sampling, so it must not depend on how the work is cut. A record that is
no prompt is skipped and counted by its reason.
"""

from __future__ import annotations

import json
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from hanyeong.errors import DataError
from orchestration.data.chat import ChatConfig, check_conversation, render, turns_of

PROMPT_FIELDS = ("prompt",)


@dataclass(frozen=True)
class Prompt:
    """One prompt of a dataset."""

    index: int
    """Position among the dataset's prompts (with the seed, the key of its samples)."""
    messages: tuple[dict, ...] | None
    """Chat prompts: the turns, the last a user turn; None for a plain prompt."""
    text: str | None
    """Plain prompts: the text completed after [BOS]; None for a chat prompt."""
    reference: str | None = None
    """The record's own answer, when it had one after the prompt."""

    def shown(self) -> str:
        """What the output's `prompt` column holds: the text, or the turns as JSON."""
        return self.text if self.text is not None else json.dumps(list(self.messages), ensure_ascii=False)


def prompt_of(record: object, chat: bool, config: ChatConfig) -> tuple[tuple | None, str | None]:
    """(messages, text, reference) of a record, or None and why it is no prompt."""
    if isinstance(record, str) or (isinstance(record, dict) and isinstance(record.get("prompt"), str)):
        text = record if isinstance(record, str) else record["prompt"]
        if not text.strip():
            return None, "empty prompt"
        return ((({"role": "user", "content": text},), None, None) if chat else (None, text, None)), None
    messages, reason = turns_of(record, config)
    if messages is None:
        return None, reason
    messages = [m for m in messages if not (m["role"] == "assistant" and m["content"] in (None, ""))]
    reason = check_conversation([*messages, {"role": "assistant", "content": "-"}])  # an answer is not needed
    if reason:
        return None, reason
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last_user is None:
        return None, "no user turn"
    after = [m["content"] for m in messages[last_user + 1 :] if m["role"] == "assistant" and m["content"]]
    return (tuple(messages[: last_user + 1]), None, after[0] if after else None), None


def read_prompts(paths: list[str | Path], chat: bool = False, config: ChatConfig | None = None,
                 limit: int | None = None) -> tuple[list[Prompt], Counter]:  # fmt: skip
    """The prompts of the files, in order (the first `limit`), and the skipped records by reason."""
    from tokenizer.corpus import READERS, FileReport, TextFields, _FileSkipped, detect_format, expand_paths

    config = config or ChatConfig()
    fields = TextFields(tuple((name,) for name in (*PROMPT_FIELDS, *config.fields)))
    prompts, skipped = [], Counter()
    for path in expand_paths(paths):
        fmt, gzipped = detect_format(path)
        report = FileReport(path=str(path), format=fmt)
        try:
            if fmt not in READERS:
                raise _FileSkipped(f"unsupported format {fmt}")
            for record in READERS[fmt](path, gzipped, fields, report):
                if limit is not None and len(prompts) >= limit:
                    return prompts, skipped
                parsed, reason = prompt_of(record, chat, config)
                if parsed is None:
                    skipped[reason] += 1
                    continue
                messages, text, reference = parsed
                prompts.append(Prompt(len(prompts), messages, text, reference))
        except _FileSkipped as err:
            raise DataError(f"{path}: {err}") from None
        except (OSError, EOFError, zlib.error, UnicodeDecodeError) as err:
            raise DataError(f"{path}: unreadable ({type(err).__name__}: {err})") from None
    if not prompts:
        reasons = ", ".join(f"{n} {r}" for r, n in skipped.most_common(3)) or "no records"
        raise DataError(f"{', '.join(map(str, paths))}: no prompts ({reasons})")
    return prompts, skipped


def prompt_ids(tokenizer, prompts: list[Prompt], reasoning: bool = False) -> list[list[int]]:
    """[BOS] + the rendering (chat: the assistant turn opened) of each prompt; with `reasoning`, a
    chat prompt is REASONING_TEMPLATE's, opened with `[|assistant|]<thought>` and a newline (a plain
    prompt stays plain text)."""
    bos = tokenizer.hf.token_to_id("[BOS]")
    texts = [
        p.text if p.text is not None
        else render(list(p.messages), add_generation_prompt=True, reasoning=reasoning)
        for p in prompts
    ]  # fmt: skip
    return [[bos, *ids] for ids in tokenizer.encode_batch(texts)]
