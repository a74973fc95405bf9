"""What happened to every document: read, then kept or dropped by one named reason.

Counts are kept per (source, language, outcome), so the manifest and `hanyeong data inspect` can
break drops down by source, language and rule, and a test can hold the law
read = kept + sum(dropped) for every source.
"""

from __future__ import annotations

from collections import Counter, defaultdict

KEPT = "kept"


class Ledger:
    """Counts documents by (source, language, outcome); an outcome is `kept` or `step:reason`."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str, str]] = Counter()
        self.read: Counter[tuple[str, str]] = Counter()

    def add_read(self, source: str, language: str, n: int = 1) -> None:
        self.read[source, language] += n

    def drop(self, source: str, language: str, step: str, reason: str) -> None:
        self.counts[source, language, f"{step}:{reason}"] += 1

    def keep(self, source: str, language: str) -> None:
        self.counts[source, language, KEPT] += 1

    def merge(self, other: Ledger) -> None:
        """Add another ledger's counts (a chunk's, counted in a Ray task) to these."""
        self.counts.update(other.counts)
        self.read.update(other.read)

    def dropped(self, step: str) -> dict[str, int]:
        """Drops of one step by reason, over all sources."""
        out: Counter[str] = Counter()
        for (_, _, outcome), n in self.counts.items():
            if outcome.startswith(step + ":"):
                out[outcome.split(":", 1)[1]] += n
        return dict(sorted(out.items()))

    def by_source(self) -> dict[str, dict]:
        """{source: {read, kept, dropped: {step:reason: n}, languages: {lang: {read, kept}}}}."""
        out: dict[str, dict] = defaultdict(
            lambda: {"read": 0, "kept": 0, "dropped": Counter(), "languages": {}}
        )
        for (source, language), n in self.read.items():
            entry = out[source]
            entry["read"] += n
            entry["languages"].setdefault(language, {"read": 0, "kept": 0})["read"] += n
        for (source, language, outcome), n in self.counts.items():
            entry = out[source]
            lang = entry["languages"].setdefault(language, {"read": 0, "kept": 0})
            if outcome == KEPT:
                entry["kept"] += n
                lang["kept"] += n
            else:
                entry["dropped"][outcome] += n
        return {
            s: {**e, "dropped": dict(sorted(e["dropped"].items()))} for s, e in sorted(out.items())
        }

    def unaccounted(self) -> dict[str, int]:
        """Sources whose read count differs from kept + dropped (should be empty at the end)."""
        settled: Counter[str] = Counter()
        for (source, _, _), n in self.counts.items():
            settled[source] += n
        read: Counter[str] = Counter()
        for (source, _), n in self.read.items():
            read[source] += n
        return {s: read[s] - settled[s] for s in read | settled if read[s] != settled[s]}
