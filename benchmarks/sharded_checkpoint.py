"""Host memory of a checkpoint save on 2 FSDP ranks (CPU, gloo): sharded pieces vs the single file.

    python benchmarks/sharded_checkpoint.py --preset small              # both layouts
    python benchmarks/sharded_checkpoint.py --preset 1b --layouts sharded  # 24 GiB: the single file does not fit

Each (preset, layout) runs in 2 fresh spawned processes that join a gloo group on 127.0.0.1, build
the model sharded by FSDP2 with AdamW moments in place (as after a step: zeros, no training needed),
then save once. Per rank: the resident set once built (VmRSS) and its peak during the save (VmHWM,
reset just before; glibc told to return freed blocks, so the peak follows the live buffers). The
sharded layout (cuda_model/sharded.py) writes each rank's pieces; the single-file one gathers every
weight and moment whole onto rank 0 (and safetensors serialises a copy), so what the save adds is
about the shard on each rank for the former and about twice the whole model on rank 0 for the
latter. A layout that does not fit in the machine's memory is recorded as such (the peak is then
estimated from the model's size, and said so). Results: benchmarks/results/sharded-checkpoint-<machine>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hardware import cpu_name  # benchmarks/hardware.py
from model_torch import RESULTS, machine_name, proc_status  # benchmarks/model_torch.py

REPO = Path(__file__).resolve().parents[1]
WORLD = 2


def rank_main(rank: int, world: int, address, preset: str, layout: str, out: str, results) -> None:
    import torch

    sys.path.insert(0, str(REPO))
    from cuda_model import parallel
    from cuda_model.backend import TorchBackend
    from orchestration.core.optim import OptimConfig
    from orchestration.core.presets import PRESETS

    torch.set_num_threads(1)
    if rank == 0:
        fd, port = parallel.listen("127.0.0.1")
        address.put(port)
    else:
        fd, port = None, address.get()
    parallel.init_group(rank, world, "127.0.0.1", port, listen_fd=fd, timeout_s=1800)
    backend = TorchBackend("cpu")
    state = backend.init_train_state(backend.new_model(PRESETS[preset]), OptimConfig(lr=1e-4, total_steps=10),
                                     parallel="fsdp")  # fmt: skip
    for p in state.model.parameters():  # the moments a step would have made, without the step's memory
        state.optimizer.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p),
                                    "exp_avg_sq": torch.zeros_like(p)}  # fmt: skip
    state.step, state.data_cursor = 1, {}
    if layout == "single":
        state.parallel = "fsdp-gathered"  # not 'fsdp': TorchBackend.save takes the gather-to-rank-0 path
    parallel.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM: the peak from here on
    built = proc_status("VmRSS")
    start = time.perf_counter()
    backend.save(state.model, Path(out) / layout, state)
    seconds = time.perf_counter() - start
    results.put({"rank": rank, "built_mb": built, "peak_mb": proc_status("VmHWM"), "save_s": seconds})
    torch.distributed.destroy_process_group()


def measure(preset: str, layout: str) -> dict:
    """Spawn the ranks in a child process of their own (so a rank killed for memory is one row)."""
    with tempfile.TemporaryDirectory(prefix="hanyeong-sharded-") as out:
        command = [sys.executable, __file__, "--worker", preset, layout, out]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, check=False)
        if done.returncode:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
            return {"preset": preset, "layout": layout, "error": tail[0] if tail else f"exit {done.returncode}"}
        return json.loads(done.stdout.strip().splitlines()[-1])


def worker(preset: str, layout: str, out: str) -> None:
    import torch.multiprocessing as mp

    from orchestration.core.presets import PRESETS

    context = mp.get_context("spawn")
    address, results = context.SimpleQueue(), context.SimpleQueue()
    mp.start_processes(rank_main, args=(WORLD, address, preset, layout, out, results), nprocs=WORLD,
                       start_method="spawn")  # fmt: skip
    ranks = sorted((results.get() for _ in range(WORLD)), key=lambda r: r["rank"])
    spec = PRESETS[preset]
    print(json.dumps({"preset": preset, "layout": layout, "parameters": spec.parameter_count(),
                      "state_mb": 3 * 4 * spec.parameter_count() / 2**20, "ranks": ranks}))  # fmt: skip


def markdown(results: dict) -> str:
    lines = ["# Sharded vs single-file checkpoint saves (2 FSDP ranks, CPU, gloo)", "",
             f"Machine: {results['machine']}. Run {results['date']}; torch {results['torch']}. Each row: the "
             "model sharded over 2 ranks with its AdamW moments, one save. 'state' is the whole fp32 "
             "weights + moments (12 bytes a parameter); a rank holds half of it before the save.", "",
             "| preset | parameters | state (MiB) | layout | rank | built (MiB) | peak in save (MiB) | added by the save (MiB) | save s |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for row in results["rows"]:
        if "error" in row:
            lines.append(f"| {row['preset']} | | | {row['layout']} | | | did not run: {row['error']} | | |")
            continue
        for r in row["ranks"]:
            lines.append(f"| {row['preset']} | {row['parameters']:,} | {row['state_mb']:,.0f} | {row['layout']} | "
                         f"{r['rank']} | {r['built_mb']:,.0f} | {r['peak_mb']:,.0f} | "
                         f"{r['peak_mb'] - r['built_mb']:,.0f} | {r['save_s']:.1f} |")  # fmt: skip
    return "\n".join(lines + ["", results.get("note", ""), ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", action="append", help="model preset(s) (default: small and 1b)")
    parser.add_argument("--layouts", nargs="+", default=["sharded", "single"], choices=["sharded", "single"])
    parser.add_argument("--note", default="")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)
    import torch

    rows = []
    for preset in args.preset or ["small", "1b"]:
        for layout in args.layouts:
            rows.append(measure(preset, layout))
            print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"sharded-checkpoint-{machine_name()}.json"
    done = {(r["preset"], r["layout"]) for r in rows}  # a run replaces its rows and keeps the others
    kept = [r for r in json.loads(path.read_text())["rows"] if (r["preset"], r["layout"]) not in done] if path.exists() else []
    results = {"machine": f"{cpu_name()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
               "torch": torch.__version__, "note": args.note, "rows": kept + rows}  # fmt: skip
    path.write_text(json.dumps(results, indent=1))
    path.with_suffix(".md").write_text(markdown(results))
    print(f"wrote {path} and .md")


if __name__ == "__main__":
    main()
