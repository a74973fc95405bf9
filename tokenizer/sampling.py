"""Choose the training text: drop exact duplicates, hold some back, balance Korean against the rest,
and keep any one source from dominating its side.

Every choice is a function of a document's content hash and the seed, so the same corpus and seed
give the same sample whatever the file order or the number of reading workers.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field, fields

from hanyeong.errors import ConfigError
from tokenizer.language import LANGUAGES, detect_language


# Chosen by measurement on held-out kinds of text (benchmarks/results/tokenizer-*.md, README "Defaults
# chosen by measurement"): English news is the binding kind, +2.4 / +2.9 / +3.6 / +4.5% tokens per
# word against EXAONE 3.5 at 0.3 / 0.35 / 0.4 / 0.5, while Korean news and reviews stay at -16% or
# better from 0.3 up. Korean is 3 bytes a syllable: 0.3 of the bytes is still a lot of Korean text.
DEFAULT_KO_SHARE = 0.3
# No source (a folder of the inputs) takes more than this share of its side's training bytes, so
# ~107 MB of statutes cannot set the Korean merges (measured at share 0.5: English news +4.5% against
# +5.0% without a cap, Korean news -20.8% against -20.0%).
DEFAULT_SOURCE_CAP = 0.25


@dataclass(frozen=True)
class SampleConfig:
    """How the training sample is drawn from the corpus."""

    ko_share: float | None = DEFAULT_KO_SHARE
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
    source_cap: float | None = DEFAULT_SOURCE_CAP
    """Most a single source may take of its side's (Korean, or the rest) training bytes (0-1];
    None (or 1.0): no cap. With fewer than 1/cap sources the cap widens to equal shares; a side
    whose one big source outweighs the rest trains on less text (the report and a note say how
    much was left out), but never less than `cap_floor`. Either way a side that must leave text
    out (for the share or the budget) leaves it out of its largest sources first."""
    cap_floor: int = 50_000_000
    """The cap never brings a side below this many bytes (or all it has): on a small corpus more
    text matters more than balance."""

    def __post_init__(self) -> None:
        if self.ko_share is not None and not 0.0 <= self.ko_share <= 1.0:
            raise ConfigError(f"ko_share must be between 0 and 1, got {self.ko_share}")
        if self.max_bytes is not None and self.max_bytes <= 0:
            raise ConfigError(f"max_bytes must be positive, got {self.max_bytes}")
        if self.source_cap is not None and not 0.0 < self.source_cap <= 1.0:
            raise ConfigError(f"source_cap must be in (0, 1], got {self.source_cap}")
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
    sources: dict = field(default_factory=dict)  # source -> {"side", "read", "train"} in bytes

    @property
    def ko_share(self) -> float:
        total = sum(self.train.values())
        return self.train["ko"] / total if total else 0.0

    def to_dict(self) -> dict:
        # Not dataclasses.asdict: it rebuilds a Counter from (key, value) pairs and miscounts.
        out = {f.name: dict(getattr(self, f.name)) for f in fields(self) if f.name not in ("share_applied", "sources")}
        out["share_applied"] = self.share_applied
        out["sources"] = {name: dict(row) for name, row in sorted(self.sources.items())}
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


def capped_total(sizes: list[int], cap: float | None) -> int:
    """The most bytes a side can give when no source may exceed `cap` of the side's total.

    The largest T with sum(min(size, cap * T)) >= T: sources under the cap give all they have,
    the others cap * T each. With fewer than 1/cap sources no T > 0 qualifies, so the cap
    widens to equal shares (1/n). Without a cap it is every byte.
    """
    total = sum(sizes)
    if cap is None or not sizes:
        return total
    cap = max(cap, 1 / len(sizes))
    # sum(min(size, cap*T)) - T is concave and 0 at T=0: walk the sources from the smallest,
    # each becoming "whole" in turn, until the fixed point lies where the next one is still capped.
    whole = 0
    ordered = sorted(sizes)
    for k, size in enumerate(ordered):
        at_cap = len(ordered) - k
        if at_cap * cap < 1:
            t = whole / (1 - at_cap * cap)
            if cap * t <= size:
                return int(t)
        whole += size
    return total


def water_level(sizes: list[int], target: int) -> float:
    """The per-source level L with sum(min(size, L)) == target (inf when every byte is needed)."""
    if target >= sum(sizes):
        return float("inf")
    remaining, ordered = target, sorted(sizes)
    for i, size in enumerate(ordered):
        level = remaining / (len(ordered) - i)
        if size >= level:
            return level
        remaining -= size
    return float("inf")


def draw_sample(documents: list[str], config: SampleConfig, sources: list[str] | None = None) -> Sample:
    """Split documents into a balanced training sample and held-back text per language.

    `sources` names the source of each document (for the per-source cap and report); None puts
    every document in one source.
    """
    stats = SampleStats()
    seen: set[bytes] = set()
    # side -> source -> [(rank, bytes, language, text)]
    pool: dict[str, dict[str, list[tuple[float, int, str, str]]]] = {"ko": {}, "rest": {}}
    heldout: dict[str, list[str]] = {lang: [] for lang in LANGUAGES}
    for i, text in enumerate(documents):
        source = sources[i] if sources is not None else "corpus"
        data = text.encode("utf-8", "surrogatepass")
        lang = detect_language(text)
        side = "ko" if lang == "ko" else "rest"
        row = stats.sources.setdefault(f"{source} ({side})", {"side": side, "read": 0, "train": 0})
        stats.read[lang] += len(data)
        stats.read_docs[lang] += 1
        row["read"] += len(data)
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
        pool[side].setdefault(source, []).append((rank, len(data), lang, text))

    sizes = {side: {src: sum(item[1] for item in docs) for src, docs in by_source.items()} for side, by_source in pool.items()}
    available = {
        side: max(capped_total(list(s.values()), config.source_cap), min(sum(s.values()), config.cap_floor))
        for side, s in sizes.items()
    }
    targets = byte_targets(available, config.ko_share, config.max_bytes)
    stats.share_applied = config.ko_share is not None and all(available.values())
    train: list[str] = []
    for side, by_source in pool.items():
        level = water_level(list(sizes[side].values()), targets[side])
        for source, docs in sorted(by_source.items()):
            docs.sort(key=lambda item: item[0])
            taken = 0
            for i, (_, n, lang, text) in enumerate(docs):
                if taken >= level:
                    stats.not_sampled_docs[side] += len(docs) - i
                    stats.not_sampled[side] += sizes[side][source] - taken
                    break
                train.append(text)
                taken += n
                stats.train[lang] += n
                stats.train_docs[lang] += 1
            stats.sources[f"{source} ({side})"]["train"] += taken
    return Sample(train=train, heldout={k: v for k, v in heldout.items() if v}, stats=stats)
