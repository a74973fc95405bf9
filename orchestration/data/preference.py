"""`prepare_preference`: preference pairs -> a preference dataset; `PairLoader`: its batches.

    DATASET/manifest.json    format "hanyeong-dataset", kind "preference", sources (pairs, tokens,
                             dropped by reason, truncated), inputs_hash / content_hash
    DATASET/shards/<source>/part-00000.parquet
                             id, language, chosen_ids / rejected_ids list<int32> ([BOS] prompt
                             answer [EOS]), chosen_mask / rejected_mask list<int8> (1 on answer tokens)

A record is a prompt (`prompt` / `instruction` / `question` string, or a `messages` list of earlier
turns) with a `chosen` and a `rejected` answer (strings or assistant messages); an HH-RLHF record
is two whole transcripts ("\\n\\nHuman: ... \\n\\nAssistant: ...") that share every turn but the
last; an AlpacaEval annotation is `instruction`, `output_1`, `output_2` and `preference` (1 or 2).
Both answers are rendered with the prompt through the chat template exactly as SFT renders a
conversation (orchestration/data/chat.py), so the prompt tokens of the two are identical. Records
that cannot be a pair are dropped and counted by reason; a pair over `max_tokens` is truncated,
keeping the prompt's END and both answers' START (counted); over `drop_over_tokens` it is dropped.
Decontamination applies as to a text dataset (orchestration/data/decontaminate.py, a prepare.toml's
`[decontaminate]`): a pair goes when its prompt with either answer shares a normalized window with a
benchmark item, counted as `decontaminate:<benchmark>`.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from hanyeong.errors import DataError

HH_TURN = re.compile(r"\n\n(Human|Assistant): ")
STRAY = ("<|endoftext|>", "\u200b", "\ufeff")  # VAIV answers end in <|endoftext|>; some are only \u200b


@dataclass(frozen=True)
class PreferenceConfig:
    """How `format = "preference"` records become pairs."""

    max_tokens: int = 2048
    """Longest pair row (prompt + one answer, with BOS/EOS): longer ones are truncated."""
    drop_over_tokens: int = 16384
    """Pairs whose longer row exceeds this are dropped ('over the length limit'), not truncated."""
    system_prompt: str = ""
    """A system turn put before every prompt that has none ('' = the template's empty one)."""
    documents_per_shard: int = 50_000
    """Pairs per Parquet shard."""

    def __post_init__(self) -> None:
        if not 8 <= self.max_tokens <= self.drop_over_tokens:
            raise DataError("max_tokens must be >= 8 and <= drop_over_tokens")

    def to_dict(self) -> dict:
        return asdict(self)


# ---- records -> (prompt messages, chosen text, rejected text) -----------------------------------


def clean(answer: object) -> object:
    """An answer without stray end-of-text markers and surrounding space (VAIV)."""
    if not isinstance(answer, str):
        return answer
    for stray in STRAY:
        answer = answer.replace(stray, "")
    return answer.strip()


def hh_turns(transcript: str) -> list[dict] | None:
    """An HH-RLHF transcript as messages, or None when it does not parse."""
    parts = HH_TURN.split(transcript)
    if len(parts) < 3 or parts[0].strip():
        return None
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]


def answer_text(answer: object) -> object:
    """A string answer, or the content of the last (assistant) message of a list."""
    if isinstance(answer, dict):
        return answer.get("content")
    if isinstance(answer, list) and answer and isinstance(answer[-1], dict):
        return answer[-1].get("content") if answer[-1].get("role") == "assistant" else None
    return answer


def prompt_messages(record: dict) -> list[dict] | None:
    if isinstance(record.get("messages"), list):
        return [{"role": m.get("role"), "content": m.get("content")} for m in record["messages"]
                if isinstance(m, dict)]  # fmt: skip
    for name in ("prompt", "instruction", "question"):
        if isinstance(record.get(name), str):
            return [{"role": "user", "content": record[name]}]
        if isinstance(record.get(name), list):
            return prompt_messages({"messages": record[name]})
    return None


def pair(record: object, config: PreferenceConfig) -> tuple[tuple | None, str | None]:
    """(prompt messages, chosen, rejected) of a record, or None and why it is not a pair."""
    from orchestration.data.chat import check_conversation

    if not isinstance(record, dict):
        return None, "not a record"
    if "output_1" in record and "preference" in record:  # AlpacaEval annotations
        if record["preference"] not in (1, 2, 1.0, 2.0):
            return None, "no preference"
        first = record["preference"] in (1, 1.0)
        record = {"prompt": record.get("instruction"), "chosen": record["output_1" if first else "output_2"],
                  "rejected": record["output_2" if first else "output_1"]}  # fmt: skip
    chosen, rejected = record.get("chosen"), record.get("rejected")
    prompt = prompt_messages(record)
    if prompt is None and isinstance(chosen, str) and isinstance(rejected, str):  # HH-RLHF
        a, b = hh_turns(chosen), hh_turns(rejected)
        if not a or not b or a[:-1] != b[:-1] or a[-1]["role"] != "assistant" or b[-1]["role"] != "assistant":
            return None, "unparsable transcript"
        prompt, chosen, rejected = a[:-1], a[-1]["content"], b[-1]["content"]
    if prompt is None:
        return None, "no prompt"
    chosen, rejected = clean(answer_text(chosen)), clean(answer_text(rejected))
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        return None, "answer is not text"
    if not chosen or not rejected:
        return None, "empty answer"
    if chosen == rejected:
        return None, "identical answers"
    if config.system_prompt and prompt and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": config.system_prompt}, *prompt]
    for answer in (chosen, rejected):
        reason = check_conversation([*prompt, {"role": "assistant", "content": answer}])
        if reason:
            return None, reason
    if not prompt or prompt[-1]["role"] != "user":
        return None, "prompt does not end with a user turn"
    return (prompt, chosen, rejected), None


