"""Data preparation benchmarks on ../shared/data: Ray tokenization against direct batch encoding,
decontamination speed and memory against every shared benchmark, a whole `prepare` run, and
`prepare` with its per-document steps in the driver, on 1 and on 2 Ray workers.

    python benchmarks/data_prepare.py                  # everything (~15 minutes on 2 busy cores)
    python benchmarks/data_prepare.py tokenize         # a part: tokenize, decontaminate, prepare,
                                                       # workers
    python benchmarks/data_prepare.py --tokenizer DIR  # a tokenizer of yours (default: one trained
                                                       # on data/quickstart, 32k ids, cached)

The text is Korean and English from ../shared/data (~40 MB: NSMC reviews, petitions, news, books,
Wikipedia). Tokenize: the same documents encoded by `BBPETokenizer.encode_batch` on all cores (its
Rust thread pool), and by `ShardWriter` through a local Ray with one task per core (encode, add
BOS/EOS, write Parquet, hash), rounds interleaved so a busy machine slows both alike; the ratio of
each pair of rounds is reported, with its median. Decontaminate runs in a fresh process per round so
its peak memory (VmHWM) is its own. Workers: the whole `prepare` in a fresh process per run, rounds
interleaved; CPU seconds are those of the driver and of every process under it (Ray's raylet, GCS
and workers, the file readers), and the datasets of all runs must be identical (manifests but for
timings, every shard's bytes). Results go to benchmarks/results/data-<machine>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hardware import cpu_name, machine_name  # benchmarks/hardware.py

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("HANYEONG_SHARED", REPO.parent / "shared"))
DATA = SHARED / "data"
RESULTS = REPO / "benchmarks" / "results"
WORK = (
    Path(os.environ.get("HANYEONG_BENCH_WORK", tempfile.gettempdir()))
    / "hanyeong-bench"
    / "data-prepare"
)
RECIPE = REPO / "recipes" / "prepare-shared.toml"
# (file under ../shared/data, text field or None for a document per line, documents to take)
CORPUS = [
    ("ko/nsmc/nsmc_raw_reviews.subset.jsonl.gz", "review", 200_000),
    ("ko/petitions", "content", None),
    ("ko/korquad/KorQuAD_v1.0_dev.json.gz", "data.paragraphs.context", None),
    ("ko/korean-hate-speech/news_title/train.news_title.txt", None, None),
    ("en/nltk", "text", None),
    ("en/gutenberg", None, None),
    ("en/wikitext-2", None, None),
]
ROUNDS = 3
TOKENIZE_ROUNDS = 4
WORKER_ROUNDS = 2
# (name, Ray CPUs = file readers, chunk_tasks: 0 runs the per-document steps in the driver)
WORKER_RUNS = [("steps in the driver, 2 CPUs", 2, 0), ("Ray, 1 CPU", 1, None), ("Ray, 2 CPUs", 2, None)]


def machine() -> dict:
    cpu = cpu_name()
    kb = int(re.search(r"MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text()).group(1))
    import numpy
    import ray
    import tokenizers

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory": f"{kb / 2**20:.0f} GiB",
        "os": platform.platform(),
        "python": platform.python_version(),
        "ray": ray.__version__,
        "tokenizers": tokenizers.__version__,
        "numpy": numpy.__version__,
    }


def load_texts() -> list[tuple[str, str]]:
    """(source, text) of the benchmark corpus, in a fixed order."""
    from tokenizer.corpus import TextFields, read_corpus

    out = []
    for rel, field, limit in CORPUS:
        fields = TextFields.parse([field] if field else None)
        taken = []
        for docs, _ in read_corpus([DATA / rel], fields):
            taken.extend(docs)
        out.extend((Path(rel).parts[1], t) for t in taken[:limit])
    return out


def default_tokenizer() -> Path:
    path = WORK / "tokenizer-quickstart-32k"
    if not (path / "tokenizer.json").is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "orchestration.cli",
                "tokenizer",
                "train",
                str(REPO / "data" / "quickstart"),
                "--out",
                str(path),
                "--vocab-size",
                "32000",
                "-q",
            ],
            check=True,
            cwd=REPO,
        )
    return path


def cpu_snapshot() -> dict[int, float]:
    """CPU seconds (user + system) of this process and every process under it (Ray's raylet, GCS,
    workers are descendants of the driver that started them)."""
    import psutil

    me = psutil.Process()
    out = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            out[proc.pid] = times.user + times.system
        except psutil.Error:
            pass
    return out


def cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(t - before.get(pid, 0.0) for pid, t in after.items())


def mb(texts) -> float:
    return sum(len(t.encode("utf-8")) for t in texts) / 1e6


def bench_tokenize(texts: list[tuple[str, str]], tokenizer: Path, results: dict) -> None:
    """Direct encode_batch on all cores vs ShardWriter through Ray, interleaved rounds."""
    import shutil

    from orchestration.data.config import ShardConfig
    from orchestration.data.documents import Document
    from orchestration.data.shards import ShardWriter, ray_session, tokenizer_info
    from tokenizer.bbpe import BBPETokenizer

    size = mb(t for _, t in texts)
    tok, info = BBPETokenizer.load(tokenizer), tokenizer_info(tokenizer)
    plain = [t for _, t in texts]
    batches, cut = [[]], 0
    for text in plain:  # direct batches cut where ShardWriter cuts shards
        batches[-1].append(text)
        cut += len(text.encode("utf-8"))
        if cut >= 2_000_000:
            batches.append([])
            cut = 0
    docs = [Document(f"{i}", source, "ko", text) for i, (source, text) in enumerate(texts)]
    config = ShardConfig(text_bytes_per_shard=2_000_000)
    rounds = []
    started = time.perf_counter()
    with ray_session(num_cpus=os.cpu_count()) as ray:
        ray_start = time.perf_counter() - started
        for r in range(TOKENIZE_ROUNDS):
            start = time.perf_counter()
            tokens = sum(map(len, tok.encode_batch(plain)))
            whole = time.perf_counter() - start
            cpu, start = (
                cpu_snapshot(),
                time.perf_counter(),
            )  # the stronger baseline: shard-sized batches
            assert tokens == sum(len(ids) for batch in batches for ids in tok.encode_batch(batch))
            direct, direct_cpu = time.perf_counter() - start, cpu_used(cpu, cpu_snapshot())
            out = WORK / "shards"
            shutil.rmtree(out, ignore_errors=True)
            cpu, start = cpu_snapshot(), time.perf_counter()
            writer = ShardWriter(out, info, config, lambda: ray)
            for doc in docs:
                writer.add(doc)
            shards = writer.close()
            through_ray, ray_cpu = time.perf_counter() - start, cpu_used(cpu, cpu_snapshot())
            ray_tokens = sum(
                s["tokens"] - 2 * s["documents"] for parts in shards.values() for s in parts
            )
            assert ray_tokens == tokens, (ray_tokens, tokens)
            rounds.append(
                {
                    "direct_whole_s": round(whole, 2),
                    "direct_s": round(direct, 2),
                    "ray_s": round(through_ray, 2),
                    "direct_mb_s": round(size / direct, 2),
                    "ray_mb_s": round(size / through_ray, 2),
                    "ratio": round(direct / through_ray, 3),
                    "direct_cpu_s": round(direct_cpu, 2),
                    "ray_cpu_s": round(ray_cpu, 2),
                    "cpu_ratio": round(direct_cpu / ray_cpu, 3),
                    "load": os.getloadavg()[0],
                }
            )
            print(f"tokenize round {r}: {rounds[-1]}", flush=True)
    results["tokenize"] = {
        "text_mb": round(size, 1),
        "documents": len(texts),
        "tokens": tokens,
        "tokenizer": info["path"],
        "vocab_size": info["vocab_size"],
        "cores": os.cpu_count(),
        "shards": sum(len(p) for p in shards.values()),
        "ray_start_s": round(ray_start, 2),
        "rounds": rounds,
        "median_ratio": statistics.median(r["ratio"] for r in rounds),
        "median_cpu_ratio": statistics.median(r["cpu_ratio"] for r in rounds),
    }


def peak_rss_mb(pid: int | str = "self") -> float:
    """VmHWM of a process: its peak resident memory (unlike ru_maxrss it is not inherited over exec)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s*(\d+)", status).group(1)) / 1e3


