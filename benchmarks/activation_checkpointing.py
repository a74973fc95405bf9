"""Activation checkpointing (PyTorch backend): peak memory and step time of a train step, on and off.

    python benchmarks/activation_checkpointing.py          # CPU: preset small, 1 x 2048 tokens, fp32
    python benchmarks/activation_checkpointing.py --gpu    # GPU: preset 1b, 4 x 4096 tokens, bf16

Each setting runs alone in a fresh process (the order flipped every round, so a background load hits
both alike): the same seeded weights and random batch, one warm-up step, then `--steps` timed ones
(the median reported). CPU memory is the peak resident set over the steps (VmHWM, reset once the
state is built; glibc told to return freed blocks, so it follows the live tensors); GPU memory is
torch.cuda.max_memory_allocated. MFU counts model FLOPs only (spec.flops_per_token: the recomputed
forward is not useful work), so it drops by what recomputing costs. The losses on and off must be
equal: the same math. Results go to benchmarks/results/activation-checkpointing-<machine>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from hardware import cpu_name  # benchmarks/hardware.py
from model_torch import PEAK_BF16, RESULTS, machine_name, proc_status  # benchmarks/model_torch.py

REPO = Path(__file__).resolve().parents[1]


def worker(gpu: bool, recompute: bool, preset: str, rows: int, seq_len: int, steps: int,
           compile: bool) -> dict:  # fmt: skip
    """One setting in this process: its step times, peak memory and losses."""
    import numpy as np
    import torch

    from cuda_model.backend import TorchBackend
    from orchestration.core.batch import Batch
    from orchestration.core.optim import OptimConfig
    from orchestration.core.presets import PRESETS

    spec = PRESETS[preset].replace(max_seq_len=max(seq_len, PRESETS[preset].max_seq_len))
    backend = TorchBackend("cuda" if gpu else "cpu")
    torch.manual_seed(0)  # on a GPU nn.Linear's own init (seeded: the same weights on and off)
    model = backend.new_model(spec) if gpu else backend.init(spec, seed=0)
    state = backend.init_train_state(model, OptimConfig(lr=1e-4, total_steps=100), compile=compile,
                                     activation_checkpointing=recompute)  # fmt: skip
    tokens = np.random.default_rng(0).integers(0, spec.vocab_size, (rows, seq_len + 1))
    batch = Batch.from_tokens(tokens)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM: the peak from here on
    loaded = torch.cuda.memory_allocated() / 2**20 if gpu else proc_status("VmRSS")
    losses, times = [], []
    for _ in range(steps + 1):  # the first: AdamW's moments are created, compilation
        start = time.perf_counter()
        losses.append(backend.train_step(state, batch)["loss"])  # .item(): synchronises
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times[1:])
    out = {"activation_checkpointing": recompute, "preset": preset, "parameters": spec.parameter_count(),
           "rows": rows, "seq_len": seq_len, "compile": compile, "step_s": step_s, "times": times[1:],
           "tokens_per_s": rows * seq_len / step_s, "losses": losses, "loaded_mb": loaded,
           "threads": torch.get_num_threads(), "torch": torch.__version__}  # fmt: skip
    if gpu:
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        out |= {"gpu": name, "peak_mb": torch.cuda.max_memory_allocated() / 2**20,
                "mfu": out["tokens_per_s"] * spec.flops_per_token(seq_len) / peak if peak else None}  # fmt: skip
    else:
        out["peak_mb"] = proc_status("VmHWM")
    return out


def run(args: argparse.Namespace) -> list[dict]:
    """Every (round, setting) in a fresh process, the order flipped each round."""
    runs = []
    for r in range(args.rounds):
        for recompute in (False, True) if r % 2 == 0 else (True, False):
            command = [sys.executable, __file__, "--worker", str(int(recompute)), "--preset", args.preset,
                       "--rows", str(args.rows), "--seq-len", str(args.seq_len), "--steps", str(args.steps)]
            command += ["--gpu"] if args.gpu else []
            command += ["--compile"] if args.compile else []
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed blocks leave the RSS
            out = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, check=False)
            if out.returncode:
                tail = (out.stderr or out.stdout).strip().splitlines()[-1:]
                runs.append({"activation_checkpointing": recompute, "error": tail[0] if tail else "?"})
            else:
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps({k: v for k, v in runs[-1].items() if k not in ("times", "losses")}), flush=True)
    return runs


def summarise(runs: list[dict]) -> dict:
    """Per setting: the lowest peak, the fastest median step, the losses; and the on/off ratios."""
    summary = {}
    for recompute in (False, True):
        ok = [r for r in runs if r["activation_checkpointing"] is recompute and "error" not in r]
        if not ok:
            continue
        best = min(ok, key=lambda r: r["step_s"])
        summary["on" if recompute else "off"] = {
            "peak_mb": min(r["peak_mb"] for r in ok), "loaded_mb": min(r["loaded_mb"] for r in ok),
            "step_s": best["step_s"], "tokens_per_s": best["tokens_per_s"], "mfu": best.get("mfu"),
            "first_loss": ok[0]["losses"][0], "last_loss": ok[0]["losses"][-1]}  # fmt: skip
    if len(summary) == 2:
        on, off = summary["on"], summary["off"]
        summary["saved_mb"] = off["peak_mb"] - on["peak_mb"]  # the activations no longer kept
        summary["peak_ratio"] = on["peak_mb"] / off["peak_mb"]
        summary["added_ratio"] = (on["peak_mb"] - on["loaded_mb"]) / (off["peak_mb"] - off["loaded_mb"])
        summary["time_ratio"] = on["step_s"] / off["step_s"]
        summary["same_losses"] = abs(on["first_loss"] - off["first_loss"]) <= 1e-6 * abs(off["first_loss"])
    return summary


def write_markdown(results: dict) -> str:
    lines = ["# Activation checkpointing (PyTorch backend)", ""]
    for part, title in (("cpu", "CPU, fp32"), ("gpu", "GPU, bf16 autocast")):
        if part not in results:
            continue
        r, s = results[part], results[part]["summary"]
        lines += [f"## {title}: preset `{r['preset']}`, {r['rows']} x {r['seq_len']} tokens per step",
                  "", f"Machine: {r['machine']}. Run {r['date']}; torch {r['torch']}, {r['threads']} threads"
                  f"{', compiled' if r['compile'] else ''}. Each setting alone in a fresh process, {r['rounds']} "
                  f"round(s), {r['steps']} timed steps after a warm-up; the lower peak and the faster median "
                  "step of its rounds.", "",
                  "| activation checkpointing | peak memory (MiB) | memory once built (MiB) | s/step | tokens/s | MFU | first loss |",
                  "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for key in ("off", "on"):
            if key in s:
                x = s[key]
                mfu = f"{x['mfu']:.1%}" if x.get("mfu") else "n/a"
                lines.append(f"| {key} | {x['peak_mb']:,.0f} | {x['loaded_mb']:,.0f} | {x['step_s']:.3f} | "
                             f"{x['tokens_per_s']:,.0f} | {mfu} | {x['first_loss']:.6f} |")  # fmt: skip
        if "peak_ratio" in s:
            lines += ["", f"With it on: peak memory {s['saved_mb']:,.0f} MiB lower, x{s['peak_ratio']:.2f} (what "
                      f"training adds on top of the built state: x{s['added_ratio']:.2f}), step time "
                      f"x{s['time_ratio']:.2f}; the same losses: {'yes' if s['same_losses'] else 'NO'}."]  # fmt: skip
        lines += ["", r.get("note", ""), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="on CUDA, bf16: preset 1b, seq 4096, MFU")
    parser.add_argument("--preset", default=None, help="model preset (small on CPU, 1b on GPU)")
    parser.add_argument("--rows", type=int, default=None, help="sequences per step (1 on CPU, 4 on GPU)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (2048 CPU, 4096 GPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per process (2 CPU, 10 GPU)")
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per setting")
    parser.add_argument("--compile", action="store_true", help="torch.compile the loss (HANYEONG_TORCH_COMPILE)")
    parser.add_argument("--note", default="", help="a sentence for the markdown (conditions of the run)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.preset = args.preset or ("1b" if args.gpu else "small")
    args.rows = args.rows or (4 if args.gpu else 1)
    args.seq_len = args.seq_len or (4096 if args.gpu else 2048)
    args.steps = args.steps or (10 if args.gpu else 2)
    if args.worker is not None:
        print(json.dumps(worker(args.gpu, bool(args.worker), args.preset, args.rows, args.seq_len, args.steps,
                                args.compile)))  # fmt: skip
        return
    runs = run(args)
    first = next((r for r in runs if "error" not in r), {})
    gpu = first.get("gpu")
    part = {"preset": args.preset, "rows": args.rows, "seq_len": args.seq_len, "steps": args.steps,
            "rounds": args.rounds, "compile": args.compile, "date": time.strftime("%Y-%m-%d"),
            "machine": (f"{gpu}; " if gpu else "") + f"{cpu_name()}, {os.cpu_count()} cores",
            "torch": first.get("torch", "?"), "threads": first.get("threads", "?"), "note": args.note,
            "summary": summarise(runs), "runs": runs}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"activation-checkpointing-{machine_name(gpu)}.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results["gpu" if args.gpu else "cpu"] = part
    path.write_text(json.dumps(results, indent=1))
    path.with_suffix(".md").write_text(write_markdown(results))
    print(f"wrote {path} and .md")


if __name__ == "__main__":
    main()