# ---- tokens ------------------------------------------------------------------------------------


def truncate(ids: np.ndarray, mask: np.ndarray, prompt_keep: int, answer_keep: int):
    """[BOS] + the prompt's last prompt_keep-1 tokens + the answer's first answer_keep tokens."""
    start = int(np.argmax(mask > 0)) if mask.any() else len(ids)
    prompt = np.concatenate([ids[:1], ids[1:start][len(ids[1:start]) - (prompt_keep - 1):]])
    return (np.concatenate([prompt, ids[start : start + answer_keep]]),
            np.concatenate([np.zeros(len(prompt), mask.dtype), mask[start : start + answer_keep]]))  # fmt: skip


def fit(chosen, rejected, limit: int):
    """Both rows cut to `limit` tokens: the prompt keeps its end (at most half the row when the
    answers are long), the answers their start; (chosen, rejected, truncated?)."""
    (ci, cm), (ri, rm) = chosen, rejected
    if max(len(ci), len(ri)) <= limit:
        return chosen, rejected, False
    prompt = int(np.argmax(cm > 0))
    answer = max(len(ci), len(ri)) - prompt
    prompt_keep = max(limit - answer, min(prompt, limit // 2))
    return truncate(ci, cm, prompt_keep, limit - prompt_keep), truncate(ri, rm, prompt_keep, limit - prompt_keep), True


def encode_pairs(tokenizer, pairs: list[tuple]) -> list[tuple]:
    """((chosen ids, mask), (rejected ids, mask)) per (prompt, chosen, rejected), int32 / int8."""
    from orchestration.data.chat import encode

    conversations = []
    for prompt, chosen, rejected in pairs:
        conversations += [[*prompt, {"role": "assistant", "content": chosen}],
                          [*prompt, {"role": "assistant", "content": rejected}]]  # fmt: skip
    encoded = encode(tokenizer, conversations)
    return list(zip(encoded[0::2], encoded[1::2]))


# ---- the dataset -------------------------------------------------------------------------------


def write_pairs(path: Path, ids: list[str], languages: list[str], encoded: list[tuple]) -> dict:
    """One Parquet shard of pairs; returns its manifest entry."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hanyeong.files import write_atomic

    def column(arrays):
        offsets = np.concatenate([[0], np.cumsum([len(a) for a in arrays])]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(arrays)))

    table = pa.table({"id": pa.array(ids, pa.string()), "language": pa.array(languages, pa.string()),
                      "chosen_ids": column([c[0] for c, _ in encoded]), "chosen_mask": column([c[1] for c, _ in encoded]),
                      "rejected_ids": column([r[0] for _, r in encoded]),
                      "rejected_mask": column([r[1] for _, r in encoded])})  # fmt: skip
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    data = sink.getvalue().to_pybytes()
    write_atomic(path, data)
    tokens = sum(len(c[0]) + len(r[0]) for c, r in encoded)
    return {"documents": len(ids), "tokens": tokens, "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}  # fmt: skip


def read_pairs(source, config: PreferenceConfig, ingest, dropped: Counter) -> list[tuple[str, tuple]]:
    """(id, (prompt, chosen, rejected)) of every usable record of a source's files."""
    from orchestration.data.chat_dataset import read_records
    from tokenizer.corpus import TextFields

    fields = TextFields((("prompt",), ("chosen",), ("rejected",)))
    return read_records(source, fields, lambda r: pair(r, config), ingest, dropped, "pair")


def contaminated(decontaminator, pairs: list[tuple]) -> list:
    """The benchmark each pair (prompt, chosen, rejected) matches, or None: the prompt's text with
    either answer is checked as one document."""
    from orchestration.data.fingerprint import normalize

    texts = []
    for prompt, chosen, rejected in pairs:
        asked = "\n".join(m["content"] for m in prompt)
        texts += [normalize(f"{asked}\n{chosen}"), normalize(f"{asked}\n{rejected}")]
    matches = decontaminator.check(texts)
    return [a or b for a, b in zip(matches[0::2], matches[1::2])]


def prepare_source(source, config: PreferenceConfig, tokenizer, ingest, seen: set, root: Path,
                   decontaminator=None) -> dict:  # fmt: skip
    from tokenizer.language import detect_language

    dropped: Counter = Counter()
    records, kept = read_pairs(source, config, ingest, dropped), []
    for record_id, found in records:
        key = hashlib.sha256(json.dumps(found, ensure_ascii=False).encode("utf-8")).digest()
        if key in seen:
            dropped["dedup:duplicate"] += 1
            continue
        seen.add(key)
        kept.append((record_id, found))
    if decontaminator is not None and kept:
        matches = contaminated(decontaminator, [found for _, found in kept])
        for match in filter(None, matches):
            dropped[f"decontaminate:{match.benchmark}"] += 1
        kept = [k for k, match in zip(kept, matches) if match is None]
    encoded, ids, truncated = [], [], 0
    for (record_id, _), (chosen, rejected) in zip(kept, encode_pairs(tokenizer, [f for _, f in kept])):
        if max(len(chosen[0]), len(rejected[0])) > config.drop_over_tokens:
            dropped["pair:over the length limit"] += 1
            continue
        chosen, rejected, cut = fit(chosen, rejected, config.max_tokens)
        truncated += cut
        encoded.append((chosen, rejected))
        ids.append(record_id)
    by_id = dict(kept)
    languages = [detect_language(" ".join(m["content"] for m in by_id[i][0])) for i in ids]
    shards, step = [], config.documents_per_shard
    for part, start in enumerate(range(0, len(ids), step)):
        rel = f"shards/{source.name}/part-{part:05d}.parquet"
        chunk = slice(start, start + step)
        shards.append({"path": rel, **write_pairs(root / rel, ids[chunk], languages[chunk], encoded[chunk])})
    return {"documents": len(ids), "tokens": sum(s["tokens"] for s in shards), "shards": shards,
            "read": len(records) + sum(dropped[k] for k in dropped if k.startswith("pair:")
                                       and k != "pair:over the length limit"),
            "dropped": dict(sorted(dropped.items())), "truncated": truncated}  # fmt: skip


def prepare_preference(inputs: list[str], tokenizer: str | Path, out: str | Path,
                       config: PreferenceConfig | None = None, force: bool = False,
                       decontaminate=None) -> dict:  # fmt: skip
    """Build the preference dataset `out` from `inputs`; returns its manifest (a no-op when up to
    date). Sources are named as `hanyeong data prepare` names them. `decontaminate`: a
    DecontaminateConfig (orchestration/data/config.py) whose benchmarks' items drop the pairs that
    share a window with them."""
    import shutil

    from orchestration.data import manifest as mf
    from orchestration.data.documents import IngestReport, resolve_sources
    from orchestration.data.shards import tokenizer_info
    from tokenizer.bbpe import BBPETokenizer
    from tokenizer.specials import CHAT_TEMPLATE

    config, out, started = config or PreferenceConfig(), Path(out), time.perf_counter()
    sources = resolve_sources(list(inputs), None)
    tok = tokenizer_info(tokenizer)
    files = [str(path) for s in sources for path, _ in s.files]
    settings = {"preference": config.to_dict(), "template": CHAT_TEMPLATE}
    decontaminator, bench_files = None, []
    if decontaminate is not None and decontaminate.enabled and decontaminate.benchmarks:
        from dataclasses import asdict as table

        from orchestration.data.decontaminate import benchmark_files

        settings["decontaminate"] = {k: v for k, v in table(decontaminate).items() if k != "root"}  # files: by content
        bench_files = [str(f) for b in decontaminate.benchmarks
                       for f in benchmark_files(b, decontaminate.root)]  # fmt: skip
    fingerprint = mf.inputs_hash(settings, files + bench_files, tok)
    if not force and (existing := mf.up_to_date(out, fingerprint)) is not None:
        return {**existing, "up_to_date": True}
    mf.check_replaceable(out)
    if "decontaminate" in settings:
        from orchestration.data.decontaminate import Decontaminator, build_index

        decontaminator = Decontaminator(build_index(decontaminate))
    tokenizer_object, ingest, tmp = BBPETokenizer.load(tokenizer), IngestReport(), mf.staging_dir(out)
    try:
        entries, seen = {}, set()
        for source in sources:
            entries[source.name] = prepare_source(source, config, tokenizer_object, ingest, seen, tmp,
                                                  decontaminator)  # fmt: skip
        if not any(e["documents"] for e in entries.values()):
            dropped = {k: v for e in entries.values() for k, v in e["dropped"].items()}
            raise DataError(f"no preference pairs in {', '.join(map(str, inputs))}: {dropped}")
        manifest = {"format": mf.FORMAT, "version": mf.VERSION, "kind": "preference", "tokenizer": tok,
                    "sources": entries, "steps": [ingest.to_dict()], "config": config.to_dict(),
                    "chat_template": CHAT_TEMPLATE, "inputs_hash": fingerprint,
                    "content_hash": mf.content_hash(tok, entries),
                    "seconds": {"total": round(time.perf_counter() - started, 2)}}  # fmt: skip
        mf.publish(tmp, out, manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest
