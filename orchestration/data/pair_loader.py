"""`PairLoader`: batches of whole preference pairs, one pair per row (the layout of
cuda_model/losses.py's preference losses), from prepared `format = "preference"` datasets.

Every pair of the stage's `[stage.data]` sources is read (weights are not applied: a preference set
is small and each pair is seen once per epoch); the order is a permutation drawn from the seed for
each epoch, so the batches are a function of (seed, cursor) and `state()` / `load_state()` resume
exactly. Rows are `seq_len` tokens: a pair longer than that is cut as the dataset's preparation cuts
(prompt's end, answers' start); a stage's seq_len ramp does not apply (the reference log-probs are
of these rows). `hold_out(n)` keeps n pairs out of the batches, to score the stage on (its start and
end: orchestration/pipeline/preference_stage.py). Batch extras: rejected_inputs/targets/mask,
ref_chosen_logps / ref_rejected_logps
(after `reference`, the cached array, or `live`, a reference model, is set), and `settings` (beta,
label_smoothing, sft_weight) per row.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hanyeong.errors import DataError
from orchestration.core.batch import Batch
from orchestration.data.preference import fit

HOLD_OUT_STREAM = 1 << 30  # the seed stream of the held-back draw (epochs use 0, 1, ...)


@dataclass
class PairSource:
    """One source of a preference dataset: `key` and every token id (the vocabulary check)."""

    key: str
    tokens: np.ndarray = field(repr=False)


def read_dataset(directory: Path, wanted: str) -> tuple[list, list[PairSource], str]:
    """The pairs ((ids, mask), (ids, mask)) of a prepared preference dataset's sources."""
    import pyarrow.parquet as pq

    manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
    if manifest.get("kind") != "preference":
        raise DataError(f"{directory}: not a preference dataset (kind {manifest.get('kind')!r})")
    pairs, sources = [], []
    for name, entry in manifest["sources"].items():
        if wanted not in ("*", name):
            continue
        tokens = []
        for shard in entry["shards"]:
            table = pq.read_table(directory / shard["path"]).to_pydict()
            for ci, cm, ri, rm in zip(table["chosen_ids"], table["chosen_mask"],
                                      table["rejected_ids"], table["rejected_mask"]):  # fmt: skip
                chosen = (np.array(ci, np.int32), np.array(cm, np.int8))
                rejected = (np.array(ri, np.int32), np.array(rm, np.int8))
                pairs.append((chosen, rejected))
                tokens += [chosen[0], rejected[0]]
        sources.append(PairSource(f"{directory.name}/{name}", np.concatenate(tokens or [np.zeros(0, np.int32)])))
    return pairs, sources, manifest["content_hash"]


