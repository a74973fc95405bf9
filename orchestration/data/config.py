"""`prepare.toml`: one dataclass per TOML table, validated when it is loaded.

`[clean]` is `CleanConfig`, `[filters.<rule>]` a rule of `FilterConfig`, `[dedup]` `DedupConfig`,
`[decontaminate]` `DecontaminateConfig` with its `[[decontaminate.benchmarks]]`, `[shards]`
`ShardConfig`, `[[sources]]` `SourceConfig`. They are built by orchestration/core/config.py's
`build` and check their own values in `__post_init__`, so an unknown key, a wrong type or an
impossible value is a `ConfigError` naming its key path. Paths in the file are relative to the
file's folder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from hanyeong.errors import ConfigError
from orchestration.core.config import build

SCRIPTS = ("hangul", "latin", "han", "kana", "cyrillic", "greek", "arabic", "other")
COMPRESSIONS = ("zstd", "snappy", "gzip", "none")


def check(obj, name: str, ok: bool, what: str) -> None:
    """ConfigError '<name> must be <what>, got <value>' unless `ok`."""
    if not ok:
        raise ConfigError(f"{name} must be {what}, got {getattr(obj, name)!r}")


def check_shares(obj, *names: str) -> None:
    """Each named field a share in [0, 1] (a tuple field: each of its values)."""
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, tuple):
            check(obj, name, all(0 <= x <= 1 for x in value), "shares between 0 and 1")
        else:
            check(obj, name, 0 <= value <= 1, "a share between 0 and 1")


def check_unique_names(items, where: str) -> None:
    names = [item.name for item in items]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"{where}: the name {twice[0]!r} is used twice")


@dataclass(frozen=True)
class SourceConfig:
    """`[[sources]]`: a named source read from some files or folders."""

    name: str
    """Shard folder and manifest key of the source (letters, digits, `.`, `_`, `-`)."""
    paths: tuple[str, ...]
    """Files or folders, relative to the config file's folder."""
    text_fields: tuple[str, ...] = ("text",)
    """Fields holding the text; dotted paths reach nested records, `*` every value (as --text-field)."""

    def __post_init__(self) -> None:
        check(self, "name", bool(self.name), "a non-empty name")
        check(self, "paths", bool(self.paths), "a non-empty list")


@dataclass(frozen=True)
class CleanConfig:
    """`[clean]`: how text is normalized. The tokenizer never rewrites text; this step does."""

    nfc: bool = True
    """Compose to Unicode NFC."""
    drop_control: bool = True
    """Remove control characters (but tab and newline), zero-width spaces, BOMs, soft hyphens,
    lone surrogates and noncharacters."""
    normalize_whitespace: bool = True
    """Unicode spaces and tabs become one space, line ends `\\n`, trailing spaces go, at most one
    blank line in a row, the document is stripped."""


@dataclass(frozen=True)
class LengthRule:
    """`[filters.length]`: documents too short or too long to be useful."""

    enabled: bool = True
    """False switches the rule off."""
    min_chars: int = 16
    """Fewest characters a document keeps (after cleaning)."""
    max_chars: int = 1_000_000
    """Most characters a document keeps."""

    def __post_init__(self) -> None:
        check(self, "min_chars", self.min_chars >= 0, "0 or more")
        check(self, "max_chars", self.max_chars > 0, "positive")
        if self.min_chars > self.max_chars:
            raise ConfigError(f"min_chars ({self.min_chars}) is above max_chars ({self.max_chars})")


@dataclass(frozen=True)
class WordLengthRule:
    """`[filters.word_length]`: mean characters per whitespace-separated word (Gopher: 3-10).

    Korean eojeol are shorter than English words (two or three syllables is common), hence the lower
    bound; a long run with no spaces (URLs, base64, minified code) breaks the upper one."""

    enabled: bool = True
    """False switches the rule off."""
    min_mean_chars: float = 1.5
    """Lower bound: a run of one-letter words (가 나 다 라 ...) is a list, not prose."""
    max_mean_chars: float = 12.0
    """Upper bound for English and other documents."""
    max_mean_chars_ko: float = 24.0
    """Upper bound for Korean documents: online Korean often drops spaces (볼만하긴한데다보고나면좀찜찜한느낌)."""

    def __post_init__(self) -> None:
        check(self, "min_mean_chars", self.min_mean_chars >= 0, "0 or more")
        check(self, "max_mean_chars", self.max_mean_chars > 0, "positive")
        check(self, "max_mean_chars_ko", self.max_mean_chars_ko > 0, "positive")
        if self.min_mean_chars > min(self.max_mean_chars, self.max_mean_chars_ko):
            raise ConfigError("min_mean_chars is above max_mean_chars")


@dataclass(frozen=True)
class SymbolRule:
    """`[filters.symbols]`: share of non-space characters that are symbols or punctuation other than
    prose punctuation (. , ! ? ' " ( ) : ; - ~ … and their typographic forms): #, @, *, |, emoji..."""

    enabled: bool = True
    """False switches the rule off."""
    max_ratio: float = 0.25
    """Most such characters, as a share of non-space characters."""

    def __post_init__(self) -> None:
        check_shares(self, "max_ratio")