def _decontaminate_once(path: str) -> None:
    """In a fresh process: build the shared index, check the corpus, print timings and peak memory."""
    from orchestration.data.config import load_config
    from orchestration.data.decontaminate import Decontaminator, build_index
    from orchestration.data.fingerprint import normalize

    texts = [t for _, t in json.loads(Path(path).read_text(encoding="utf-8"))]
    before = peak_rss_mb()
    start = time.perf_counter()
    index = build_index(load_config(RECIPE).decontaminate)
    built = time.perf_counter() - start
    checker = Decontaminator(index)
    cpu, start = time.process_time(), time.perf_counter()
    for i in range(0, len(texts), 4096):
        checker.check([normalize(t) for t in texts[i : i + 4096]])
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(
        json.dumps(
            {
                "index_s": round(built, 2),
                "check_wall_s": round(wall, 2),
                "check_cpu_s": round(cpu, 2),
                "removed": dict(checker.removed),
                "index_mb": round(index.nbytes / 1e6, 1),
                "windows": len(index.hashes),
                "text_loaded_rss_mb": round(before),
                "peak_rss_mb": round(peak_rss_mb()),
            }
        )
    )


def bench_decontaminate(texts: list[tuple[str, str]], results: dict) -> None:
    corpus = WORK / "corpus.json"
    corpus.write_text(json.dumps(texts, ensure_ascii=False), encoding="utf-8")
    size = mb(t for _, t in texts)
    rounds = []
    for r in range(ROUNDS):
        out = subprocess.run(
            [sys.executable, __file__, "_decontaminate", str(corpus)],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO,
        )
        run = json.loads(out.stdout.strip().splitlines()[-1])
        run.update(
            mb_s_wall=round(size / run["check_wall_s"], 1),
            mb_s_cpu=round(size / run["check_cpu_s"], 1),
            load=os.getloadavg()[0],
        )
        rounds.append(run)
        print(f"decontaminate round {r}: {run}", flush=True)
    results["decontaminate"] = {
        "text_mb": round(size, 1),
        "documents": len(texts),
        "rounds": rounds,
        "median_mb_s_cpu": statistics.median(r["mb_s_cpu"] for r in rounds),
        "median_mb_s_wall": statistics.median(r["mb_s_wall"] for r in rounds),
    }


