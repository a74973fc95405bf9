"""Tokenizer benchmarks on ../shared/data: training speed and memory, compression against peers,
the Korean-share / morpheme / English trade-off, and encoding throughput against tiktoken.

    python benchmarks/tokenizer.py all            # everything (about 75 minutes on 2 cores)
    python benchmarks/tokenizer.py train compare  # a subset
    python benchmarks/tokenizer.py report         # rewrite the .md and the trade-off plot only

Every training run is a fresh `hanyeong tokenizer train` process (cold Kiwi cache unless said),
so its wall time and peak memory are what a user sees. Results go to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hardware import cpu_name, machine_name  # benchmarks/hardware.py

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("HANYEONG_SHARED", REPO.parent / "shared"))
DATA, PEERS = SHARED / "data", SHARED / "peers"
RESULTS = REPO / "benchmarks" / "results"
WORK = Path(os.environ.get("HANYEONG_BENCH_WORK", tempfile.gettempdir())) / "hanyeong-bench"

# Training corpus: the Korean and English text of ../shared/data, less the sources of the modern
# held-out set below (the --exclude globs).
TRAIN_INPUTS = [DATA / "ko", DATA / "en", DATA / "parallel"]
TRAIN_FIELDS = [
    "text", "review", "content", "comments", "sentence1", "sentence2", "premise", "hypothesis",
    "data.paragraphs.context",
    "법령.조문.조문단위.조문내용", "법령.조문.조문단위.항.항내용", "법령.조문.조문단위.항.호.호내용",
    "법령.조문.조문단위.항.호.목.목내용", "법령.부칙.부칙단위.부칙내용", "법령.제개정이유.제개정이유내용",
    "법령.개정문.개정문내용",
]  # fmt: skip
# Held-out set 1, "chat & benchmarks": sources outside ko/, en/ and parallel/ (chat and instruction
# answers, QA, benchmark text), one kind per language.
EVAL_KO = [
    ("sft/ko/vaiv_instructions_all.jsonl.gz", ["instruction", "input", "output"]),
    ("sft/ko/humane_right_copus_v1.jsonl.gz", ["질의", "상담례, 결정례 기반 답변"]),
    ("benchmarks/kobest/BoolQ/test.tsv", ["Text", "Question"]),
    ("benchmarks/komt-bench/reference_answer_ko_gpt-4.jsonl", ["choices.turns"]),
    ("preference/ko/vaiv/translation_train.json.gz", ["prompt", "chosen"]),
]
EVAL_EN = [
    ("preference/hh-rlhf/harmless-base/test.jsonl.gz", ["chosen"]),
    ("benchmarks/alpaca_eval/gpt4_model_outputs.json", ["instruction", "output"]),
    ("benchmarks/mt-bench/reference_answer_gpt-4.jsonl", ["choices.turns"]),
    ("benchmarks/gsm8k/test.jsonl", ["question", "answer"]),
    ("benchmarks/truthfulqa/TruthfulQA.csv", ["Question", "Best Answer", "Correct Answers"]),
]
# Held-out set 2, "modern prose": whole sources taken out of the training folders, by kind. The
# training run excludes every one of them, so training and held-out text never share a source.
MODERN = {
    ("news", "en"): [("parallel/ntrex/newstest2019-src.eng.txt", []),  # WMT 2019 news (BBC and others)
                     ("parallel/korean-english-news-v1/*.en", [])],  # Korean newspapers, English side
    ("encyclopedic", "en"): [("en/wikitext-2/*.txt.gz", [])],  # Wikipedia good/featured articles
    ("technical", "en"): [("en/rust-rfcs/rust_rfcs.jsonl.gz", ["text"])],  # design documents
    ("conversational", "en"): [("en/nltk/webtext.jsonl.gz", ["text"])],  # forums, overheard talk, scripts
    ("news", "ko"): [("parallel/ntrex/newstest2019-ref.kor.txt", []),  # WMT 2019 news, translated
                     ("parallel/korean-english-news-v1/*.ko", [])],  # Korean newspapers
    # A genre of its own: a headline is mostly names (celebrities, shows) and brackets; it behaves
    # nothing like news prose (measured: -0.5% against -19% on articles), so it is reported apart.
    ("headlines", "ko"): [("ko/korean-hate-speech/news_title/*.txt", [])],  # entertainment news
    ("encyclopedic", "ko"): [("ko/korquad/*.json.gz", ["data.paragraphs.context"])],  # Korean Wikipedia
    ("technical", "ko"): [("ko/react-docs/*.jsonl.gz", ["text"]), ("ko/vue-docs/*.jsonl.gz", ["text"])],
    ("conversational", "ko"): [("ko/korean-hate-speech/labeled/*", ["comments"]),  # news comments
                               ("ko/korean-hate-speech/unlabeled/*", []),
                               ("sft/ko/ChatbotData.csv", ["Q", "A"])],  # everyday chit-chat
    ("reviews & reports", "ko"): [("ko/klue/klue-nli-v1.1_dev.json.gz", ["premise", "hypothesis"]),  # reviews, policy news, wiki
                                  ("ko/klue/klue-sts-v1.1_dev.json.gz", ["sentence1", "sentence2"])],
}  # fmt: skip
# The folders (or files) of those sources, left out of training whole.
HELD_OUT_SOURCES = ["parallel/ntrex", "parallel/korean-english-news-v1", "en/wikitext-2",
                    "en/rust-rfcs", "en/nltk/webtext.jsonl.gz", "ko/korquad", "ko/react-docs", "ko/vue-docs",
                    "ko/korean-hate-speech", "ko/klue"]  # fmt: skip
EXCLUDE = [f"*/{s}" if s.endswith(".gz") else f"*/{s}/*" for s in HELD_OUT_SOURCES]
KIND_MAX_BYTES = 3_000_000  # a kind's text is thinned evenly to about this much (the measure is stable well before)
GOAL_KO, GOAL_EN = -0.15, 0.03  # vs EXAONE 3.5: Korean at least 15% fewer tokens/word, English at most 3% more


def machine() -> dict:
    cpu = cpu_name()
    memory = ""
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        kb = int(re.search(r"MemTotal:\s*(\d+)", meminfo.read_text()).group(1))
        memory = f"{kb / 2**20:.0f} GiB"
    import kiwipiepy
    import tiktoken
    import tokenizers

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory": memory,
        "os": platform.platform(),
        "python": platform.python_version(),
        "tokenizers": tokenizers.__version__,
        "kiwipiepy": kiwipiepy.__version__,
        "tiktoken": tiktoken.__version__,
    }


def detokenize_wikitext(line: str) -> str:
    """WikiText's tokenized form back to prose: `a @-@ b` -> `a-b`, `word , word` -> `word, word`."""
    line = re.sub(r" @([-,.])@ ", r"\1", line.strip())
    line = re.sub(r" ([.,;:!?)\]}]|'s|n't|'re|'ve|'d|'ll|'m)(?=\s|$)", r"\1", line)
    return re.sub(r"([(\[{]) ", r"\1", line)


