"""Pipeline benchmark: where the quickstart's wall time goes, and what the orchestration costs.

    python benchmarks/pipeline.py                       # recipes/quickstart.toml, ~5-10 min on 2 cores
    python benchmarks/pipeline.py --recipe recipes/x.toml

Runs `hanyeong pipeline run RECIPE --run-dir $HANYEONG_BENCH_WORK/hanyeong-bench/pipeline/run -q`
from an empty run directory as a fresh process (the wall time a user sees), then once more (the
no-op rerun). The breakdown comes from the run's manifest (driver timings), each stage's
attempts.jsonl (when its worker started) and metrics.jsonl (when each step ended, its own seconds):

- orchestration overhead: Ray start and shutdown, dispatch (submit -> worker start, worker end ->
  result), checkpoint I/O (the extra time of the steps after a checkpoint, plus the final save),
  the loss plot, and the rest of the driver (process start, recipe, manifest);
- not overhead, reported apart: tokenizer training, dataset preparation, stage setup (imports,
  data loading, model init: an in-process run pays it too), training steps.

Checkpoint I/O is cross-checked by timing `backend.save` of the last stage's checkpoint directly.
Results go to benchmarks/results/pipeline-<machine>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hardware import cpu_name, machine_name  # benchmarks/hardware.py

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
WORK = Path(os.environ.get("HANYEONG_BENCH_WORK", tempfile.gettempdir())) / "hanyeong-bench" / "pipeline"
GOAL = 0.10  # orchestration overhead under 10% of the quickstart's wall time


def machine() -> dict:
    import ray
    import torch

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "os": platform.platform(),
            "python": platform.python_version(), "ray": ray.__version__, "torch": torch.__version__}  # fmt: skip


def hanyeong(*args: str) -> float:
    """Run the CLI as a fresh process; its wall seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "orchestration.cli", *args], cwd=REPO, check=True)
    return time.perf_counter() - start


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def checkpoint_steps(metrics: list[dict], every: int | None) -> set[int]:
    """Indices of the metrics lines after whose step the checkpointer saved (before the final one)."""
    if not every:
        return set()
    out = set()
    for i, m in enumerate(metrics[:-1]):
        step_tokens = m["seq_len"] * m["batch_rows"]
        if m["tokens"] // every > (m["tokens"] - step_tokens) // every:
            out.add(i)
    return out


def stage_breakdown(run_dir: Path, record: dict, every: int | None) -> dict:
    """Setup, steps, per-step bookkeeping, checkpoint I/O and the final save of one stage's attempt."""
    metrics = lines(run_dir / record["dir"] / "metrics.jsonl")
    started = lines(run_dir / record["dir"] / "attempts.jsonl")[-1]["started"]
    steps = sum(m["step_seconds"] for m in metrics)
    gaps = [b["time"] - a["time"] - b["step_seconds"] for a, b in zip(metrics, metrics[1:])]
    saved = checkpoint_steps(metrics, every)
    plain = [g for i, g in enumerate(gaps) if i not in saved] or [0.0]
    typical = statistics.median(plain)
    intermediate = sum(gaps[i] - typical for i in saved if i < len(gaps))
    first_start = metrics[0]["time"] - metrics[0]["step_seconds"]
    final = started + record["run_seconds"] - metrics[-1]["time"]  # the last save, reading the log back
    return {"steps": len(metrics), "setup": first_start - started, "step_compute": steps,
            "between_steps": sum(gaps) - intermediate, "checkpoints": len(saved) + 1,
            "checkpoint_io": max(0.0, intermediate) + max(0.0, final), "run_seconds": record["run_seconds"],
            "driver_seconds": record["seconds"]}  # fmt: skip


def timed_save(checkpoint: Path, repeats: int = 3) -> dict:
    """Seconds per `backend.save` of a training checkpoint (weights, AdamW moments, state)."""
    from orchestration.core.backends import get_backend

    backend = get_backend("torch")
    state = backend.load_train_state(checkpoint)
    out = Path(tempfile.mkdtemp(prefix="save-", dir=WORK))
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        backend.save(state.model, out / "ckpt", state)
        seconds.append(time.perf_counter() - start)
    size = sum(f.stat().st_size for f in (out / "ckpt").iterdir())
    shutil.rmtree(out)
    return {"seconds": statistics.median(seconds), "bytes": size}


