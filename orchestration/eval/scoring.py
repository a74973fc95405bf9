"""Log-likelihoods of continuations and bits per byte of text, batched through any backend.

A request is (context ids, continuation ids); its log-likelihood is the sum of the continuation
tokens' log-probabilities (backend.logprobs_at: the output layer runs at those positions only).
Pairs are encoded as lm-evaluation-harness does (lm_eval/api/model.py `_encode_pair`): trailing
spaces of the context move to the continuation, the whole text is encoded, and the continuation is
what follows the context's ids. Rows are right-padded (a causal model never sees what follows),
longest first, and left-truncated to the model's context; requests with the same row share it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import numpy as np

from orchestration.eval.tasks import Item

Request = tuple[list[int], list[int]]
FEWSHOT_SEED = 1234  # lm-evaluation-harness's sampler seed
FEWSHOT_DELIMITER = "\n\n"


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]]) -> list[Request]:
    """(context, continuation) texts -> (context ids, continuation ids), lm_eval's way."""
    moved = []
    for context, continuation in pairs:
        n = len(context) - len(context.rstrip())
        moved.append((context[: len(context) - n], context[len(context) - n :] + continuation))
    wholes = tokenizer.encode_batch([c + x for c, x in moved])
    contexts = tokenizer.encode_batch([c for c, _ in moved])
    return [(ctx, whole[len(ctx) :]) for ctx, whole in zip(contexts, wholes)]


def loglikelihoods(backend, model, requests: Sequence[Request], max_len: int, batch_size: int,
                   progress: Callable[[int], None] | None = None) -> list[float]:  # fmt: skip
    """Summed log-probability (nats) of each continuation after its context, float per request.

    Requests whose model input is the same row (the same tokens but the last, after truncation:
    the choices of a multiple-choice item whose answers are one token, A-D after one prompt) share
    one row, as lm_eval's Collator(group_by="contexts") does: the row runs once, each request reads
    its last token at the last position and the shared targets before it (backend.logprobs_at)."""
    groups: dict[tuple[int, ...], list[tuple[int, int, int]]] = {}  # row -> (request, n, last id)
    out = [0.0] * len(requests)
    for i, (context, continuation) in enumerate(requests):
        tokens = (context + continuation)[-(max_len + 1) :]
        n = min(len(continuation), len(tokens) - 1)  # continuation tokens scored
        if n > 0:  # else nothing to score: 0 nats
            groups.setdefault(tuple(tokens[:-1]), []).append((i, n, tokens[-1]))
    rows = sorted(groups, key=len, reverse=True)  # longest first: padding stays short
    for lo in range(0, len(rows), batch_size):
        chunk = rows[lo : lo + batch_size]
        inputs = np.zeros((len(chunk), len(chunk[0])), np.int64)
        queries = {}  # (row, position, id), each once: the shared targets, each distinct last id
        for r, row in enumerate(chunk):
            inputs[r, : len(row)] = row
            end = len(row) - 1  # the last position: its target is each request's own
            for t in range(end - max(n for _, n, _ in groups[row]) + 1, end):
                queries[r, t, row[t + 1]] = None
            for _, _, last in groups[row]:
                queries[r, end, last] = None
        at_row, at_pos, at_id = np.array(list(queries), np.int64).T
        logp = dict(zip(queries, backend.logprobs_at(model, inputs, at_row, at_pos, at_id)))
        for r, row in enumerate(chunk):
            end = len(row) - 1
            for i, n, last in groups[row]:
                terms = [logp[r, t, row[t + 1]] for t in range(end - n + 1, end)]
                terms.append(logp[r, end, last])
                out[i] = float(np.sum(terms, dtype=np.float64))
        if progress:
            progress(sum(len(groups[row]) for row in chunk))
    return out


def choice_metrics(items: Sequence[Item], lls: Sequence[Sequence[float]]) -> dict[str, float]:
    """acc (argmax log-likelihood) and acc_norm (argmax log-likelihood per character)."""
    acc = acc_norm = 0
    for item, scores in zip(items, lls):
        scores = np.asarray(scores)
        acc += int(np.argmax(scores)) == item.gold
        lengths = np.array([float(len(c)) for c in item.choices])
        acc_norm += int(np.argmax(scores / lengths)) == item.gold
    n = max(len(items), 1)
    return {"acc": acc / n, "acc_norm": acc_norm / n}


def with_fewshot(items: Sequence[Item], pool: Sequence[Item], k: int, delimiter: str,
                 same_pool: bool) -> list[Item]:  # fmt: skip
    """Each item's context after k solved examples from `pool` (never the item itself), joined by
    blank lines as lm-evaluation-harness does; seeded, so the same run gives the same prompts."""
    if k <= 0:
        return list(items)
    rng, out = random.Random(FEWSHOT_SEED), []
    for index, item in enumerate(items):
        candidates = [i for i in range(len(pool)) if not (same_pool and i == index)]
        shots = [pool[i] for i in rng.sample(candidates, min(k, len(candidates)))]
        solved = [s.context + delimiter + s.choices[s.gold] for s in shots]
        out.append(Item(FEWSHOT_DELIMITER.join([*solved, item.context]), item.choices, item.gold))
    return out


def bits_per_byte(backend, model, tokenizer, texts: Sequence[str], max_len: int, batch_size: int,
                  bos_id: int) -> dict[str, float]:  # fmt: skip
    """Summed NLL (nats) / ln 2 / UTF-8 bytes over the texts, every token scored: each text after
    BOS, in disjoint windows of the model's context (lm_eval's rolling windows, context 1 token)."""
    return bpb_metrics(texts, window_loglikelihoods(backend, model, tokenizer, texts, max_len, batch_size, bos_id))


def window_loglikelihoods(backend, model, tokenizer, texts: Sequence[str], max_len: int, batch_size: int,
                          bos_id: int) -> list[list[float]]:  # fmt: skip
    """Per text, the log-likelihood (nats) of each of its windows, in order (bits_per_byte's per-item part)."""
    windows = []
    for ids in tokenizer.encode_batch(list(texts)):
        tokens = [bos_id, *ids]
        spans = [tokens[max(start - 1, 0) : start + max_len] for start in range(1, len(tokens), max_len)]
        windows.append([(w[:1], w[1:]) for w in spans])
    flat = iter(loglikelihoods(backend, model, [r for doc in windows for r in doc], max_len, batch_size))
    return [[next(flat) for _ in doc] for doc in windows]


def bpb_metrics(texts: Sequence[str], lls: Sequence[Sequence[float]]) -> dict[str, float]:
    """bits_per_byte, bytes and nll_nats of the texts from their windows' log-likelihoods."""
    nats = -sum(ll for doc in lls for ll in doc)  # one sum in text and window order, sharded or not
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return {"bits_per_byte": nats / math.log(2) / max(n_bytes, 1), "bytes": n_bytes, "nll_nats": nats}