def row(ids: np.ndarray, mask: np.ndarray, T: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """inputs, targets (int32 [T], padded with 0) and the targets' mask (float32 [T])."""
    inputs, targets, weights = np.zeros(T, np.int32), np.zeros(T, np.int32), np.zeros(T, np.float32)
    n = len(ids) - 1
    inputs[:n], targets[:n], weights[:n] = ids[:-1], ids[1:], mask[1:]
    return inputs, targets, weights


class PairLoader:
    """The Loader protocol (orchestration/pipeline/kinds.py) over preference pairs."""

    def __init__(self, mixture, seq_len: int, rows: int, seed: int):
        self.seq_len, self.batch_rows, self.seed = seq_len, rows, seed
        self.pairs, self.sources, hashes = [], [], []
        for entry in mixture.sources:
            pairs, sources, content = read_dataset(Path(entry.dataset), entry.source)
            self.pairs += [fit(c, r, seq_len + 1)[:2] for c, r in pairs]
            self.sources += sources
            hashes.append((content, entry.source))
        if not self.pairs:
            raise DataError(f"no preference pairs in {', '.join(e.dataset for e in mixture.sources)}")
        self.data_hash = hashlib.sha256(json.dumps([hashes, seq_len]).encode()).hexdigest()
        self.settings: dict[str, float] = {"beta": 0.1}
        self.reference: np.ndarray | None = None  # float32 [pairs, 2]: summed answer log-probs
        self.live = None  # (backend, model): a live reference, scoring each batch's pairs as drawn
        self.epoch, self.position = 0, 0
        self.held = np.zeros(0, np.int64)  # pairs kept out of training (hold_out)
        self.train = np.arange(len(self.pairs))

    def hold_out(self, count: int) -> np.ndarray:
        """Keep `count` pairs (at most a tenth of them), drawn from the seed, out of the batches;
        returns their indices (sorted). Set before the first batch, the same on every resume."""
        count = min(int(count), len(self.pairs) // 10)
        drawn = np.random.default_rng([self.seed, HOLD_OUT_STREAM]).permutation(len(self.pairs))
        self.held = np.sort(drawn[:count])
        self.train = np.sort(drawn[count:])
        return self.held

    def order(self, epoch: int) -> np.ndarray:
        return self.train[np.random.default_rng([self.seed, epoch]).permutation(len(self.train))]

    def take(self, count: int) -> np.ndarray:
        """The next `count` pair indices, moving the cursor (across epochs)."""
        out = []
        while len(out) < count:
            order = self.order(self.epoch)
            chunk = order[self.position : self.position + count - len(out)]
            out += list(chunk)
            self.position += len(chunk)
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return np.array(out[:count], np.int64)

    def batch(self, indices: np.ndarray, with_reference: bool = True) -> Batch:
        """The pair rows `indices` as one Batch (the layout of the preference losses)."""
        T = self.seq_len
        chosen = [row(*self.pairs[i][0], T) for i in indices]
        rejected = [row(*self.pairs[i][1], T) for i in indices]
        stack = lambda rows, k: np.stack([r[k] for r in rows])  # noqa: E731
        extras = {"rejected_inputs": stack(rejected, 0), "rejected_targets": stack(rejected, 1),
                  "rejected_mask": stack(rejected, 2)}  # fmt: skip
        extras |= {name: np.full(len(indices), value, np.float32) for name, value in self.settings.items()}
        reference = self.reference_logps(indices) if with_reference else None
        if reference is not None:
            extras["ref_chosen_logps"] = reference[:, 0]
            extras["ref_rejected_logps"] = reference[:, 1]
        return Batch(stack(chosen, 0), stack(chosen, 1), loss_mask=stack(chosen, 2), extras=extras)

    def reference_logps(self, indices: np.ndarray) -> np.ndarray | None:
        """The reference's summed answer log-probs of pairs `indices` [n, 2]: from the cached array,
        or scored now by the live reference model; None without a reference (simper)."""
        if self.reference is not None:
            return self.reference[indices]
        if self.live is not None:
            return answer_logps(*self.live, self, np.asarray(indices, np.int64))
        return None

    def next_batch(self) -> Batch:
        return self.batch(self.take(self.batch_rows))

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def answer_logps(backend, model, loader: PairLoader, indices: np.ndarray, rows: int = 32) -> np.ndarray:
    """float32 [len(indices), 2]: summed log-probs of the chosen and rejected answers under `model`.

    Scored shortest first, `rows` pairs at a time, each group's rows cut after its longest pair: a
    causal model's log-probs of a row do not depend on the padding after it, so this saves the
    padding's compute (most pairs are far shorter than seq_len) without changing what is computed."""
    indices = np.asarray(indices, np.int64)
    lengths = np.array([max(len(c[0]), len(r[0])) for c, r in (loader.pairs[i] for i in indices)])
    order = np.argsort(lengths, kind="stable")
    out = np.zeros((len(indices), 2), np.float32)
    for start in range(0, len(indices), rows):
        chunk = order[start : start + rows]
        b = loader.batch(indices[chunk], with_reference=False)
        T = min(b.inputs.shape[1], int(lengths[chunk].max()) - 1)
        cut = lambda name: b[name][:, :T]  # noqa: E731
        chosen = backend.logprobs(model, Batch(cut("inputs"), cut("targets")))
        rejected = backend.logprobs(model, Batch(cut("rejected_inputs"), cut("rejected_targets")))
        out[chunk, 0] = (chosen * cut("loss_mask")).sum(-1)
        out[chunk, 1] = (rejected * cut("rejected_mask")).sum(-1)
    return out
