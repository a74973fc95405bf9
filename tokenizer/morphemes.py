"""Korean morpheme boundaries from Kiwi, found once per distinct Hangul run and cached.

Kiwi analyses about 0.1 MB/s per core, far too slow for a whole corpus, but a corpus repeats its
eojeols: 12.7M Hangul runs in the shared data are only ~0.9M distinct ones. So each distinct run
is analysed once, out of context, and the boundaries are kept in memory and on disk.
Boundaries only shape what BPE may merge during training; encoding never calls Kiwi.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path

from hanyeong.console import note
from hanyeong.errors import ConfigError

# Runs of two or more Hangul syllables: a single syllable has no boundary a byte-level merge
# could respect (a morpheme inside one syllable, like the ㄴ of 된, shares its bytes).
HANGUL_RUN = re.compile(r"[\uac00-\ud7a3]{2,}")
# A Unicode noncharacter marks boundaries in training text; the training pre-tokenizer removes it.
BOUNDARY = "\ufdd0"
# Runs longer than this are left whole: they are rare (unspaced text) and slow to analyse.
MAX_RUN_CHARS = 256

# Kiwi's tag set (Sejong tags plus Kiwi's own): a morpheme category is any prefix of these.
KIWI_TAGS = (
    "NNG NNP NNB NR NP VV VA VX VCP VCN MM MAG MAJ IC JKS JKC JKG JKO JKB JKV JKQ JX JC "
    "EP EF EC ETN ETM XPN XSN XSV XSA XSM XR SF SP SS SSO SSC SE SO SW SL SH SN SB UN"
).split()
# kiwipiepy's bpe_trainer option names, for users coming from it.
ALIASES = {"j": ("J",), "e": ("E",), "vcp": ("VCP",), "xsv": ("XSV", "XSA")}


def parse_categories(spec: str | Iterable[str]) -> tuple[str, ...]:
    """'J,E' or 'j,e' -> ('E', 'J'): tag prefixes whose morphemes are cut from their neighbours."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    prefixes: set[str] = set()
    for name in (n.strip() for n in names):
        if not name:
            continue
        if name.lower() in ALIASES:
            prefixes.update(ALIASES[name.lower()])
        elif any(tag.startswith(name.upper()) for tag in KIWI_TAGS):
            prefixes.add(name.upper())
        else:
            raise ConfigError(
                f"unknown morpheme category {name!r}: give Kiwi tag prefixes (J, JK, E, EF, XSV...) "
                f"or one of {', '.join(ALIASES)}"
            )
    return tuple(sorted(prefixes))


def count_runs(texts: Iterable[str]) -> dict[str, int]:
    """How often each distinct Hangul run (2+ syllables) occurs."""
    counts: dict[str, int] = {}
    get = counts.get
    for text in texts:
        for run in HANGUL_RUN.findall(text):
            counts[run] = get(run, 0) + 1
    return counts


class MorphemeCache:
    """Kiwi's analysis of Hangul runs: run -> ((start, tag), ...) per morpheme, kept on disk."""

    def __init__(self, path: Path | None):
        self.path = path
        self.analyses: dict[str, tuple[tuple[int, str], ...]] = {}
        if path is not None and path.exists():
            self._load(path)
        self.loaded = len(self.analyses)

    def _load(self, path: Path) -> None:
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as err:  # a damaged cache only costs a re-analysis
            note(f"warning: ignoring unreadable morpheme cache {path}: {err}")
            return
        for run, starts, tags in zip(*(table.column(c).to_pylist() for c in ("run", "starts", "tags"))):
            self.analyses[run] = tuple(zip(starts, tags.split(",")))

    def save(self) -> None:
        """Write the cache atomically (temp file, then rename)."""
        if self.path is None or len(self.analyses) == self.loaded:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        runs = list(self.analyses)
        table = pa.table(
            {
                "run": runs,
                "starts": [[s for s, _ in self.analyses[r]] for r in runs],
                "tags": [",".join(t for _, t in self.analyses[r]) for r in runs],
            }
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, self.path)
        self.loaded = len(self.analyses)

    def analyse(self, runs: Iterable[str], workers: int = 1, progress: bool = False) -> int:
        """Analyse the runs not cached yet with Kiwi on `workers` threads; returns how many."""
        todo = [r for r in runs if r not in self.analyses and len(r) <= MAX_RUN_CHARS]
        if not todo:
            return 0
        from kiwipiepy import Kiwi
        from kiwipiepy.const import Match

        kiwi = Kiwi(num_workers=max(1, workers))
        # The default matchers (URL, e-mail, hashtag, emoji...) never fire on a pure Hangul run;
        # switching them off halves Kiwi's time and gives identical analyses (checked on 20k runs).
        no_matchers = Match(0)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc="kiwi", unit="run", file=sys.stderr, mininterval=1.0)
        chunk = 20_000
        for i in range(0, len(todo), chunk):
            batch = todo[i : i + chunk]
            for run, tokens in zip(batch, kiwi.tokenize(batch, match_options=no_matchers)):
                self.analyses[run] = tuple((t.start, t.tag) for t in tokens)
            if bar:
                bar.update(len(batch))
        if bar:
            bar.close()
        return len(todo)


def _category(tag: str, prefixes: tuple[str, ...]) -> str:
    """The longest selected prefix of a tag, or '' for a morpheme outside every category."""
    return max((p for p in prefixes if tag.startswith(p)), key=len, default="")


def boundaries(morphemes: tuple[tuple[int, str], ...], length: int, prefixes: tuple[str, ...]) -> list[int]:
    """Character offsets inside a run where the morpheme category changes.

    Cutting only where the category changes keeps a chain of endings (었|습니다 -> 었습니다) or
    particles (에서|는 -> 에서는) mergeable as one functional unit, while the stem stays apart:
    먹|었습니다, 학교|에서는. Morphemes inside one syllable (the ㄴ of 된) cannot be cut.
    """
    cuts: list[int] = []
    previous: str | None = None
    previous_start = 0
    for start, tag in morphemes:
        category = _category(tag, prefixes)
        if previous is not None and category != previous and 0 < start < length and start != previous_start:
            if not cuts or cuts[-1] != start:
                cuts.append(start)
        previous, previous_start = category, start
    return cuts


class MorphemeMarker:
    """Inserts BOUNDARY at the selected morpheme boundaries of every analysed Hangul run."""

    def __init__(self, cache: MorphemeCache, categories: tuple[str, ...], whole: frozenset[str] = frozenset()):
        self.categories = categories
        self.marked: dict[str, str] = {}
        for run, morphemes in cache.analyses.items():
            if run in whole:  # frequent words may become one token; only the long tail is cut
                continue
            cuts = boundaries(morphemes, len(run), categories)
            if cuts:
                pieces = [run[a:b] for a, b in zip([0, *cuts], [*cuts, len(run)])]
                self.marked[run] = BOUNDARY.join(pieces)
        self._get = self.marked.get

    def _replace(self, match: re.Match) -> str:
        run = match.group()
        return self._get(run, run)

    def mark(self, text: str) -> str:
        """The text with BOUNDARY at morpheme boundaries (any BOUNDARY already there removed)."""
        if BOUNDARY in text:
            text = text.replace(BOUNDARY, "")
        return HANGUL_RUN.sub(self._replace, text)
