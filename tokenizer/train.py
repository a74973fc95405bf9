"""Train the Korean/English byte-level BPE: read, sample, mark morphemes, learn merges, assemble.

Two engines learn the merges: `hf` (tokenizers' BpeTrainer, fed text whose Kiwi boundaries are
marked) and `kiwi` (kiwipiepy's own morpheme-aware bpe_trainer). Both end in the same assembled
tokenizer: the hanyeong special block, the same pre-tokenizer, rank-ordered merges.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hanyeong.console import note
from hanyeong.errors import ConfigError, DataError
from tokenizer.corpus import FileReport, TextFields, read_corpus, source_namer
from tokenizer.morphemes import MorphemeCache, MorphemeMarker, count_runs, parse_categories
from tokenizer.sampling import SampleConfig, draw_sample
from tokenizer.specials import SPECIAL_BLOCK, special_tokens, tokenizer_config

ENGINES = ("hf", "kiwi")
# Measured on held-out kinds of text (benchmarks/tokenizer.py): cutting verb and adjective stems
# from their endings (E) costs 5-7 points of Korean tokens per word against plain BBPE (reviews and
# reports -13.6% against -19.3% at Korean share 0.5) and misses the Korean goal; keeping words seen
# 50+ times whole (keep_whole) costs 1.5-2. The default is plain BBPE; `--morphemes E` is there.
DEFAULT_MORPHEMES: tuple[str, ...] = ()


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hanyeong"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained vocabulary."""

    vocab_size: int = 102_400
    """Ids in the vocabulary, special block included."""
    engine: str = "hf"
    """'hf' (tokenizers BpeTrainer + injected Kiwi boundaries) or 'kiwi' (kiwipiepy bpe_trainer)."""
    morphemes: tuple[str, ...] = DEFAULT_MORPHEMES
    """Kiwi tag prefixes cut from their neighbours before counting; () trains plain BBPE."""
    keep_whole: int | None = None
    """Hangul runs seen at least this often in the sample are not cut: frequent words may become
    one token, the long tail is cut at morphemes. None cuts every run."""
    digits: str = "1"
    """'1': every digit its own token (EXAONE); '3': up to three digits (Llama 3). Measured: '3'
    compresses ~1-4% better but splits 6% of numbers across place-value groups (123|4); '1' never does."""
    min_frequency: int = 2
    """A pair seen fewer times is never merged."""
    special_block: int = SPECIAL_BLOCK
    """Ids reserved at the start for special tokens."""
    sample: SampleConfig = field(default_factory=SampleConfig)
    text_fields: tuple[str, ...] = ("text",)
    """Record fields holding text (dotted paths) for jsonl/json/csv/parquet inputs."""
    exclude: tuple[str, ...] = ()
    """Glob patterns of input files to leave out (held-out sources, say)."""

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.keep_whole is not None and self.keep_whole < 1:
            raise ConfigError(f"keep_whole must be a positive count, got {self.keep_whole}")
        if self.keep_whole is not None and (not self.morphemes or self.engine != "hf"):
            raise ConfigError("keep_whole only applies to morpheme cuts of the hf engine (--morphemes E)")
        if self.digits not in ("1", "3"):
            raise ConfigError(f"digits must be '1' or '3', got {self.digits!r}")
        minimum = self.special_block + 256
        if self.vocab_size < minimum:
            raise ConfigError(f"vocab_size must be at least {minimum} (special block + 256 bytes)")
        if self.engine == "kiwi":
            kiwi_options = {"J", "E", "VCP", "XSV", "XSA"}
            if not set(self.morphemes) <= kiwi_options:
                raise ConfigError(f"engine 'kiwi' can only cut {sorted(kiwi_options)}, got {list(self.morphemes)}")


@dataclass
class TrainResult:
    out_dir: Path
    report: dict


class _Clock:
    """Wall time per named phase, for the report."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self._start = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = round(now - self._start, 2)
        self._start = now


def _peak_rss_mb() -> float:
    """This process's peak resident memory in MiB.

    Linux: VmHWM of /proc/self/status, the peak of this program's own memory. ru_maxrss would
    carry the parent's RSS at fork across exec, so a training launched by a big process (a
    notebook, a benchmark holding its texts) would report its parent's size.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)  # kB
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB elsewhere
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20, 1)


def _warn_about_balance(stats, sample_config: SampleConfig) -> None:
    if sample_config.ko_share is not None and not stats.share_applied:
        print("note: --ko-share not applied: the corpus has only one side (Korean or not)", file=sys.stderr)
    left_out = sum(stats.not_sampled.values())
    if not sample_config.max_bytes and left_out > sum(stats.train.values()):
        why = [f"Korean share {sample_config.ko_share}"] if sample_config.ko_share is not None else []
        why += [f"per-source cap {sample_config.source_cap}"] if sample_config.source_cap is not None else []
        print(
            f"note: sampling ({', '.join(why)}) left out {left_out / 1e6:,.1f} MB, more than it kept; "
            "--natural-mix --no-source-cap keeps everything",
            file=sys.stderr,
        )


def read_documents(inputs: list[str], fields: TextFields, workers: int, progress: bool, exclude=()):
    """Every document of the inputs, the source of each (`source_namer`), and a report per file."""
    documents: list[str] = []
    sources: list[str] = []
    files: list[FileReport] = []
    name = source_namer(inputs)
    for docs, report in read_corpus(inputs, fields, workers=workers, progress=progress, exclude=exclude):
        documents.extend(docs)
        sources.extend([name(Path(report.path))] * len(docs))
        files.append(report)
        if report.error:
            note(f"skipped {report.path}: {report.error}")  # the read bar is live: above it
    if not documents:
        raise DataError("no readable text in the inputs (see the skipped files above)")
    return documents, sources, files