@dataclass(frozen=True)
class DigitRule:
    """`[filters.digits]`: share of non-space characters that are digits (tables, listings)."""

    enabled: bool = True
    """False switches the rule off."""
    max_ratio: float = 0.3
    """Most digits, as a share of non-space characters."""

    def __post_init__(self) -> None:
        check_shares(self, "max_ratio")


@dataclass(frozen=True)
class RepeatedLinesRule:
    """`[filters.repeated_lines]`: Gopher's duplicate-line rules (Rae et al. 2021, table A1)."""

    enabled: bool = True
    """False switches the rule off."""
    max_duplicate_lines: float = 0.3
    """Most lines (as a share of all lines) that repeat an earlier line."""
    max_duplicate_line_chars: float = 0.2
    """Most characters (as a share) in lines that repeat an earlier line."""

    def __post_init__(self) -> None:
        check_shares(self, "max_duplicate_lines", "max_duplicate_line_chars")


@dataclass(frozen=True)
class RepeatedNgramsRule:
    """`[filters.repeated_ngrams]`: Gopher's repeated word n-gram rules; words split on whitespace,
    so they hold for Korean eojeol as for English words."""

    enabled: bool = True
    """False switches the rule off."""
    min_words: int = 50
    """Documents with fewer words are not judged (Gopher's minimum document length): repetition
    statistics are noise on a few sentences."""
    max_top_ngram_chars: tuple[float, ...] = (0.20, 0.18, 0.16)
    """For n = 2, 3, 4: most characters (share) covered by the most frequent n-gram."""
    max_duplicate_ngram_chars: tuple[float, ...] = (0.15, 0.14, 0.13, 0.12, 0.11, 0.10)
    """For n = 5..10: most characters (share) covered by n-grams that occur more than once."""

    def __post_init__(self) -> None:
        check(self, "min_words", self.min_words >= 0, "0 or more")
        check_shares(self, "max_top_ngram_chars", "max_duplicate_ngram_chars")
        if len(self.max_top_ngram_chars) > 3 or len(self.max_duplicate_ngram_chars) > 6:
            raise ConfigError("max_top_ngram_chars: give at most 3 top-n-gram (n=2..4) and 6 "
                              "duplicate-n-gram (n=5..10) limits")  # fmt: skip


@dataclass(frozen=True)
class ScriptRule:
    """`[filters.script]`: share of letters written in the scripts being trained on; a document
    without a single letter fails it."""

    enabled: bool = True
    """False switches the rule off."""
    scripts: tuple[str, ...] = ("hangul", "latin")
    """Scripts that count: hangul, latin, han, kana, cyrillic, greek, arabic, other."""
    min_ratio: float = 0.5
    """Fewest letters (as a share of all letters) in those scripts."""

    def __post_init__(self) -> None:
        check_shares(self, "min_ratio")
        unknown = sorted(set(self.scripts) - set(SCRIPTS))
        if unknown:
            raise ConfigError(f"scripts: unknown {', '.join(unknown)}; known: {', '.join(SCRIPTS)}")


@dataclass(frozen=True)
class FilterConfig:
    """`[filters]`: rule-based quality filters, in this order; a document is dropped by the first
    rule it fails, and the drop is counted under that rule's name."""

    length: LengthRule = field(default_factory=LengthRule)
    """`[filters.length]`."""
    script: ScriptRule = field(default_factory=ScriptRule)
    """`[filters.script]`."""
    word_length: WordLengthRule = field(default_factory=WordLengthRule)
    """`[filters.word_length]`."""
    symbols: SymbolRule = field(default_factory=SymbolRule)
    """`[filters.symbols]`."""
    digits: DigitRule = field(default_factory=DigitRule)
    """`[filters.digits]`."""
    repeated_lines: RepeatedLinesRule = field(default_factory=RepeatedLinesRule)
    """`[filters.repeated_lines]`."""
    repeated_ngrams: RepeatedNgramsRule = field(default_factory=RepeatedNgramsRule)
    """`[filters.repeated_ngrams]`."""


@dataclass(frozen=True)
class DedupConfig:
    """`[dedup]`: exact and near-duplicate removal; the first document seen is kept."""

    exact: bool = True
    """Drop a document whose normalized text (NFC, casefold, no punctuation or spaces) was seen."""
    near: bool = True
    """Drop a document whose MinHash Jaccard estimate with a kept one reaches `threshold`."""
    threshold: float = 0.8
    """Jaccard similarity of character shingles from which documents are near duplicates."""
    shingle_chars: int = 5
    """Characters per shingle, of the normalized text."""
    num_perm: int = 128
    """MinHash permutations; LSH bands and rows are chosen for the threshold from these."""
    seed: int = 0
    """Seeds the MinHash permutations."""

    def __post_init__(self) -> None:
        check(self, "threshold", 0 < self.threshold <= 1, "in (0, 1]")
        check(self, "shingle_chars", self.shingle_chars > 0, "positive")
        check(self, "num_perm", 2 <= self.num_perm <= 1024, "between 2 and 1024")


