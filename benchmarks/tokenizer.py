"""Tokenizer benchmarks on ../shared/data: training speed and memory, compression against peers,
the Korean-share / morpheme / English trade-off, and encoding throughput against tiktoken.

    python benchmarks/tokenizer.py all            # everything (about an hour on 2 cores)
    python benchmarks/tokenizer.py train compare  # a subset

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

# Training corpus: the Korean + English text of ../shared/data (~183 MB once extracted).
TRAIN_INPUTS = [DATA / "ko", DATA / "en", DATA / "parallel"]
TRAIN_FIELDS = [
    "text", "review", "content", "comments", "sentence1", "sentence2", "premise", "hypothesis",
    "data.paragraphs.context",
    "법령.조문.조문단위.조문내용", "법령.조문.조문단위.항.항내용", "법령.조문.조문단위.항.호.호내용",
    "법령.조문.조문단위.항.호.목.목내용", "법령.부칙.부칙단위.부칙내용", "법령.제개정이유.제개정이유내용",
    "법령.개정문.개정문내용",
]  # fmt: skip
# Held-out evaluation: sources never trained on (chat/instruction, QA, Wikipedia-style, math).
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


def load_eval() -> list[tuple[str, str, list[str]]]:
    from tokenizer.corpus import TextFields, read_file

    texts = []
    for language, spec in (("ko", EVAL_KO), ("en", EVAL_EN)):
        docs: list[str] = []
        for path, fields in spec:
            found, report = read_file(DATA / path, TextFields.parse(fields))
            if not found:
                raise SystemExit(f"{path}: {report.error}")
            docs.extend(found)
        texts.append((f"held-out sources ({language})", language, docs))
    return texts


def train(name: str, *flags: str, inputs=None, cold: bool = True) -> dict:
    """One `hanyeong tokenizer train` in a fresh process; returns its report plus wall time."""
    out = WORK / name
    cache = WORK / ("cache-" + name if cold else "cache-shared")
    if cold:
        subprocess.run(["rm", "-rf", str(cache)], check=True)
    fields = [a for f in TRAIN_FIELDS for a in ("--text-field", f)]
    command = [sys.executable, "-m", "orchestration.cli", "tokenizer", "train", *map(str, inputs or TRAIN_INPUTS),
               "--out", str(out), "--cache-dir", str(cache), "--quiet", *fields, *flags]  # fmt: skip
    start = time.perf_counter()
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if run.returncode != 0:
        raise SystemExit(f"{name} failed:\n{run.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    report["wall_seconds"] = round(wall, 1)
    report["dir"] = str(out)
    print(f"  {name}: {wall:.0f} s, peak {report['peak_rss_mb']:.0f} MB", flush=True)
    return report


def held_out(tokenizer_dir: str, texts, baseline) -> dict:
    """Tokens/word on the held-out sources, and relative to EXAONE 3.5."""
    from tokenizer.metrics import measure
    from tokenizer.report import as_encoder

    encoder = as_encoder(tokenizer_dir)
    out = {}
    for name, language, docs in texts:
        tpw = measure(encoder, docs).tokens_per_word
        out[language] = {"tokens_per_word": round(tpw, 4), "vs_exaone": round(tpw / baseline[language] - 1, 4)}
    return out


def exaone_baseline(texts) -> dict:
    from tokenizer.metrics import measure
    from tokenizer.peers import load_peer

    exaone = load_peer(PEERS / "exaone-3.5")
    return {language: measure(exaone, docs).tokens_per_word for _, language, docs in texts}


def bench_train(texts, baseline, results: dict) -> None:
    """Speed and memory: plain HF vs morpheme-aware (ours) vs kiwipiepy's trainer."""
    print("train: plain HF, morpheme-aware (cold and warm cache), kiwipiepy bpe_trainer", flush=True)
    runs = {"plain hf (--no-morphemes)": train("plain", "--no-morphemes"), "ours: hf + Kiwi E (cold cache)": train("ours")}
    shutil.copytree(WORK / "cache-ours", WORK / "cache-shared", dirs_exist_ok=True)
    runs["ours: hf + Kiwi E (warm cache)"] = train("ours-warm", cold=False)
    runs["kiwipiepy bpe_trainer, j+e"] = train("kiwi-je", "--engine", "kiwi", "--morphemes", "J,E")
    runs["kiwipiepy bpe_trainer, e"] = train("kiwi-e", "--engine", "kiwi", "--morphemes", "E")
    rows = {}
    for label, report in runs.items():
        rows[label] = {
            "wall_seconds": report["wall_seconds"],
            "phases": report["seconds"],
            "peak_rss_mb": report["peak_rss_mb"],
            "train_mb": round(sum(report["sample"]["train"].values()) / 1e6, 1),
            "morphemes": report["morphemes"],
            "held_out": held_out(report["dir"], texts, baseline),
        }
    results["train"] = rows


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