def learn_vocab_hf(texts: list[str], config: TrainConfig, marker, progress: bool) -> dict[str, int]:
    """tokenizers' BpeTrainer; morpheme boundaries arrive as marks the training pre-tokenizer cuts."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from tokenizer.pipeline import pre_tokenizer, training_pre_tokenizer

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = training_pre_tokenizer(config.digits) if marker else pre_tokenizer(config.digits)
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        special_tokens=special_tokens(config.special_block),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    stream = (marker.mark(t) for t in texts) if marker else texts
    tokenizer.train_from_iterator(stream, trainer, length=len(texts))
    return tokenizer.get_vocab(with_added_tokens=True)


def learn_vocab_kiwi(texts: list[str], config: TrainConfig, workers: int, progress: bool) -> dict[str, int]:
    """kiwipiepy's bpe_trainer, which runs Kiwi on every sentence itself (slow, for comparison)."""
    from kiwipiepy import Kiwi
    from kiwipiepy.bpe_trainer import train_bpe_tokenizer

    cuts = set(config.morphemes)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kiwi.json"
        train_bpe_tokenizer(
            str(path),
            texts,
            vocab_size=config.vocab_size - config.special_block,
            min_pair_frequency=config.min_frequency,
            pretokenize_j="J" in cuts,
            pretokenize_e="E" in cuts,
            pretokenize_vcp="VCP" in cuts,
            pretokenize_xsv=bool(cuts & {"XSV", "XSA"}),
            kiwi=Kiwi(num_workers=workers) if cuts else None,
            max_digit_length=int(config.digits),
            num_workers=workers,
            show_progress=progress,
        )
        learned = json.loads(path.read_text(encoding="utf-8"))["model"]["vocab"]
    # Shift kiwi's ids (bytes first, then merges in order) past the special block.
    specials = special_tokens(config.special_block)
    vocab = {token: i for i, token in enumerate(specials)}
    for token, i in sorted(learned.items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    return vocab


def _mark_morphemes(texts: list[str], config: TrainConfig, cache_dir: Path | None, workers: int, progress: bool):
    import kiwipiepy

    cache_path = cache_dir / f"kiwi-{kiwipiepy.__version__}-runs.parquet" if cache_dir else None
    cache = MorphemeCache(cache_path)
    runs = count_runs(texts)
    analysed = cache.analyse(runs, workers=workers, progress=progress)
    cache.save()
    whole = frozenset(r for r, n in runs.items() if n >= config.keep_whole) if config.keep_whole else frozenset()
    marker = MorphemeMarker(cache, parse_categories(config.morphemes), whole)
    stats = {
        "distinct_runs": len(runs),
        "run_occurrences": sum(runs.values()),
        "analysed_now": analysed,
        "from_cache": len(runs) - analysed,
        "runs_with_cuts": sum(1 for r in runs if r in marker.marked),
        "runs_kept_whole": len(whole),
    }
    return marker, stats


def train_tokenizer(
    inputs: list[str],
    out_dir: str | Path,
    config: TrainConfig | None = None,
    workers: int = 1,
    progress: bool = False,
    cache_dir: Path | None = None,
    compare: list[str] = (),
) -> TrainResult:
    """Train on `inputs` (files or folders) and write tokenizer.json, tokenizer_config.json, reports."""
    from tokenizer.bbpe import BBPETokenizer
    from tokenizer.pipeline import assemble
    from tokenizer.report import compression_report, write_report

    config = config or TrainConfig()
    out_dir = Path(out_dir)
    clock = _Clock()
    documents, sources, files = read_documents(
        inputs, TextFields.parse(config.text_fields), workers, progress, config.exclude
    )
    clock.lap("read")
    sample = draw_sample(documents, config.sample, sources)
    del documents, sources
    if not sample.train:
        raise DataError("nothing left to train on after sampling (check --ko-share and --max-bytes)")
    _warn_about_balance(sample.stats, config.sample)
    clock.lap("sample")

    morpheme_stats = None
    if config.engine == "hf":
        marker = None
        if config.morphemes:
            marker, morpheme_stats = _mark_morphemes(sample.train, config, cache_dir, workers, progress)
            clock.lap("morphemes")
        vocab = learn_vocab_hf(sample.train, config, marker, progress)
    else:
        vocab = learn_vocab_kiwi(sample.train, config, workers, progress)
    clock.lap("merges")

    if len(vocab) < config.vocab_size:
        merges = len(vocab) - config.special_block - 256
        raise DataError(
            f"the corpus supports only {merges:,} merges, a vocabulary of {len(vocab):,} of the "
            f"{config.vocab_size:,} requested; lower --vocab-size to {len(vocab)} or give more text"
        )
    specials = special_tokens(config.special_block)
    tokenizer = BBPETokenizer(assemble(vocab, specials, config.digits), tokenizer_config())
    clock.lap("assemble")

    report = {
        "config": asdict(config),
        "vocab_size": tokenizer.vocab_size,
        "merges": tokenizer.vocab_size - config.special_block - 256,
        "files": [f.to_dict() for f in files],
        "files_skipped": sum(1 for f in files if f.error and not f.documents),
        "records_skipped": sum(f.skipped_records for f in files),
        "sample": sample.stats.to_dict(),
        "morphemes": morpheme_stats,
    }
    texts = [(f"held-out {lang}", lang, docs) for lang, docs in sorted(sample.heldout.items()) if lang != "other"]
    report["compression"] = compression_report(tokenizer, texts, compare=compare, workers=workers)
    clock.lap("report")
    report["seconds"] = clock.phases
    report["peak_rss_mb"] = _peak_rss_mb()

    tokenizer.save(out_dir)
    write_report(out_dir, report)
    return TrainResult(out_dir, report)
