"""Log-likelihoods of continuations and bits per byte of text, batched through any backend.

A request is (context ids, continuation ids); its log-likelihood is the sum of the continuation
tokens' log-probabilities (backend.logprobs on a Batch). Pairs are encoded as lm-evaluation-harness
does (lm_eval/api/model.py `_encode_pair`): trailing spaces of the context move to the
continuation, the whole text is encoded, and the continuation is what follows the context's ids.
Rows are right-padded (a causal model never sees what follows), longest first, and left-truncated
to the model's context.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import numpy as np

from orchestration.core.batch import Batch
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
    """Summed log-probability (nats) of each continuation after its context, float per request."""
    rows = []
    for context, continuation in requests:
        tokens = (context + continuation)[-(max_len + 1) :]
        rows.append((tokens, min(len(continuation), len(tokens) - 1)))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out = [0.0] * len(rows)
    for lo in range(0, len(order), batch_size):
        chunk = order[lo : lo + batch_size]
        width = max(len(rows[i][0]) for i in chunk) - 1
        inputs = np.zeros((len(chunk), width), np.int64)
        targets = np.zeros((len(chunk), width), np.int64)
        for r, i in enumerate(chunk):
            tokens = rows[i][0]
            inputs[r, : len(tokens) - 1], targets[r, : len(tokens) - 1] = tokens[:-1], tokens[1:]
        logp = backend.logprobs(model, Batch(inputs, targets))
        for r, i in enumerate(chunk):
            tokens, n = rows[i]
            out[i] = float(np.sum(logp[r, len(tokens) - 1 - n : len(tokens) - 1], dtype=np.float64))
        if progress:
            progress(len(chunk))
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
    requests = []
    for ids in tokenizer.encode_batch(list(texts)):
        tokens = [bos_id, *ids]
        for start in range(1, len(tokens), max_len):
            window = tokens[max(start - 1, 0) : start + max_len]
            requests.append((window[:1], window[1:]))
    lls = loglikelihoods(backend, model, requests, max_len, batch_size)
    nats = -sum(lls)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return {"bits_per_byte": nats / math.log(2) / max(n_bytes, 1), "bytes": n_bytes, "nll_nats": nats}