def bench_sweep(texts, baseline, results: dict) -> None:
    """Where the trade-off lies: Korean share x morpheme cuts (+ digit rule, dedup) -> KO vs EN."""
    print("sweep: ko-share x morphemes, digits, dedup (warm Kiwi cache)", flush=True)
    settings = []
    for share in ("0.6", "0.7", "0.8", "0.9"):
        for cuts in ("none", "E", "J,E"):
            settings.append((share, cuts, "1", True))
    settings += [("0.8", "E", "3", True), ("0.8", "E", "1", False)]
    rows = []
    for share, cuts, digits, dedup in settings:
        name = f"sweep-{share}-{cuts.replace(',', '')}-d{digits}{'' if dedup else '-nodedup'}"
        flags = ["--ko-share", share, "--digits", digits]
        flags += ["--no-morphemes"] if cuts == "none" else ["--morphemes", cuts]
        flags += [] if dedup else ["--no-dedup"]
        report = train(name, *flags, cold=False)
        rows.append({"ko_share": float(share), "morphemes": cuts, "digits": digits, "dedup": dedup,
                     "seconds": report["wall_seconds"], **held_out(report["dir"], texts, baseline)})  # fmt: skip
    results["sweep"] = rows
    plot_tradeoff(rows, RESULTS / "tokenizer-tradeoff.png")