def bench(recipe: Path) -> dict:
    from orchestration.pipeline.recipe import load_recipe

    run_dir = WORK / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    WORK.mkdir(parents=True, exist_ok=True)
    wall = hanyeong("pipeline", "run", str(recipe), "--run-dir", str(run_dir), "-q")
    manifest = json.loads((run_dir / "manifest.json").read_text())  # before the rerun rewrites its timings
    rerun = hanyeong("pipeline", "run", str(recipe), "--run-dir", str(run_dir), "-q")
    loaded = load_recipe(recipe)
    stages = {s["name"]: stage_breakdown(run_dir, s, c.checkpoint_every_tokens)
              for s, c in zip(manifest["stages"], loaded.stages)}  # fmt: skip
    t = manifest["timings"]
    save = timed_save(run_dir / manifest["stages"][-1]["checkpoint"])
    checkpoint_io = sum(s["checkpoint_io"] for s in stages.values())
    overhead = {
        "ray_start": t.get("ray_start", 0.0),
        "ray_shutdown": t.get("ray_shutdown", 0.0),
        "dispatch": t.get("dispatch", 0.0),
        "checkpoint_io": checkpoint_io,
        "loss_plot": t.get("report", 0.0),
        "driver_rest": wall - t["total"] + (t["total"] - t["tokenizer"] - t["datasets"] - t.get("ray_start", 0.0)
                       - t.get("stages", 0.0) - t.get("ray_shutdown", 0.0) - t.get("report", 0.0)),
    }  # fmt: skip
    not_overhead = {
        "tokenizer": t["tokenizer"],
        "datasets": t["datasets"],
        "stage_setup": sum(s["setup"] for s in stages.values()),
        "step_compute": sum(s["step_compute"] for s in stages.values()),
        "between_steps": sum(s["between_steps"] for s in stages.values()),
    }
    total = sum(overhead.values())
    return {"recipe": str(recipe.relative_to(REPO) if recipe.is_relative_to(REPO) else recipe), "wall": wall,
            "rerun_wall": rerun, "overhead": overhead, "overhead_total": total, "overhead_share": total / wall,
            "not_overhead": not_overhead, "stages": stages, "timed_save": save,
            "checkpoints_written": sum(s["checkpoints"] for s in stages.values()),
            "losses": {s["name"]: [s["first_loss"], s["last_loss"]] for s in manifest["stages"]},
            "tokens": {s["name"]: s["tokens"] for s in manifest["stages"]}, "backend": manifest["backend"]}  # fmt: skip


def write_markdown(r: dict) -> str:
    m, before, after = r["machine"], *r["load_average"]
    wall = r["wall"]

    def row(name: str, seconds: float) -> str:
        return f"| {name} | {seconds:.2f} | {seconds / wall:.1%} |"

    out = [
        "# Pipeline benchmark: the quickstart's wall time and the orchestration's share",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores; {m['os']}; Python {m['python']}, Ray {m['ray']}, torch "
        f"{m['torch']}. Run {r['date']} with `python benchmarks/pipeline.py --recipe {r['recipe']}` "
        f"(backend {r['backend']}). The machine is shared: load average {before:.1f} before and {after:.1f} "
        f"after on {m['cores']} cores, so compute figures are slow by that share; the overhead figures much less.",
        "",
        f"`hanyeong pipeline run` from an empty run directory: **{wall:.1f} s** wall. Orchestration overhead: "
        f"**{r['overhead_total']:.1f} s = {r['overhead_share']:.1%}** (goal < {GOAL:.0%}). Rerunning the finished "
        f"recipe (nothing to do, no Ray started): {r['rerun_wall']:.1f} s.",
        "",
        "| orchestration overhead | seconds | share of wall |",
        "|---|---:|---:|",
        *(row(k.replace("_", " "), v) for k, v in r["overhead"].items()),
        row("**total**", r["overhead_total"]),
        "",
        "| not overhead (reported apart) | seconds | share of wall |",
        "|---|---:|---:|",
        *(row(k.replace("_", " "), v) for k, v in r["not_overhead"].items()),
        "",
        f"Checkpoint I/O: {r['checkpoints_written']} checkpoints written (weights, AdamW moments, trainer state); "
        f"`backend.save` of one takes {r['timed_save']['seconds'] * 1e3:.0f} ms for "
        f"{r['timed_save']['bytes'] / 1e6:.1f} MB when timed directly. Dispatch is submit -> worker start plus "
        "worker end -> result at the driver; driver rest is process start, recipe loading and manifest writes.",
        "",
        "| stage | steps | setup s | step compute s | between steps s | checkpoints | checkpoint I/O s | driver s | loss first -> last | tokens |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]  # fmt: skip
    for name, s in r["stages"].items():
        first, last = r["losses"][name]
        out.append(f"| {name} | {s['steps']} | {s['setup']:.2f} | {s['step_compute']:.1f} | {s['between_steps']:.2f} | "
                   f"{s['checkpoints']} | {s['checkpoint_io']:.2f} | {s['driver_seconds']:.1f} | {first:.3f} -> {last:.3f} | "
                   f"{r['tokens'][name]:,} |")  # fmt: skip
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "quickstart.toml")
    args = parser.parse_args()
    before = os.getloadavg()[0]
    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d")}
    results.update(bench(args.recipe.resolve()))
    results["load_average"] = [before, os.getloadavg()[0]]
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS / f"pipeline-{machine_name()}.json"
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    (RESULTS / f"pipeline-{machine_name()}.md").write_text(write_markdown(results))
    print(f"wrote {json_path} and .md")


if __name__ == "__main__":
    main()