def corpus_inputs() -> tuple[list[str], list[str]]:
    """(input paths, text fields) of the corpus files, for `prepare`."""
    return [str(DATA / rel) for rel, _, _ in CORPUS], sorted({f for _, f, _ in CORPUS if f} | {"text"})


def bench_prepare(tokenizer: Path, results: dict) -> None:
    """A whole `hanyeong data prepare` of the corpus files (all of their documents) with the recipe."""
    inputs, fields = corpus_inputs()
    out = WORK / "dataset"
    command = [
        sys.executable,
        "-m",
        "orchestration.cli",
        "data",
        "prepare",
        *inputs,
        "-t",
        str(tokenizer),
        "--out",
        str(out),
        "--config",
        str(RECIPE),
        "--force",
        "-q",
        *[a for f in fields for a in ("--text-field", f)],
    ]
    start = time.perf_counter()
    driver, peak = subprocess.Popen(command, cwd=REPO), 0.0
    while driver.poll() is None:  # the driver's peak memory (Ray's worker processes not counted)
        try:
            peak = max(peak, peak_rss_mb(driver.pid))
        except (OSError, AttributeError):
            pass
        time.sleep(0.2)
    wall = time.perf_counter() - start
    if driver.returncode:
        raise SystemExit(f"prepare failed ({driver.returncode})")
    manifest = json.loads((out / "manifest.json").read_text())
    ingest = manifest["steps"][0]
    results["prepare"] = {
        "command": "hanyeong data prepare <corpus> -t <tokenizer> --config recipes/prepare-shared.toml --force",
        "wall_s": round(wall, 1),
        "text_mb": round(ingest["bytes"] / 1e6, 1),
        "mb_s": round(ingest["bytes"] / 1e6 / wall, 2),
        "driver_peak_rss_mb": round(peak),
        "seconds": manifest["seconds"],
        "documents_read": ingest["documents"],
        "steps": {s["step"]: s.get("dropped", {}) for s in manifest["steps"][1:5]},
        "kept": manifest["steps"][5]["documents"],
        "tokens": manifest["steps"][5]["tokens"],
        "shards": manifest["steps"][5]["shards"],
        "load": os.getloadavg()[0],
    }
    print(f"prepare: {results['prepare']}", flush=True)


