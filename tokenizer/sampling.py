"""Choose the training text: drop exact duplicates, hold some back, balance Korean against the rest.

Every choice is a function of a document's content hash and the seed, so the same corpus and seed
give the same sample whatever the file order or the number of reading workers.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field, fields

from hanyeong.errors import ConfigError
from tokenizer.language import LANGUAGES, detect_language


@dataclass(frozen=True)
class SampleConfig:
    """How the training sample is drawn from the corpus."""

    ko_share: float | None = None
    """Target share of Korean in the training bytes (0-1); None keeps the corpus's own mix."""
    max_bytes: int | None = None
    """Upper bound on training bytes (UTF-8); None takes all the balance allows."""
    seed: int = 0
    """Seeds every random choice (held-out split, which documents are sampled)."""
    dedup: bool = True
    """Drop exact duplicate documents before sampling."""
    holdout_fraction: float = 0.01
    """Fraction of documents held back from training for the compression report."""
    holdout_max_bytes: int = 2_000_000
    """Cap on held-back bytes per language (the report does not need more)."""

    def __post_init__(self) -> None:
        if self.ko_share is not None and not 0.0 <= self.ko_share <= 1.0:
            raise ConfigError(f"ko_share must be between 0 and 1, got {self.ko_share}")
        if self.max_bytes is not None and self.max_bytes <= 0:
            raise ConfigError(f"max_bytes must be positive, got {self.max_bytes}")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ConfigError(f"holdout_fraction must be in [0, 1), got {self.holdout_fraction}")


@dataclass
class SampleStats:
    """Bytes and documents per language at each step, for the report."""

    read: Counter = field(default_factory=Counter)  # language -> bytes read
    read_docs: Counter = field(default_factory=Counter)
    duplicates: Counter = field(default_factory=Counter)  # language -> duplicate docs dropped
    heldout: Counter = field(default_factory=Counter)  # language -> bytes held back
    train: Counter = field(default_factory=Counter)  # language -> bytes sampled for training
    train_docs: Counter = field(default_factory=Counter)
    not_sampled_docs: Counter = field(default_factory=Counter)  # left out by the balance/budget
    not_sampled: Counter = field(default_factory=Counter)  # side -> bytes left out
    share_applied: bool = True  # False when one side was empty and the corpus mix was kept

    @property
    def ko_share(self) -> float:
        total = sum(self.train.values())
        return self.train["ko"] / total if total else 0.0

    def to_dict(self) -> dict:
        # Not dataclasses.asdict: it rebuilds a Counter from (key, value) pairs and miscounts.
        out = {f.name: dict(getattr(self, f.name)) for f in fields(self) if f.name != "share_applied"}
        out["share_applied"] = self.share_applied
        out["train_ko_share"] = round(self.ko_share, 4)
        return out


@dataclass
class Sample:
    train: list[str]
    heldout: dict[str, list[str]]  # language -> held-back documents
    stats: SampleStats


def _uniform(data: bytes, seed: int) -> float:
    """A reproducible pseudo-random number in [0, 1) from content and seed."""
    digest = hashlib.blake2b(data, digest_size=8, key=seed.to_bytes(8, "little", signed=True)).digest()
    return int.from_bytes(digest, "little") / 2**64


def byte_targets(available: dict[str, int], ko_share: float | None, max_bytes: int | None) -> dict[str, int]:
    """Training bytes to take per side ('ko' and 'rest') so the share and the budget both hold."""
    ko, rest = available.get("ko", 0), available.get("rest", 0)
    if ko_share is None or ko == 0 or rest == 0:  # with one side empty no share can be met
        total = ko + rest
        scale = min(1.0, max_bytes / total) if max_bytes and total else 1.0
        return {"ko": int(ko * scale), "rest": int(rest * scale)}
    # The largest total T with ko_share*T <= ko and (1-ko_share)*T <= rest, capped by the budget.
    limits = []
    if ko_share > 0:
        limits.append(ko / ko_share)
    if ko_share < 1:
        limits.append(rest / (1 - ko_share))
    total = min(limits)
    if max_bytes:
        total = min(total, max_bytes)
    return {"ko": int(total * ko_share), "rest": int(total * (1 - ko_share))}


def draw_sample(documents: list[str], config: SampleConfig) -> Sample:
    """Split documents into a balanced training sample and held-back text per language."""
    stats = SampleStats()
    seen: set[bytes] = set()
    pool: dict[str, list[tuple[float, int, str, str]]] = {"ko": [], "rest": []}
    heldout: dict[str, list[str]] = {lang: [] for lang in LANGUAGES}
    for text in documents:
        data = text.encode("utf-8", "surrogatepass")
        lang = detect_language(text)
        stats.read[lang] += len(data)
        stats.read_docs[lang] += 1
        if config.dedup:
            key = hashlib.blake2b(data, digest_size=16).digest()
            if key in seen:
                stats.duplicates[lang] += 1
                continue
            seen.add(key)
        u = _uniform(data, config.seed)
        if u < config.holdout_fraction and stats.heldout[lang] < config.holdout_max_bytes:
            heldout[lang].append(text)
            stats.heldout[lang] += len(data)
            continue
        # Rescale so the order among training documents is independent of the held-out draw.
        rank = (u - config.holdout_fraction) / (1 - config.holdout_fraction)
        pool["ko" if lang == "ko" else "rest"].append((rank, len(data), lang, text))

    available = {side: sum(item[1] for item in docs) for side, docs in pool.items()}
    targets = byte_targets(available, config.ko_share, config.max_bytes)
    stats.share_applied = config.ko_share is not None and all(available.values())
    train: list[str] = []
    for side, docs in pool.items():
        docs.sort(key=lambda item: item[0])
        taken = 0
        for i, (_, n, lang, text) in enumerate(docs):
            if taken >= targets[side]:
                stats.not_sampled_docs[side] += len(docs) - i
                stats.not_sampled[side] += available[side] - taken
                break
            train.append(text)
            taken += n
            stats.train[lang] += n
            stats.train_docs[lang] += 1
    return Sample(train=train, heldout={k: v for k, v in heldout.items() if v}, stats=stats)