@dataclass(frozen=True)
class BenchmarkConfig:
    """`[[decontaminate.benchmarks]]`: a benchmark's test items."""

    name: str
    """Name in reports."""
    files: tuple[str, ...]
    """Files, folders or glob patterns, relative to `decontaminate.root`."""
    fields: tuple[str, ...] = ("text",)
    """Fields holding item text; dotted paths and `*` as in --text-field. Each string is an item."""

    def __post_init__(self) -> None:
        check(self, "name", bool(self.name), "a non-empty name")
        check(self, "files", bool(self.files), "a non-empty list")


@dataclass(frozen=True)
class DecontaminateConfig:
    """`[decontaminate]`: drop training documents that share a normalized window with a benchmark."""

    enabled: bool = True
    """False skips decontamination (as does an empty benchmark list)."""
    window_chars: int = 50
    """Characters per window of normalized text, taken at every offset (EXAONE 3.5: 50, stride 1)."""
    short_item_min_chars: int = 0
    """Items shorter than a window have none; when > 0, such an item of at least this many
    normalized characters still removes a document whose whole normalized text equals it."""
    root: str = "."
    """Folder the benchmark files are relative to; itself relative to the config file's folder."""
    benchmarks: tuple[BenchmarkConfig, ...] = ()
    """The benchmarks, in the order drops are credited to them (a document matching two counts
    under the first)."""

    def __post_init__(self) -> None:
        check(self, "window_chars", self.window_chars >= 8, "at least 8")
        check(self, "short_item_min_chars", self.short_item_min_chars >= 0, "0 or more")
        check_unique_names(self.benchmarks, "benchmarks")


@dataclass(frozen=True)
class ShardConfig:
    """`[shards]`: how tokenized documents are cut into Parquet shards."""

    text_bytes_per_shard: int = 64_000_000
    """A shard is closed once its documents hold this many UTF-8 bytes of text."""
    documents_per_shard: int = 1_000_000
    """...or this many documents, whichever comes first."""
    compression: str = "zstd"
    """Parquet compression: zstd, snappy, gzip or none."""

    def __post_init__(self) -> None:
        # list<int32> offsets: a shard must stay under 2^31 tokens
        bytes_ok = 0 < self.text_bytes_per_shard <= 2_000_000_000
        check(self, "text_bytes_per_shard", bytes_ok, "between 1 and 2e9")
        check(self, "documents_per_shard", self.documents_per_shard > 0, "positive")
        check(self, "compression", self.compression in COMPRESSIONS, "zstd, snappy, gzip or none")


@dataclass(frozen=True)
class PrepareConfig:
    """The whole `prepare.toml`."""

    sources: tuple[SourceConfig, ...] = ()
    """Named sources, read besides the INPUTs given on the command line."""
    clean: CleanConfig = field(default_factory=CleanConfig)
    """`[clean]`."""
    filters: FilterConfig = field(default_factory=FilterConfig)
    """`[filters.<rule>]`."""
    dedup: DedupConfig = field(default_factory=DedupConfig)
    """`[dedup]`."""
    decontaminate: DecontaminateConfig = field(default_factory=DecontaminateConfig)
    """`[decontaminate]`; no benchmarks by default (recipes/prepare-shared.toml lists the shared ones)."""
    shards: ShardConfig = field(default_factory=ShardConfig)
    """`[shards]`."""

    def __post_init__(self) -> None:
        check_unique_names(self.sources, "sources")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def settings(self) -> dict:
        """to_dict() without where files lie (sources' paths, the benchmark root): what decides a
        dataset's content besides the files' names and bytes, which fingerprints add themselves."""
        table = self.to_dict()
        for source in table["sources"]:
            del source["paths"]
        del table["decontaminate"]["root"]
        return table

    @classmethod
    def from_dict(cls, data: dict, where: str = "") -> PrepareConfig:
        """From a TOML document's tables; ConfigError naming the key path of any mistake."""
        return build(cls, data, where)


def load_config(path: str | Path | None) -> PrepareConfig:
    """Read a prepare.toml (None: the defaults); relative paths in it become absolute."""
    if path is None:
        return PrepareConfig()
    from orchestration.core.config import read_toml

    path = Path(path)
    data = read_toml(path, "config")
    try:
        config = PrepareConfig.from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return resolve_paths(config, path.resolve().parent)


def resolve_paths(config: PrepareConfig, base: Path) -> PrepareConfig:
    """The config with source paths and the benchmark root made absolute against `base`."""
    sources = tuple(
        dataclasses.replace(s, paths=tuple(str(base / p) for p in s.paths)) for s in config.sources
    )
    root = str((base / config.decontaminate.root).resolve())
    return dataclasses.replace(
        config, sources=sources, decontaminate=dataclasses.replace(config.decontaminate, root=root)
    )