def plot_tradeoff(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 6))
    markers = {"none": "o", "E": "s", "J,E": "D"}
    for cuts, marker in markers.items():
        group = [r for r in rows if r["morphemes"] == cuts and r["digits"] == "1" and r["dedup"]]
        xs = [100 * r["en"]["vs_exaone"] for r in group]
        ys = [100 * r["ko"]["vs_exaone"] for r in group]
        ax.plot(xs, ys, marker=marker, label=f"morphemes: {cuts}")
        for r, x, y in zip(group, xs, ys):
            ax.annotate(f"{r['ko_share']:.1f}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axvline(100 * GOAL_EN, color="grey", ls="--")
    ax.axhline(100 * GOAL_KO, color="grey", ls="--")
    ax.fill_between([-10, 100 * GOAL_EN], -40, 100 * GOAL_KO, color="green", alpha=0.08, label="both goals met")
    ax.set_xlim(min(-4, ax.get_xlim()[0]), max(6, ax.get_xlim()[1]))
    ax.set_ylim(ax.get_ylim()[0], max(2, ax.get_ylim()[1]))
    ax.set_xlabel("English tokens/word vs EXAONE 3.5 (%)  (lower is better)")
    ax.set_ylabel("Korean tokens/word vs EXAONE 3.5 (%)  (lower is better)")
    ax.set_title("Trade-off: Korean share (labels) x morpheme cuts, 102,400 ids")
    ax.legend(fontsize=8)
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
    for rule, name in (("1", "sweep-0.8-E-d1"), ("3", "sweep-0.8-E-d3")):
        directory = WORK / name
        if not (directory / "tokenizer.json").exists():
            continue
        encoder = as_encoder(str(directory))
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
    """Encoding throughput: the trained tokenizer's HF batch API vs tiktoken on the exported ranks."""
    print("encode: HF batch vs tiktoken", flush=True)
    from tokenizer.bbpe import BBPETokenizer
    from tokenizer.export import export_tiktoken, load_tiktoken_encoding

    if not (WORK / "ours" / "tokenizer.json").exists():
        train("ours")
    ours = BBPETokenizer.load(WORK / "ours")
    encoding = load_tiktoken_encoding(export_tiktoken(ours, WORK / "ours-tiktoken"))
    docs = [d for _, _, ds in texts for d in ds]
    megabytes = sum(len(d.encode()) for d in docs) / 1e6
    threads = os.cpu_count() or 1
    timings = {}
    for label, fn in (
        ("hf encode_batch_fast", lambda: ours.hf.encode_batch_fast(docs, add_special_tokens=False)),
        ("tiktoken encode_ordinary_batch", lambda: encoding.encode_ordinary_batch(docs, num_threads=threads)),
    ):
        fn()  # warm up
        best = min(_time(fn) for _ in range(3))
        timings[label] = {"seconds": round(best, 3), "mb_per_s": round(megabytes / best, 2)}
    same = [e.ids for e in ours.hf.encode_batch(docs[:5000], add_special_tokens=False)] == encoding.encode_ordinary_batch(docs[:5000])
    ratio = timings["hf encode_batch_fast"]["seconds"] / timings["tiktoken encode_ordinary_batch"]["seconds"]
    results["encode"] = {"megabytes": round(megabytes, 2), "threads": threads, "timings": timings,
                         "hf_time_over_tiktoken": round(ratio, 3), "identical_ids_first_5000": same}  # fmt: skip


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def write_markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# Tokenizer benchmarks",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory']}; {m['os']}; Python {m['python']}, "
        f"tokenizers {m['tokenizers']}, kiwipiepy {m['kiwipiepy']}, tiktoken {m['tiktoken']}. "
        f"Run {results['date']} with `python benchmarks/tokenizer.py {' '.join(results['parts'])}`.",
        "",
        "Training corpus: the Korean and English text of `../shared/data` (ko/, en/, parallel/). Held-out "
        "evaluation: sources never trained on (Korean: VAIV instructions, human-rights QA, KoBEST BoolQ, "
        "KoMT-Bench answers, VAIV translation pairs; English: HH-RLHF, AlpacaEval outputs, MT-Bench answers, "
        "GSM8K test, TruthfulQA). EXAONE 3.5 tokens/word on them: "
        + ", ".join(f"{k} {v:.4f}" for k, v in results["exaone"].items())
        + f". Goals: Korean {GOAL_KO:+.0%} or better, English {GOAL_EN:+.0%} or better.",
        "",
    ]
    if "train" in results:
        lines += ["## Training: speed, memory, compression", "",
                  "| run | wall s | phases (s) | peak MB | trained MB | Korean vs EXAONE | English vs EXAONE |",
                  "|---|---:|---|---:|---:|---:|---:|"]  # fmt: skip
        for label, r in results["train"].items():
            phases = ", ".join(f"{k} {v}" for k, v in r["phases"].items())
            lines.append(
                f"| {label} | {r['wall_seconds']} | {phases} | {r['peak_rss_mb']:.0f} | {r['train_mb']} | "
                f"{r['held_out']['ko']['vs_exaone']:+.1%} | {r['held_out']['en']['vs_exaone']:+.1%} |"
            )
        t = results["train"]
        ours, plain = t["ours: hf + Kiwi E (cold cache)"], t["plain hf (--no-morphemes)"]
        kiwi = t["kiwipiepy bpe_trainer, e"]
        kiwi_je = t["kiwipiepy bpe_trainer, j+e"]
        morph = ours["morphemes"]
        lines += [
            "",
            f"- Morpheme-aware / plain HF wall time: **{ours['wall_seconds'] / plain['wall_seconds']:.2f}×** (goal ≤ 2×).",
            f"- kiwipiepy's trainer / ours: **{kiwi['wall_seconds'] / ours['wall_seconds']:.1f}×** with the same cuts (E), "
            f"**{kiwi_je['wall_seconds'] / ours['wall_seconds']:.1f}×** with j+e (goal ≥ 3×).",
            f"- Kiwi work: {morph['run_occurrences']:,} Hangul runs, {morph['distinct_runs']:,} distinct, all analysed "
            f"once in {ours['phases'].get('morphemes', 0)} s (counting, Kiwi on {m['cores']} threads, cache write); "
            f"{morph['runs_with_cuts']:,} runs get a cut.",
            "",
        ]
    if "compare" in results:
        from tokenizer.report import markdown_tables

        lines += ["## Compression against every peer (held-out sources)", "",
                  "`vs first` is relative to hanyeong (first row). ![](tokenizer-compression.png)", "",
                  markdown_tables(results["compare"])]  # fmt: skip
    if "sweep" in results:
        lines += ["## Trade-off sweep", "", "![](tokenizer-tradeoff.png)", "",
                  "| Korean share | morpheme cuts | digits | dedup | Korean vs EXAONE | English vs EXAONE | both goals |",
                  "|---:|---|---|---|---:|---:|---|"]  # fmt: skip
        for r in results["sweep"]:
            ok = r["ko"]["vs_exaone"] <= GOAL_KO and r["en"]["vs_exaone"] <= GOAL_EN
            lines.append(f"| {r['ko_share']} | {r['morphemes']} | {r['digits']} | {r['dedup']} | "
                         f"{r['ko']['vs_exaone']:+.1%} | {r['en']['vs_exaone']:+.1%} | {'yes' if ok else ''} |")  # fmt: skip
        lines.append("")
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
        e = results["encode"]
        lines += ["## Encoding throughput", "",
                  f"{e['megabytes']} MB of held-out text, {e['threads']} threads, best of 3.", "",
                  "| encoder | seconds | MB/s |", "|---|---:|---:|"]  # fmt: skip
        for label, r in e["timings"].items():
            lines.append(f"| {label} | {r['seconds']} | {r['mb_per_s']} |")
        lines += ["", f"HF time / tiktoken time: **{e['hf_time_over_tiktoken']}** (goal ≤ 1.5); identical ids: "
                  f"{e['identical_ids_first_5000']}.", ""]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parts = ["train", "compare", "sweep", "digits", "memory", "encode"]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="*", default=["all"], help=f"any of {parts}, or all")
    args = parser.parse_args()
    chosen = parts if "all" in args.parts else args.parts
    if not DATA.is_dir():
        raise SystemExit(f"needs {DATA} (the shared corpora)")
    WORK.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    # Named by the kind of machine, not its (random, container) host name.
    host = machine_name()
    json_path = RESULTS / f"tokenizer-{host}.json"
    results = json.loads(json_path.read_text()) if json_path.exists() else {}
    results.update({"machine": machine(), "date": time.strftime("%Y-%m-%d"), "parts": chosen})
    texts = load_eval()
    results["exaone"] = baseline = exaone_baseline(texts)
    steps = {
        "train": lambda: bench_train(texts, baseline, results),
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
