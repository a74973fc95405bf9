"""Data loader benchmark: the tokens/s MixtureLoader.next_batch gives a training loop, on one core.

    python benchmarks/data_loader.py                 # ~300 MB synthetic dataset, about a minute
    python benchmarks/data_loader.py --tokens 20e6   # smaller

A synthetic dataset in the preparation pipeline's layout (manifest.json + Parquet shards, random
ids, BOS/EOS around each document) is written once to $HANYEONG_BENCH_WORK (default: the temp
folder): `web` (log-normal lengths, median ~500 tokens), `code` (median ~1,500) and `chat` (short:
median ~60). The process is pinned to one core after loading; each case runs timed rounds of
next_batch calls and reports the median round in input tokens (B x T) per wall second and per CPU
second (the machine may be busy: CPU time is the steadier figure). For reference, the nanoGPT way of
batching (B random windows of one flat token array, no documents, no mixture) runs on the same
tokens. Results go to benchmarks/results/data-loader-<machine>.{json,md}.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from hardware import cpu_name, machine_name  # benchmarks/hardware.py

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
WORK = (
    Path(os.environ.get("HANYEONG_BENCH_WORK", tempfile.gettempdir()))
    / "hanyeong-bench"
    / "data-loader"
)
VOCAB, PAD, BOS, EOS = 102_400, 0, 1, 2
SHARD_TOKENS = 8_000_000
# source: (share of the tokens, median document length, log-normal sigma)
SOURCES = {"web": (0.65, 500, 1.0), "code": (0.25, 1500, 0.8), "chat": (0.10, 60, 0.7)}


def machine() -> dict:
    import pyarrow

    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pyarrow": pyarrow.__version__,
    }


def peak_rss_mb() -> float:
    found = re.search(r"VmHWM:\s*(\d+) kB", Path("/proc/self/status").read_text())
    return int(found.group(1)) / 1024 if found else float("nan")


# ---- the synthetic dataset --------------------------------------------------------------------


def write_dataset(directory: Path, total_tokens: int, seed: int = 0) -> dict:
    """Write the dataset (once per size); returns its manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    marker = directory / "manifest.json"
    if marker.exists() and json.loads(marker.read_text()).get("bench_tokens") == total_tokens:
        return json.loads(marker.read_text())
    rng = np.random.default_rng(seed)
    manifest = {
        "format": "hanyeong-dataset",
        "version": 1,
        "bench_tokens": total_tokens,
        "tokenizer": {"vocab_size": VOCAB, "bos_id": BOS, "eos_id": EOS, "pad_id": PAD},
        "sources": {},
    }
    for name, (share, median, sigma) in SOURCES.items():
        target = int(total_tokens * share)
        lengths = np.maximum(
            2, rng.lognormal(np.log(median), sigma, 2 * target // median + 16).astype(np.int64)
        )
        lengths = lengths[: np.searchsorted(np.cumsum(lengths), target) + 1]
        entry = manifest["sources"][name] = {"documents": 0, "tokens": 0, "shards": []}
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        cuts = np.searchsorted(bounds, np.arange(0, bounds[-1], SHARD_TOKENS)).tolist() + [
            len(lengths)
        ]
        for k, (a, b) in enumerate(itertools.pairwise(cuts)):
            if b <= a:
                continue
            offsets = (bounds[a : b + 1] - bounds[a]).astype(np.int32)
            values = rng.integers(3, VOCAB, int(offsets[-1]), dtype=np.int32)
            values[offsets[:-1]], values[offsets[1:] - 1] = BOS, EOS
            ids = pa.array([f"{name}-{i}" for i in range(a, b)])
            table = pa.table(
                {
                    "id": ids,
                    "language": pa.array(["en"] * (b - a)),
                    "input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)),
                }
            )
            path = directory / "shards" / name / f"part-{k:05d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, path)
            entry["shards"].append(
                {
                    "path": str(path.relative_to(directory)),
                    "documents": b - a,
                    "tokens": int(offsets[-1]),
                    "sha256": "",
                }
            )
            entry["documents"] += b - a
            entry["tokens"] += int(offsets[-1])
    marker.write_text(json.dumps(manifest, indent=1))
    return manifest


# ---- measurements -----------------------------------------------------------------------------


def rounds(step, tokens_per_call: int, seconds: float, n_rounds: int = 5) -> dict:
    """Median of `n_rounds` timed rounds of `step()` calls, each about seconds / n_rounds long."""
    for _ in range(3):
        step()  # warm up
    wall, cpu = [], []
    for _ in range(n_rounds):
        calls, w0, c0 = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - w0 < seconds / n_rounds:
            step()
            calls += 1
        w, c = time.perf_counter() - w0, time.process_time() - c0
        wall.append(calls * tokens_per_call / w)
        cpu.append(calls * tokens_per_call / c)
    return {
        "tokens_per_s": round(statistics.median(wall)),
        "tokens_per_cpu_s": round(statistics.median(cpu)),
        "rounds_tokens_per_s": [round(x) for x in wall],
        "ms_per_batch": round(1e3 * tokens_per_call / statistics.median(wall), 3),
    }


def bench(args) -> dict:
    from orchestration.data.loader import MixtureConfig, MixtureLoader

    start = time.perf_counter()
    cached = (WORK / "synthetic" / "manifest.json").exists()
    manifest = write_dataset(WORK / "synthetic", int(args.tokens))
    written = None if cached else round(time.perf_counter() - start, 1)
    total = sum(s["tokens"] for s in manifest["sources"].values())
    sizes = {
        n: {
            "documents": s["documents"],
            "tokens": s["tokens"],
            "mean_length": round(s["tokens"] / s["documents"], 1),
        }
        for n, s in manifest["sources"].items()
    }
    print(f"dataset: {total / 1e6:.1f}M tokens in {WORK / 'synthetic'}", flush=True)

    mixture = MixtureConfig.from_dict(
        {
            "sources": [
                {"dataset": "synthetic", "source": "web", "weight": 0.6},
                {"dataset": "synthetic", "source": "code", "weight": 0.3},
                {"dataset": "synthetic", "source": "chat", "weight": 0.1},
            ]
        }
    )
    rss0, start = peak_rss_mb(), time.perf_counter()
    loader = MixtureLoader(mixture, 2048, 8, seed=0, root=WORK)
    load = {
        "seconds": round(time.perf_counter() - start, 2),
        "peak_rss_mb": round(peak_rss_mb()),
        "rss_before_mb": round(rss0),
    }
    print(f"load: {load['seconds']} s, peak RSS {load['peak_rss_mb']} MB", flush=True)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core from here on

    cases = {}
    for seq_len in (2048, 4096):
        loader.seq_len, loader.batch_rows = seq_len, 8
        cases[f"mixture, seq {seq_len}, 8 rows"] = rounds(
            loader.next_batch, 8 * seq_len, args.seconds
        )
    chat = MixtureLoader(
        MixtureConfig.from_dict({"sources": [{"dataset": "synthetic", "source": "chat"}]}),
        2048,
        8,
        root=WORK,
    )
    short = sizes["chat"]["mean_length"]
    label = f"chat only (short documents, mean {short:.0f} tokens), seq 2048, 8 rows"
    cases[label] = rounds(chat.next_batch, 8 * 2048, args.seconds)
    whole = MixtureLoader(
        MixtureConfig.from_dict({**mixture.to_dict(), "split_documents": False}), 2048, 8, root=WORK
    )
    cases["mixture, split_documents = false (padded rows), seq 2048, 8 rows"] = rounds(
        whole.next_batch, 8 * 2048, args.seconds
    )
    for label, r in cases.items():
        wall, cpu = r["tokens_per_s"] / 1e6, r["tokens_per_cpu_s"] / 1e6
        print(f"{label}: {wall:.1f}M tokens/s wall, {cpu:.1f}M per CPU-s", flush=True)

    # Reference: nanoGPT's get_batch (random windows of one flat array; no documents, no mixture).
    flat = loader.sources[0].tokens
    rng = np.random.default_rng(0)

    def windows(T: int = 2048, B: int = 8):
        ix = rng.integers(0, len(flat) - T - 1, B)
        rows = np.stack([flat[i : i + T + 1] for i in ix])
        return rows[:, :-1].astype(np.int64), rows[:, 1:].astype(np.int64)

    reference = rounds(windows, 8 * 2048, args.seconds)
    print(
        f"reference (nanoGPT windows): {reference['tokens_per_s'] / 1e6:.1f}M tokens/s", flush=True
    )

    # The cursor: its size and what a resume costs (rebuild one draw block).
    state = loader.state()
    start = time.perf_counter()
    for _ in range(20):
        loader.load_state(state)
    cursor = {
        "json_bytes": len(json.dumps(state)),
        "load_state_ms": round((time.perf_counter() - start) / 20 * 1e3, 3),
        "example": state,
    }
    return {
        "dataset": {"tokens": total, "sources": sizes, "write_seconds": written},
        "load": load,
        "cases": cases,
        "reference_nanogpt_windows_seq_2048": reference,
        "cursor": cursor,
    }


def write_markdown(results: dict) -> str:
    m, d, load, args = results["machine"], results["dataset"], results["load"], results["args"]
    before, after = results["load_average"]
    sources = ", ".join(
        f"`{n}` {s['documents']:,} documents, mean {s['mean_length']} tokens"
        for n, s in d["sources"].items()
    )
    lines = [
        "# Data loader benchmark: tokens/s to a training loop",
        "",
        (
            f"Machine: {m['cpu']}, {m['cores']} cores; {m['os']}; Python {m['python']}, "
            f"numpy {m['numpy']}, pyarrow {m['pyarrow']}. Run {results['date']} with "
            f"`python benchmarks/data_loader.py --tokens {args['tokens']:.0f} "
            f"--seconds {args['seconds']}`. The machine is shared: load average {before:.1f} "
            f"before and {after:.1f} after, on {m['cores']} cores; wall figures can be low by "
            "that share, CPU-time figures are steadier."
        ),
        "",
        (
            f"Dataset: synthetic, {d['tokens'] / 1e6:.1f}M tokens "
            f"({d['tokens'] * 4 / 1e6:.0f} MB as int32) in the preparation pipeline's layout "
            f"(Parquet shards of <= 8M tokens): {sources}. Mixture web 0.6 / code 0.3 / chat 0.1 "
            "(token shares). Loading (read every shard, check BOS/EOS and ids): "
            f"{load['seconds']} s, peak RSS {load['peak_rss_mb']} MB."
        ),
        "",
        (
            "Timed on one core (the process is pinned after loading): `next_batch()` end to end "
            "(source draws, packing, segment ids, `Batch.from_tokens`), 5 rounds after 3 warm-up "
            "batches, median round; tokens are input tokens B × T."
        ),
        "",
        "| case | tokens/s (wall) | tokens per CPU-second | ms per batch | rounds (M tokens/s) |",
        "|---|---:|---:|---:|---|",
    ]
    cases = dict(results["cases"])
    reference = "reference: nanoGPT random windows (no documents, no mixture), seq 2048, 8 rows"
    cases[reference] = results["reference_nanogpt_windows_seq_2048"]
    for label, r in cases.items():
        rounds_m = ", ".join(f"{x / 1e6:.1f}" for x in r["rounds_tokens_per_s"])
        lines.append(
            f"| {label} | {r['tokens_per_s'] / 1e6:.1f}M | {r['tokens_per_cpu_s'] / 1e6:.1f}M | "
            f"{r['ms_per_batch']} | {rounds_m} |"
        )
    worst = min(r["tokens_per_s"] for r in results["cases"].values())
    c = results["cursor"]
    lines += [
        "",
        (
            f"Slowest case: **{worst / 1e6:.1f}M tokens/s** on one core (goal ≥ 1M). The work "
            "is per document piece, not per token, so short documents are the slow case."
        ),
        "",
        (
            f"Cursor: {c['json_bytes']} bytes of JSON; `load_state` takes {c['load_state_ms']} "
            f"ms (it re-derives one block of {results['draw_block']} source draws). Example:"
        ),
        "",
        "```json",
        json.dumps(c["example"]),
        "```",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tokens", type=float, default=75e6, help="dataset size in tokens (int32: 4 bytes each)"
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per case")
    args = parser.parse_args()
    from orchestration.data.loader import DRAW_BLOCK

    before = os.getloadavg()[0]
    results = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "args": vars(args),
        "draw_block": DRAW_BLOCK,
    }
    results.update(bench(args))
    results["load_average"] = [before, os.getloadavg()[0]]
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS / f"data-loader-{machine_name()}.json"
    json_path.write_text(json.dumps(results, indent=1))
    (RESULTS / f"data-loader-{machine_name()}.md").write_text(write_markdown(results))
    print(f"wrote {json_path} and .md")


if __name__ == "__main__":
    main()