def _prepare_once(out: str, num_cpus: str, chunk_tasks: str, tokenizer: str) -> None:
    """In a fresh process: `prepare` the corpus as `hanyeong data prepare --num-cpus N` does."""
    from orchestration.data.config import load_config
    from orchestration.data.prepare import prepare

    inputs, fields = corpus_inputs()
    n, tasks = int(num_cpus), None if chunk_tasks == "auto" else int(chunk_tasks)
    prepare(inputs, tokenizer, out, load_config(RECIPE), text_fields=fields, num_cpus=n, workers=n,
            force=True, chunk_tasks=tasks)  # fmt: skip


def run_measured(command: list[str]) -> dict:
    """Run `command`; its wall time, peak RSS, and CPU seconds: its own and its process tree's."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=REPO)
    me, peak, seen = psutil.Process(proc.pid), 0.0, {}
    while proc.poll() is None:  # the last CPU times seen of each process (polled: a slight undercount)
        try:
            peak = max(peak, peak_rss_mb(proc.pid))
            for p in [me, *me.children(recursive=True)]:
                times = p.cpu_times()
                seen[p.pid] = times.user + times.system
        except (OSError, AttributeError, psutil.Error):  # it is exiting
            pass
        time.sleep(0.25)
    if proc.returncode:
        raise SystemExit(f"{command} failed ({proc.returncode})")
    return {
        "wall_s": time.perf_counter() - start,
        "driver_cpu_s": seen.get(proc.pid, 0.0),
        "cpu_s": sum(seen.values()),
        "driver_peak_rss_mb": round(peak),
    }


def two_process_speedup() -> float:
    """How much 2 processes of the same pure-Python work (~1 s) get done, at once, over 1, now: 2.0
    on two free cores; the other jobs of a shared machine bring it down."""
    code = "sum(i * i for i in range(12_000_000))"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    one = time.perf_counter() - start
    start = time.perf_counter()
    for proc in [subprocess.Popen([sys.executable, "-c", code]) for _ in range(2)]:
        proc.wait()
    return round(2 * one / (time.perf_counter() - start), 2)


def dataset_digest(out: Path) -> tuple[dict, dict]:
    """(manifest without its timings, sha256 of every shard file's bytes)."""
    import hashlib

    manifest = json.loads((out / "manifest.json").read_text())
    manifest.pop("seconds")
    files = {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*.parquet"))}
    return manifest, files


def bench_workers(tokenizer: Path, results: dict) -> None:
    """`prepare` with the per-document steps in the driver, then in Ray tasks on 1 and 2 CPUs."""
    runs, digests = [], {}
    for r in range(WORKER_ROUNDS):
        for name, cpus, tasks in WORKER_RUNS:
            out = WORK / f"dataset-{cpus}-{tasks}"
            command = [sys.executable, __file__, "_prepare", str(out), str(cpus), str(tasks if tasks is not None else "auto"), str(tokenizer)]
            load, speedup = os.getloadavg()[0], two_process_speedup()
            run = run_measured(command)
            manifest = json.loads((out / "manifest.json").read_text())
            digests[name] = dataset_digest(out)
            text_mb = manifest["steps"][0]["bytes"] / 1e6
            seconds = manifest["seconds"]
            run.update(
                name=name, round=r, ray_cpus=cpus, text_mb=round(text_mb, 1),
                mb_s=round(text_mb / run["wall_s"], 2),
                mb_s_per_core=round(text_mb / run["wall_s"] / cpus, 2),
                mb_per_cpu_s=round(text_mb / run["cpu_s"], 2),
                driver_cpu_share=round(run["driver_cpu_s"] / run["cpu_s"], 3),
                driver_not_waiting_share=round(1 - seconds["waiting_for_ray"] / seconds["total"], 3),
                seconds=seconds, load=round(max(load, os.getloadavg()[0]), 2), two_cores=speedup,
            )  # fmt: skip
            for key in ("wall_s", "driver_cpu_s", "cpu_s"):
                run[key] = round(run[key], 1)
            runs.append(run)
            print(f"workers round {r}: {run}", flush=True)
    first = next(iter(digests.values()))
    identical = all(d == first for d in digests.values())
    assert identical, "prepare made different datasets on different worker counts"
    results["workers"] = {
        "command": "prepare(<corpus>, <tokenizer>, --config recipes/prepare-shared.toml, num_cpus=N, workers=N)",
        "documents_read": first[0]["steps"][0]["documents"],
        "kept": first[0]["steps"][5]["documents"],
        "shards": len(first[1]),
        "content_hash": first[0]["content_hash"],
        "identical": identical,
        "runs": runs,
    }


def write_markdown(r: dict) -> str:
    m = r["machine"]
    ran = ", ".join(f"{part} {when}" for part, when in sorted(r.get("ran", {}).items()))
    intro = (
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory']}; {m['os']}; Python {m['python']}, Ray {m['ray']}, "
        f"tokenizers {m['tokenizers']}, numpy {m['numpy']}. Parts run with `python benchmarks/data_prepare.py "
        f"PART`: {ran}. The machine is shared with other jobs and was loaded (the 1-minute load average "
        "is in each row; 2.0 means both cores busy): wall-clock figures are pessimistic, while ratios of "
        "interleaved rounds and CPU-time figures are steadier."
    )
    lines = ["# Data preparation benchmarks", "", intro, ""]
    if "tokenize" in r:
        t = r["tokenize"]
        about = (
            f"{t['text_mb']} MB of Korean and English text ({t['documents']:,} documents, {t['tokens']:,} tokens), "
            f"tokenizer with {t['vocab_size']:,} ids; {t['cores']} cores. Direct: `BBPETokenizer.encode_batch` (Rust "
            "thread pool on every core) in batches of ~2 MB, the faster way to call it (one call on all documents, "
            f"`whole`, is slower: its Encoding objects crowd memory). Ray: `ShardWriter` → {t['shards']} tasks of "
            "~2 MB, one CPU each (encode, BOS/EOS, Parquet zstd, SHA-256), Ray already started (starting it took "
            f"{t['ray_start_s']} s); round 0 also pays for the workers' first imports and tokenizer load."
        )
        lines += [
            "## Tokenizing shards through Ray vs batch encode on the same cores",
            "",
            about,
            "",
            (
                "| round | direct whole s | direct s | direct MB/s | Ray s | Ray MB/s | Ray / direct (wall) "
                "| direct CPU s | Ray CPU s | Ray / direct (CPU) | load |"
            ),
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for i, x in enumerate(t["rounds"]):
            lines.append(
                f"| {i} | {x['direct_whole_s']} | {x['direct_s']} | {x['direct_mb_s']} | {x['ray_s']} | "
                f"{x['ray_mb_s']} | {x['ratio']:.0%} | {x['direct_cpu_s']} | {x['ray_cpu_s']} | "
                f"{x['cpu_ratio']:.0%} | {x['load']:.2f} |"
            )
        lines += [
            "",
            (
                f"- Median Ray / direct throughput: **{t['median_ratio']:.0%}** of wall-clock throughput, "
                f"**{t['median_cpu_ratio']:.0%}** of throughput per CPU-second (goal ≥ 80%). CPU seconds "
                "count every process involved: the driver, and for Ray also the raylet, GCS and workers."
            ),
            "",
        ]
    if "decontaminate" in r:
        d = r["decontaminate"]
        first = d["rounds"][0]
        about = (
            f"{d['text_mb']} MB ({d['documents']:,} documents), one process, against the {first['windows']:,} "
            f"window hashes of `recipes/prepare-shared.toml` (index {first['index_mb']} MB, built in "
            f"{first['index_s']} s). Normalize + check, per core; memory is the process's peak RSS, of which the "
            "corpus itself, loaded as Python strings before the index is built, is the next column."
        )
        lines += [
            "## Decontamination against every shared benchmark",
            "",
            about,
            "",
            "| round | MB/s (CPU time) | MB/s (wall) | peak RSS MB | corpus loaded, RSS MB | load |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for i, x in enumerate(d["rounds"]):
            lines.append(
                f"| {i} | {x['mb_s_cpu']} | {x['mb_s_wall']} | {x['peak_rss_mb']} | {x['text_loaded_rss_mb']} | "
                f"{x['load']:.2f} |"
            )
        lines += [
            "",
            (
                f"- Median: **{d['median_mb_s_cpu']} MB/s per core** (CPU time), {d['median_mb_s_wall']} "
                "MB/s wall (goal ≥ 5 MB/s per core)."
            ),
            f"- Removed: {first['removed']} (true overlaps, listed in tests/orchestration/data/test_decontaminate.py).",
            "",
        ]
    if "prepare" in r:
        p = r["prepare"]
        about = (
            f"`{p['command']}` on the same files (all their documents): {p['text_mb']} MB, {p['documents_read']:,} "
            f"documents read, {p['kept']:,} kept, {p['tokens']:,} tokens in {p['shards']} shards, in {p['wall_s']} s "
            f"({p['mb_s']} MB/s end to end, Ray start included; load {p['load']:.2f}); peak RSS "
            f"of the driver {p['driver_peak_rss_mb']} MB (Ray workers not counted)."
        )
        lines += [
            "## A whole `prepare` run",
            "",
            about,
            "",
            f"- Seconds per step in the driver: {p['seconds']} (tokenizing runs in Ray tasks meanwhile).",
            f"- Drops: {p['steps']}.",
            "",
        ]
    if "workers" in r:
        w = r["workers"]
        about = (
            f"`{w['command']}` in a fresh process per run, rounds interleaved: {w['runs'][0]['text_mb']} MB, "
            f"{w['documents_read']:,} documents read, {w['kept']:,} kept in {w['shards']} shards. *steps in the "
            "driver*: clean, filter, dedup and decontamination in the driver and tokenizing in Ray tasks, as "
            "before this part existed (`chunk_tasks=0`); *Ray*: those steps in Ray tasks over chunks of 4,096 "
            "documents, the driver deciding duplicates from their fingerprints in document order. MB/s per core "
            "divides by the Ray CPUs; MB per CPU-second counts every process (driver, file readers, raylet, "
            "GCS, workers). Driver share: the driver's CPU seconds over all of them; not waiting: the share of "
            "the driver's wall time not spent waiting for Ray results (Ray's start, ~5 s, included). Two cores: "
            "what two processes of the same pure-Python work got done at once, over one, just before the run "
            "(2.0 on two free cores; other jobs on this shared machine bring it down)."
        )
        lines += [
            "## `prepare` on 1 and 2 Ray workers",
            "",
            about,
            "",
            "| run | round | wall s | MB/s | MB/s per core | MB per CPU-s | CPU s | driver CPU s | driver share | driver not waiting | driver peak RSS MB | load | two cores |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for x in w["runs"]:
            lines.append(
                f"| {x['name']} | {x['round']} | {x['wall_s']} | {x['mb_s']} | {x['mb_s_per_core']} | "
                f"{x['mb_per_cpu_s']} | {x['cpu_s']} | {x['driver_cpu_s']} | {x['driver_cpu_share']:.0%} | "
                f"{x['driver_not_waiting_share']:.0%} | {x['driver_peak_rss_mb']} | {x['load']:.2f} | "
                f"{x.get('two_cores', '–')} |"
            )
        lines += [
            "",
            f"- The datasets of every run are identical (manifest but for timings, and every shard's bytes): "
            f"**{w['identical']}**, content hash {w['content_hash'][:12]}.",
            f"- Seconds per step of the last run (summed over tasks): {w['runs'][-1]['seconds']}.",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "_decontaminate":
        return _decontaminate_once(sys.argv[2])
    if len(sys.argv) == 6 and sys.argv[1] == "_prepare":
        return _prepare_once(*sys.argv[2:])
    parts = ["tokenize", "decontaminate", "prepare", "workers"]
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("parts", nargs="*", default=["all"], help=f"any of {parts}, or all")
    parser.add_argument(
        "--tokenizer", type=Path, default=None, help="tokenizer directory (default: quickstart 32k)"
    )
    args = parser.parse_args()
    chosen = parts if "all" in args.parts else args.parts
    if not DATA.is_dir():
        raise SystemExit(f"needs {DATA} (the shared corpora)")
    WORK.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    host = machine_name()
    json_path = RESULTS / f"data-{host}.json"
    results = json.loads(json_path.read_text()) if json_path.exists() else {}
    results.update({"machine": machine(), "date": time.strftime("%Y-%m-%d"), "parts": chosen})
    tokenizer = args.tokenizer or default_tokenizer()
    texts = load_texts() if {"tokenize", "decontaminate"} & set(chosen) else []
    steps = {
        "tokenize": lambda: bench_tokenize(texts, tokenizer, results),
        "decontaminate": lambda: bench_decontaminate(texts, results),
        "prepare": lambda: bench_prepare(tokenizer, results),
        "workers": lambda: bench_workers(tokenizer, results),
    }
    for part in chosen:
        steps[part]()
        results.setdefault("ran", {})[part] = time.strftime("%Y-%m-%d %H:%M")
        json_path.write_text(json.dumps(results, ensure_ascii=False, indent=1))
        (RESULTS / f"data-{host}.md").write_text(write_markdown(results))
    print(f"wrote {json_path} and .md")


if __name__ == "__main__":
    main()