def _read_kind(specs: list[tuple[str, list[str]]]) -> list[str]:
    from tokenizer.corpus import TextFields, read_file

    docs: list[str] = []
    for pattern, fields in specs:
        paths = sorted(DATA.glob(pattern))
        if not paths:
            raise SystemExit(f"{pattern}: no such file under {DATA}")
        for path in paths:
            found, report = read_file(path, TextFields.parse(fields or ["text"]))
            if not found:
                raise SystemExit(f"{path}: {report.error}")
            if "wikitext" in pattern:  # headings dropped; <unk> marks a rare word the set removed: drop it too
                found = [detokenize_wikitext(d.replace(" <unk>", "")) for d in found if not d.strip().startswith("=")]
            docs.extend(found)
    size = sum(len(d.encode()) for d in docs)
    stride = -(-size // KIND_MAX_BYTES)
    return docs[::stride] if stride > 1 else docs


def load_eval() -> list[tuple[str, str, list[str]]]:
    """(name, language, documents) of every held-out kind: set 1 (chat & benchmarks), set 2 (modern)."""
    from tokenizer.corpus import TextFields, read_file

    texts = []
    for language, spec in (("ko", EVAL_KO), ("en", EVAL_EN)):
        docs: list[str] = []
        for path, fields in spec:
            found, report = read_file(DATA / path, TextFields.parse(fields))
            if not found:
                raise SystemExit(f"{path}: {report.error}")
            docs.extend(found)
        texts.append((f"chat & benchmarks ({language})", language, docs))
    for (kind, language), specs in MODERN.items():
        texts.append((f"{kind} ({language})", language, _read_kind(specs)))
    return texts


def train(name: str, *flags: str, inputs=None, cold: bool = True, reuse: bool = False) -> dict:
    """One `hanyeong tokenizer train` in a fresh process; returns its report plus wall time.

    reuse: keep an earlier run of the same command in WORK (sweeps resume where they stopped).
    """
    out = WORK / name
    cache = WORK / ("cache-" + name if cold else "cache-shared")
    fields = [a for f in TRAIN_FIELDS for a in ("--text-field", f)]
    excluded = [a for pattern in EXCLUDE for a in ("--exclude", pattern)]
    command = [sys.executable, "-m", "orchestration.cli", "tokenizer", "train", *map(str, inputs or TRAIN_INPUTS),
               "--out", str(out), "--cache-dir", str(cache), "--quiet", *fields, *excluded, *flags]  # fmt: skip
    stamp = out / "command.json"
    if reuse and stamp.exists() and json.loads(stamp.read_text()) == command[1:]:
        report = json.loads((out / "report.json").read_text())
        print(f"  {name}: reused ({report['wall_seconds']:.0f} s)", flush=True)
        return report
    if cold:
        subprocess.run(["rm", "-rf", str(cache)], check=True)
    start = time.perf_counter()
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if run.returncode != 0:
        raise SystemExit(f"{name} failed:\n{run.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    report["wall_seconds"] = round(wall, 1)
    report["load_1min"] = round(os.getloadavg()[0], 2)  # above the core count, other work shared the run
    report["dir"] = str(out)
    (out / "report.json").write_text(json.dumps(report, ensure_ascii=False))
    stamp.write_text(json.dumps(command[1:]))
    print(f"  {name}: {wall:.0f} s, peak {report['peak_rss_mb']:.0f} MB", flush=True)
    return report


def held_out(tokenizer_dir: str, texts, baseline) -> dict:
    """Tokens/word on every held-out kind, and relative to EXAONE 3.5."""
    from tokenizer.metrics import measure
    from tokenizer.report import as_encoder

    encoder = as_encoder(tokenizer_dir)
    out = {}
    for name, language, docs in texts:
        tpw = measure(encoder, docs).tokens_per_word
        out[name] = {"language": language, "tokens_per_word": round(tpw, 4), "vs_exaone": round(tpw / baseline[name] - 1, 4)}
    return out


def worst(row: dict, language: str) -> float:
    """The kind of `language` where a tokenizer does worst against EXAONE 3.5 (the goal holds on every one)."""
    return max(r["vs_exaone"] for r in row.values() if r["language"] == language)


def meets_goals(row: dict) -> bool:
    return worst(row, "ko") <= GOAL_KO and worst(row, "en") <= GOAL_EN


def exaone_baseline(texts) -> dict:
    from tokenizer.metrics import measure
    from tokenizer.peers import load_peer

    exaone = load_peer(PEERS / "exaone-3.5")
    return {name: measure(exaone, docs).tokens_per_word for name, _, docs in texts}


def bench_train(texts, baseline, results: dict) -> None:
    """Speed and memory of the defaults (plain BBPE) against morpheme-aware training on the same sample."""
    print("train: defaults, --morphemes E (cold and warm Kiwi cache), --morphemes E --keep-whole 50", flush=True)
    runs = {"defaults (plain BBPE, no cuts)": train("ours"), "--morphemes E (cold cache)": train("ours-E", "--morphemes", "E")}
    shutil.copytree(WORK / "cache-ours-E", WORK / "cache-shared", dirs_exist_ok=True)
    runs["--morphemes E (warm cache)"] = train("ours-E-warm", "--morphemes", "E", cold=False)
    runs["--morphemes E --keep-whole 50 (warm cache)"] = train("ours-E-kw50", "--morphemes", "E", "--keep-whole", "50", cold=False)
    results["train"] = {label: train_row(report, texts, baseline) for label, report in runs.items()}


def bench_kiwi(texts, baseline, results: dict) -> None:
    """kiwipiepy's own morpheme-aware trainer on the same sample (slow: ~10 minutes a run)."""
    print("kiwi: kiwipiepy bpe_trainer with the same cuts", flush=True)
    runs = {"kiwipiepy bpe_trainer, e": train("kiwi-e", "--engine", "kiwi", "--morphemes", "E"),
            "kiwipiepy bpe_trainer, j+e": train("kiwi-je", "--engine", "kiwi", "--morphemes", "J,E")}  # fmt: skip
    results["kiwi"] = {label: train_row(report, texts, baseline) for label, report in runs.items()}


def train_row(report: dict, texts, baseline) -> dict:
    kinds = held_out(report["dir"], texts, baseline)
    return {
        "wall_seconds": report["wall_seconds"],
        "load_1min": report.get("load_1min"),
        "phases": report["seconds"],
        "peak_rss_mb": report["peak_rss_mb"],
        "train_mb": round(sum(report["sample"]["train"].values()) / 1e6, 1),
        "morphemes": report["morphemes"],
        "kinds": kinds,
        "worst_ko": worst(kinds, "ko"),
        "worst_en": worst(kinds, "en"),
        "sources": report["sample"].get("sources", {}),
    }


def bench_compare(texts, results: dict) -> None:
    """The default tokenizer against every peer on the held-out sources; a table and a plot."""
    from tokenizer.report import compression_report, plot

    print("compare: default tokenizer vs every peer", flush=True)
    ours = WORK / "ours"
    if not (ours / "tokenizer.json").exists():
        train("ours")
    peers = [str(PEERS / "exaone-3.5")] + sorted(str(p) for p in PEERS.iterdir() if p.is_dir() and p.name != "exaone-3.5")
    report = compression_report(str(ours), texts, compare=peers, workers=os.cpu_count() or 1)
    results["compare"] = report
    plot(report, RESULTS / "tokenizer-compression.png")


# (morpheme cuts, Korean share, per-source cap, keep-whole count); "none" is plain BBPE.
SWEEP = [
    ("none", 0.3, 0.25, None), ("none", 0.4, 0.25, None), ("none", 0.5, 0.25, None), ("none", 0.6, 0.25, None),
    ("none", 0.7, 0.25, None),
    ("E", 0.5, 0.25, None), ("E", 0.7, 0.25, None),
    ("E", 0.4, 0.25, 50), ("E", 0.5, 0.25, 50),
    ("none", 0.5, None, None), ("none", 0.5, 0.15, None),
    ("none", 0.35, 0.25, None), ("none", 0.3, None, None),
]  # fmt: skip


def sweep_flags(cuts: str, share: float, cap: float | None, keep_whole: int | None) -> list[str]:
    flags = ["--ko-share", str(share)]
    flags += ["--no-morphemes"] if cuts == "none" else ["--morphemes", cuts]
    flags += ["--no-source-cap"] if cap is None else ["--source-cap", str(cap)]
    flags += ["--keep-whole", str(keep_whole)] if keep_whole else []
    return flags


def bench_sweep(texts, baseline, results: dict) -> None:
    """Where the trade-off lies: morpheme cuts x Korean share x source cap -> every held-out kind."""
    print("sweep: morpheme cuts x Korean share x source cap (warm Kiwi cache; finished runs reused)", flush=True)
    rows = []
    for cuts, share, cap, keep_whole in SWEEP:
        name = f"sweep-{cuts.replace(',', '')}-{share}-cap{cap}" + (f"-kw{keep_whole}" if keep_whole else "")
        report = train(name, *sweep_flags(cuts, share, cap, keep_whole), cold=False, reuse=True)
        kinds = held_out(report["dir"], texts, baseline)
        rows.append({"morphemes": cuts, "ko_share": share, "source_cap": cap, "keep_whole": keep_whole,
                     "seconds": report["wall_seconds"], "train_mb": round(sum(report["sample"]["train"].values()) / 1e6, 1),
                     "kinds": kinds, "worst_ko": worst(kinds, "ko"), "worst_en": worst(kinds, "en")})  # fmt: skip
    results["sweep"] = rows
    plot_tradeoff(rows, RESULTS / "tokenizer-tradeoff.png")


def plot_tradeoff(rows: list[dict], path: Path) -> None:
    """Every held-out kind against the Korean share (plain BBPE, source cap 0.25; E cuts dashed):
    where each kind crosses its goal as the share moves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    for ax, language, goal in ((axes[0], "ko", GOAL_KO), (axes[1], "en", GOAL_EN)):
        kinds = [k for k, r in rows[0]["kinds"].items() if r["language"] == language]
        for i, kind in enumerate(kinds):
            color = f"C{i}"
            for cuts, style in (("none", "-o"), ("E", "--s")):
                group = sorted((r for r in rows if r["morphemes"] == cuts and r["source_cap"] == 0.25 and not r["keep_whole"]),
                               key=lambda r: r["ko_share"])  # fmt: skip
                if group:
                    ax.plot([r["ko_share"] for r in group], [100 * r["kinds"][kind]["vs_exaone"] for r in group], style,
                            color=color, label=kind.replace(f" ({language})", "") if cuts == "none" else None,
                            alpha=1.0 if cuts == "none" else 0.5, markersize=4)  # fmt: skip
        ax.axhline(100 * goal, color="grey", ls="--", label=f"goal ({100 * goal:+.0f}%)")
        ax.set_xlabel("Korean share of the training bytes")
        ax.set_ylabel(f"{'Korean' if language == 'ko' else 'English'} tokens/word vs EXAONE 3.5 (%)")
        ax.set_title(f"{'Korean' if language == 'ko' else 'English'} kinds (solid: no cuts; dashed: --morphemes E)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Held-out kinds against the Korean share, 102,400 ids, source cap 0.25 (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bench_memory(results: dict) -> None:
    """Peak memory against input size: quickstart (5 MB), everything but the statutes, everything."""
    print("memory: peak RSS against corpus size", flush=True)
    subsets = {
        "quickstart": [REPO / "data" / "quickstart"],
        "without statutes": [p for p in (DATA / "ko").iterdir() if p.name != "law"] + [DATA / "en", DATA / "parallel"],
        "all": TRAIN_INPUTS,
    }
    rows = []
    for name, inputs in subsets.items():
        vocab = ["--vocab-size", "16000"] if name == "quickstart" else []
        report = train(f"mem-{name.replace(' ', '-')}", *vocab, inputs=inputs, cold=False)
        read = sum(f["bytes"] for f in report["files"])
        rows.append({"inputs": name, "text_mb": round(read / 1e6, 1), "peak_rss_mb": report["peak_rss_mb"]})
    (a, b) = rows[1], rows[2]
    slope = (b["peak_rss_mb"] - a["peak_rss_mb"]) / (b["text_mb"] - a["text_mb"])
    results["memory"] = {"runs": rows, "mb_per_text_mb": round(slope, 2)}


def bench_digits(texts, results: dict) -> None:
    """The digit rule: tokens spent on numbers, and whether number tokens follow place value."""
    from tokenizer.report import as_encoder

    print("digits: individual vs up to three", flush=True)
    number = re.compile(r"\d+")
    out = {}
    for rule in ("1", "3"):
        report = train(f"digits-{rule}", "--digits", rule, cold=False, reuse=True)
        encoder = as_encoder(report["dir"])
        numbers = [m.group() for _, _, docs in texts for d in docs for m in number.finditer(d)]
        ids = encoder.encode_batch(numbers)
        table = encoder.token_bytes
        aligned = 0
        for text, seq in zip(numbers, ids):
            # Place-value aligned: no token spans a thousands-group boundary counted from the right
            # (1|234 is aligned, 123|4 is not); single digits always are.
            groups = {len(text) - 3 * k for k in range(1, len(text) // 3 + 1)}
            start, ok = 0, True
            for i in seq:
                end = start + len(table[i])
                ok &= not any(start < g < end for g in groups)
                start = end
            aligned += ok
        out[rule] = {
            "numbers": len(numbers),
            "tokens_per_number": round(sum(map(len, ids)) / len(numbers), 3),
            "place_value_aligned": round(aligned / len(numbers), 4),
        }
    results["digits"] = out


def bench_encode(texts, results: dict) -> None:
    """Encoding throughput: the trained tokenizer's HF batch API vs tiktoken on the exported ranks,
    on set 1 (the goal's text: many short documents) and per held-out kind (document length matters)."""
    print("encode: HF batch vs tiktoken", flush=True)
    from tokenizer.bbpe import BBPETokenizer
    from tokenizer.export import export_tiktoken, load_tiktoken_encoding

    if not (WORK / "ours" / "tokenizer.json").exists():
        train("ours")
    ours = BBPETokenizer.load(WORK / "ours")
    encoding = load_tiktoken_encoding(export_tiktoken(ours, WORK / "ours-tiktoken"))
    threads = os.cpu_count() or 1

    def timings(docs: list[str]) -> dict:
        megabytes = sum(len(d.encode()) for d in docs) / 1e6
        out = {"megabytes": round(megabytes, 2), "documents": len(docs)}
        for label, fn in (
            ("hf encode_batch_fast", lambda: ours.hf.encode_batch_fast(docs, add_special_tokens=False)),
            ("tiktoken encode_ordinary_batch", lambda: encoding.encode_ordinary_batch(docs, num_threads=threads)),
        ):
            fn()  # warm up
            best = min(_time(fn) for _ in range(3))
            out[label] = {"seconds": round(best, 3), "mb_per_s": round(megabytes / best, 2)}
        out["hf_time_over_tiktoken"] = round(out["hf encode_batch_fast"]["seconds"] / out["tiktoken encode_ordinary_batch"]["seconds"], 3)
        return out

    set1 = [d for name, _, ds in texts if name.startswith("chat & benchmarks") for d in ds]
    same = [e.ids for e in ours.hf.encode_batch(set1[:5000], add_special_tokens=False)] == encoding.encode_ordinary_batch(set1[:5000])
    results["encode"] = {"threads": threads, "set1": timings(set1), "identical_ids_first_5000": same,
                         "kinds": {name: timings(docs) for name, _, docs in texts}}  # fmt: skip


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def kinds_matrix(compare: dict) -> list[str]:
    """Tokens/word per held-out kind (columns) for ours and every peer (rows), and vs EXAONE 3.5."""
    names = [t["name"] for t in compare["texts"]]
    cell = {(r["tokenizer"], r["text"]): r["tokens_per_word"] for r in compare["results"]}
    tokenizers = list(dict.fromkeys(r["tokenizer"] for r in compare["results"]))
    exaone = next(t for t in tokenizers if "exaone" in t)
    lines = ["| tokenizer | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for tok in tokenizers:
        cells = []
        for name in names:
            value = cell[(tok, name)]
            cells.append(f"{value:.3f}" if tok == exaone else f"{value:.3f} ({value / cell[(exaone, name)] - 1:+.0%})")
        lines.append(f"| {tok} | " + " | ".join(cells) + " |")
    return lines


def kinds_row(kinds: dict) -> str:
    def mark(r):
        goal = GOAL_KO if r["language"] == "ko" else GOAL_EN
        return f"{r['vs_exaone']:+.1%}" + ("" if r["vs_exaone"] <= goal else " ✗")

    return " | ".join(mark(r) for r in kinds.values())


def write_markdown(results: dict) -> str:
    m = results["machine"]
    kinds = list(results["exaone"])
    lines = [
        "# Tokenizer benchmarks",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory']}; {m['os']}; Python {m['python']}, "
        f"tokenizers {m['tokenizers']}, kiwipiepy {m['kiwipiepy']}, tiktoken {m['tiktoken']}. "
        f"Run {results['date']} with `python benchmarks/tokenizer.py {' '.join(results['parts'])}`.",
        "",
        "Training corpus: the Korean and English text of `../shared/data` (ko/, en/, parallel/), less the "
        "sources of held-out set 2, which the training run excludes whole (`--exclude`): "
        + ", ".join(f"`{s}`" for s in HELD_OUT_SOURCES) + ".",
        "",
        "Held-out kinds (no source of any of them is trained on):",
        "",
        "- *chat & benchmarks* (set 1): Korean VAIV instructions, human-rights QA, KoBEST BoolQ, KoMT-Bench "
        "answers, VAIV translation pairs; English HH-RLHF, AlpacaEval outputs, MT-Bench answers, GSM8K, TruthfulQA.",
        "- set 2, modern prose by kind: *news* (English: WMT 2019 news, the English side of Korean newspapers; "
        "Korean: the Korean side of both), *headlines* (Korean entertainment-news headlines), *encyclopedic* (WikiText-2 valid/test "
        "articles, de-tokenized; KorQuAD 1.0 dev Wikipedia paragraphs), *technical* (Rust RFCs design "
        "documents; the React and Vue docs in Korean), *conversational* (NLTK web text: forums, overheard "
        "talk, scripts; Korean news comments and ChatbotData), *reviews & reports* (KLUE NLI/STS sentences: "
        "Airbnb reviews, policy news, Wikitree, Wikipedia). Each kind is thinned evenly to about "
        f"{KIND_MAX_BYTES / 1e6:.0f} MB.",
        "",
        "EXAONE 3.5 tokens/word: " + ", ".join(f"{k} {v:.3f}" for k, v in results["exaone"].items())
        + f". Goals on **every** kind: Korean {GOAL_KO:+.0%} or better, English {GOAL_EN:+.0%} or better "
        "(✗ marks a miss).",
        "",
    ]
    header = "| " + " | ".join(kinds) + " |"
    if "sweep" in results:
        lines += ["## Trade-off sweep", "", "![](tokenizer-tradeoff.png)", "",
                  "| cuts | Korean share | source cap | keep whole | trained MB | " + " | ".join(kinds) + " | every goal |",
                  "|---|---:|---:|---:|---:|" + "---:|" * len(kinds) + "---|"]  # fmt: skip
        for r in results["sweep"]:
            ok = r["worst_ko"] <= GOAL_KO and r["worst_en"] <= GOAL_EN
            lines.append(f"| {r['morphemes']} | {r['ko_share']} | {r['source_cap']} | {r['keep_whole'] or ''} | "
                         f"{r['train_mb']} | {kinds_row(r['kinds'])} | {'yes' if ok else ''} |")  # fmt: skip
        lines.append("")
    if "train" in results:
        rows = {**results["train"], **results.get("kiwi", {})}
        lines += ["## Training: speed, memory, compression", "",
                  "| run | wall s | load | phases (s) | peak MB | trained MB | " + " | ".join(kinds) + " |",
                  "|---|---:|---:|---|---:|---:|" + "---:|" * len(kinds)]  # fmt: skip
        for label, r in rows.items():
            phases = ", ".join(f"{k} {v}" for k, v in r["phases"].items())
            lines.append(f"| {label} | {r['wall_seconds']} | {r.get('load_1min', '')} | {phases} | {r['peak_rss_mb']:.0f} | "
                         f"{r['train_mb']} | {kinds_row(r['kinds'])} |")  # fmt: skip
        t = results["train"]
        plain, morph = t["defaults (plain BBPE, no cuts)"], t["--morphemes E (cold cache)"]
        stats = morph["morphemes"]
        lines += [
            "",
            f"- Morpheme-aware (`--morphemes E`, cold Kiwi cache) / plain HF wall time on the same sample: "
            f"**{morph['wall_seconds'] / plain['wall_seconds']:.2f}×** (goal ≤ 2×); peak memory "
            f"{max(r['peak_rss_mb'] for r in t.values()) / 1024:.2f} GiB at most (goal < 4 GiB). `load` is the "
            f"1-minute load average when the run ended ({m['cores']} cores).",
            f"- Kiwi work: {stats['run_occurrences']:,} Hangul runs, {stats['distinct_runs']:,} distinct, analysed "
            f"once in {morph['phases'].get('morphemes', 0)} s (counting, Kiwi on {m['cores']} threads, cache write); "
            f"{stats['runs_with_cuts']:,} runs get a cut.",
        ]
        if "kiwi" in results:
            kiwi = results["kiwi"]["kiwipiepy bpe_trainer, e"]
            lines.append(f"- kiwipiepy's trainer / ours with the same cuts (E): **{kiwi['wall_seconds'] / morph['wall_seconds']:.1f}×**.")
        ours = plain
        lines += ["", "Bytes read and sampled per source by the default run (the per-source cap at work):", "",
                  "| source (side) | read MB | sampled MB |", "|---|---:|---:|"]  # fmt: skip
        for name, row in sorted(ours["sources"].items(), key=lambda kv: -kv[1]["read"]):
            lines.append(f"| {name} | {row['read'] / 1e6:.1f} | {row['train'] / 1e6:.1f} |")
        lines.append("")
    if "compare" in results:
        lines += ["## Compression against every peer, per held-out kind", "",
                  "Tokens per word (vs EXAONE 3.5). ![](tokenizer-compression.png)", "",
                  *kinds_matrix(results["compare"]), ""]  # fmt: skip
    if "digits" in results:
        lines += ["## Digit rule", "", "| rule | numbers | tokens per number | place-value aligned |", "|---|---:|---:|---:|"]
        for rule, r in results["digits"].items():
            lines.append(f"| {rule} | {r['numbers']:,} | {r['tokens_per_number']} | {r['place_value_aligned']:.1%} |")
        lines.append("")
    if "memory" in results:
        lines += ["## Peak memory against input size", "", "| inputs | text MB | peak MB |", "|---|---:|---:|"]
        for r in results["memory"]["runs"]:
            lines.append(f"| {r['inputs']} | {r['text_mb']} | {r['peak_rss_mb']:.0f} |")
        lines += ["", f"Growth: about {results['memory']['mb_per_text_mb']} MB of memory per MB of input text.", ""]
    if "encode" in results:
        e, one = results["encode"], results["encode"]["set1"]
        lines += ["## Encoding throughput", "",
                  f"Set 1 (chat & benchmarks: {one['documents']:,} documents, {one['megabytes']} MB), {e['threads']} threads, "
                  "best of 3.", "", "| encoder | seconds | MB/s |", "|---|---:|---:|"]  # fmt: skip
        for label in ("hf encode_batch_fast", "tiktoken encode_ordinary_batch"):
            lines.append(f"| {label} | {one[label]['seconds']} | {one[label]['mb_per_s']} |")
        lines += ["", f"HF time / tiktoken time: **{one['hf_time_over_tiktoken']}** (goal ≤ 1.5); identical ids: "
                  f"{e['identical_ids_first_5000']}.", "",
                  "Per held-out kind: HF is faster on many short documents and several times slower on a few "
                  "long ones (web text's 6 documents of ~300 KB, whole technical pages); not investigated further.", "",
                  "| kind | documents | MB | HF MB/s | tiktoken MB/s | HF time / tiktoken |", "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        for name, k in e["kinds"].items():
            lines.append(f"| {name} | {k['documents']:,} | {k['megabytes']} | {k['hf encode_batch_fast']['mb_per_s']} | "
                         f"{k['tiktoken encode_ordinary_batch']['mb_per_s']} | {k['hf_time_over_tiktoken']} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parts = ["sweep", "train", "compare", "digits", "memory", "encode", "kiwi", "report"]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="*", default=["all"], help=f"any of {parts}, or all")
    args = parser.parse_args()
    chosen = [p for p in parts if p != "report"] if "all" in args.parts else args.parts
    if not DATA.is_dir():
        raise SystemExit(f"needs {DATA} (the shared corpora)")
    WORK.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    # Named by the kind of machine, not its (random, container) host name.
    host = machine_name()
    json_path = RESULTS / f"tokenizer-{host}.json"
    results = json.loads(json_path.read_text()) if json_path.exists() else {}
    texts = load_eval()
    if list(results.get("exaone", {})) != [name for name, _, _ in texts]:
        results = {}  # measured on other held-out kinds: nothing saved is comparable
    if chosen != ["report"]:  # a report rewrites the files; the runs keep their date and parts
        done = [p for p in results.get("parts", []) if p not in chosen]
        results.update({"machine": machine(), "date": time.strftime("%Y-%m-%d"), "parts": done + chosen})
    results["exaone"] = baseline = exaone_baseline(texts)
    steps = {
        "train": lambda: bench_train(texts, baseline, results),
        "kiwi": lambda: bench_kiwi(texts, baseline, results),
        # rewrite the markdown and the trade-off plot from the saved results
        "report": lambda: "sweep" in results and plot_tradeoff(results["sweep"], RESULTS / "tokenizer-tradeoff.png"),
        "compare": lambda: bench_compare(texts, results),
        "sweep": lambda: bench_sweep(texts, baseline, results),
        "digits": lambda: bench_digits(texts, results),
        "memory": lambda: bench_memory(results),
        "encode": lambda: bench_encode(texts, results),
    }
    for part in chosen:
        steps[part]()
        json_path.write_text(json.dumps(results, ensure_ascii=False, indent=1))
        (RESULTS / f"tokenizer-{host}.md").write_text(write_markdown(results))
    print(f"wrote {json_path} and .md")


if __name__ == "__main__":
    main()
