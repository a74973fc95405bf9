"""PyTorch backend benchmarks: a CPU train step against transformers' Llama, and GPU throughput/MFU.

    python benchmarks/model_torch.py cpu            # ~20M model, seq 512: ours vs LlamaForCausalLM
    python benchmarks/model_torch.py gpu            # preset 1b, bf16, seq 4096: tokens/s, MFU, memory

cpu: speed with both implementations in one process, one step each per round, the order flipped
every round, so a background load hits both alike; memory with each alone in a fresh process
(resident set once loaded vs its peak over two train steps, glibc told to return freed blocks).
gpu: one process per configuration (compile on/off, fused AdamW on/off, micro-batch), random
tokens, global batch = micro-batch (no accumulation); MFU = tokens/s x spec.flops_per_token(T) / the
GPU's dense bf16 peak. Results go to benchmarks/results/model-torch-<machine>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from hardware import cpu_name  # benchmarks/hardware.py
from hardware import machine_name as base_machine_name

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
CPU_SHAPE = dict(
    vocab_size=16_000
)  # on preset "small": d 384, 8 layers, 6 heads / 2 kv, d_ff 1024, tied
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense TFLOP/s


def machine_name(gpu: str | None = None) -> str:
    """Named by the kind of machine, not its (random, container) host name, as benchmarks/tokenizer.py."""
    name = base_machine_name()
    return name + ("-" + re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-") if gpu else "")




def proc_status(field: str) -> float:
    """A /proc/self/status memory field in MB (Linux)."""
    found = re.search(rf"{field}:\s*(\d+) kB", Path("/proc/self/status").read_text())
    return int(found.group(1)) / 1024


def hf_llama(spec):
    import transformers

    rope = {"rope_type": "default", "rope_theta": spec.rope_theta}
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.d_model, intermediate_size=spec.d_ff,
        num_hidden_layers=spec.n_layers, num_attention_heads=spec.n_heads,
        num_key_value_heads=spec.n_kv_heads, head_dim=spec.head_dim, max_position_embeddings=spec.max_seq_len,
        rms_norm_eps=spec.norm_eps, tie_word_embeddings=spec.tie_embeddings, rope_parameters=rope,
        attn_implementation="sdpa",
    ))  # fmt: skip


# ---- cpu: one fresh process per measurement ---------------------------------------------------


def make_step(impl: str, ckpt: str, rows: int, seq_len: int):
    """A function taking one fp32 train step (fwd + bwd + clip + AdamW) of `impl`; returns the loss."""
    import torch
    from safetensors.torch import load_file

    from cuda_model.backend import TorchBackend
    from orchestration.core.batch import Batch
    from orchestration.core.checkpoint import load_spec
    from orchestration.core.optim import OptimConfig, decays, lr_at

    backend, optim = TorchBackend("cpu"), OptimConfig(lr=1e-4, total_steps=100)
    tokens = np.random.default_rng(0).integers(0, CPU_SHAPE["vocab_size"], (rows, seq_len + 1))
    if impl == "ours":
        state = backend.init_train_state(backend.load(ckpt), optim, fused=False)
        batch = Batch.from_tokens(tokens)
        return lambda: backend.train_step(state, batch)["loss"]
    spec = load_spec(ckpt)
    hf = hf_llama(spec)
    hf.load_state_dict(load_file(Path(ckpt) / "model.safetensors"), strict=False)
    named = list(hf.named_parameters())  # transformers drops the tied lm_head from this list
    groups = [{"params": [p for n, p in named if decays(n, optim)], "weight_decay": optim.weight_decay},
              {"params": [p for n, p in named if not decays(n, optim)], "weight_decay": 0.0}]  # fmt: skip
    opt = torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, foreach=True)
    x, step_no = torch.from_numpy(tokens[:, :-1]), [0]

    def step() -> float:  # transformers' own loss path (labels are shifted inside)
        loss = hf(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), optim.grad_clip, foreach=True)
        for g in opt.param_groups:
            g["lr"] = lr_at(optim, step_no[0])
        opt.step()
        opt.zero_grad(set_to_none=True)
        step_no[0] += 1
        return loss.item()

    return step


def cpu_worker(impl: str, ckpt: str, rows: int, seq_len: int, steps: int) -> dict:
    """Memory of `impl` alone in this process: 1 warm-up step, then `steps` measured ones."""
    step = make_step(impl, ckpt, rows, seq_len)
    before, load_peak = proc_status("VmRSS"), proc_status("VmHWM")  # loaded, nothing trained yet
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: peak from here on
    first_loss = step()  # includes AdamW's lazily created moments
    for _ in range(steps):
        step()
    peak = proc_status("VmHWM")
    return {"impl": impl, "first_loss": first_loss, "rss_before_mb": before, "train_peak_mb": peak,
            "train_added_mb": peak - before,
            "load_peak_mb": load_peak}  # fmt: skip


def bench_cpu(rounds: int, rows: int, seq_len: int) -> dict:
    import torch

    from cuda_model.backend import TorchBackend
    from orchestration.core.presets import PRESETS

    spec = PRESETS["small"].replace(**CPU_SHAPE)
    ckpt = Path(tempfile.mkdtemp()) / "ckpt"
    backend = TorchBackend("cpu")
    backend.save(backend.init(spec, seed=0), ckpt)
    impls = ("ours", "transformers")
    # 1) speed: both in this process, steps alternating (order flipped each round), so a
    #    background load slows both alike; per-round ratios as well as medians
    steps = {impl: make_step(impl, str(ckpt), rows, seq_len) for impl in impls}
    first_loss = {impl: steps[impl]() for impl in impls}  # warm-up
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    for r in range(rounds):
        for impl in impls if r % 2 == 0 else impls[::-1]:
            t = time.perf_counter()
            steps[impl]()
            times[impl].append(time.perf_counter() - t)
        print(f"round {r}: " + ", ".join(f"{i} {times[i][-1]:.2f} s" for i in impls), flush=True)
    del steps
    # 2) memory: each alone in a fresh process, twice, alternating
    memory: dict[str, list[dict]] = {impl: [] for impl in impls}
    for r in range(2):
        for impl in impls if r % 2 == 0 else impls[::-1]:
            # glibc keeps freed large blocks in the heap; a low mmap threshold returns them at once,
            # so the resident set follows the live tensors of either implementation
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            out = subprocess.run([sys.executable, __file__, "cpu-worker", impl, str(ckpt), str(rows), str(seq_len), "1"],
                                 capture_output=True, text=True, check=True, cwd=REPO, env=env)  # fmt: skip
            memory[impl].append(json.loads(out.stdout.strip().splitlines()[-1]))
    summary = {}
    for impl in impls:
        ms = memory[impl]
        summary[impl] = {"median_step_s": statistics.median(times[impl]), "min_step_s": min(times[impl]),
                         "tokens_per_s": rows * seq_len / statistics.median(times[impl]),
                         "train_added_mb": min(m["train_added_mb"] for m in ms),
                         "train_peak_mb": min(m["train_peak_mb"] for m in ms),
                         "load_peak_mb": min(m["load_peak_mb"] for m in ms), "first_loss": first_loss[impl]}  # fmt: skip
    ratios = [h / o for o, h in zip(times["ours"], times["transformers"])]
    return {"spec": spec.to_dict(), "parameters": spec.parameter_count(), "rows": rows, "seq_len": seq_len,
            "rounds": rounds, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "speedup": statistics.median(ratios),
            "speedup_of_fastest": min(times["transformers"]) / min(times["ours"]), "speedup_of_medians":
            summary["transformers"]["median_step_s"] / summary["ours"]["median_step_s"],
            "summary": summary, "times": times, "memory_runs": memory}  # fmt: skip


# ---- gpu ----------------------------------------------------------------------------------------


def gpu_worker(
    rows: int, seq_len: int, compile: bool, fused: bool, steps: int, warmup: int
) -> dict:
    import torch

    from cuda_model import step as train
    from cuda_model.backend import TorchBackend
    from orchestration.core.optim import OptimConfig
    from orchestration.core.presets import PRESETS

    spec = PRESETS["1b"].replace(max_seq_len=max(seq_len, PRESETS["1b"].max_seq_len))
    backend = TorchBackend("cuda")
    model = backend.new_model(spec)  # nn.Linear's init on the GPU: the values do not matter here
    state = backend.init_train_state(
        model, OptimConfig(lr=1e-4, total_steps=1000), compile=compile, fused=fused
    )
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, spec.vocab_size, (rows, seq_len + 1), device="cuda", generator=gen)
    batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": None, "segment_ids": None}
    t0 = time.perf_counter()
    for _ in range(warmup):
        train.train_step(state, batch)
    torch.cuda.synchronize()
    warmup_s, t = time.perf_counter() - t0, time.perf_counter()
    losses = [
        train.train_step(state, batch)["loss"] for _ in range(steps)
    ]  # .item() syncs each step
    elapsed = time.perf_counter() - t
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    tokens_per_s = steps * rows * seq_len / elapsed
    return {"gpu": name, "rows": rows, "seq_len": seq_len, "compile": compile, "fused_adamw": fused,
            "parameters": spec.parameter_count(), "step_s": elapsed / steps, "tokens_per_s": tokens_per_s,
            "flops_per_token": spec.flops_per_token(seq_len), "peak_flops": peak,
            "mfu": tokens_per_s * spec.flops_per_token(seq_len) / peak if peak else None,
            "max_allocated_gb": torch.cuda.max_memory_allocated() / 2**30,
            "max_reserved_gb": torch.cuda.max_memory_reserved() / 2**30, "warmup_s": warmup_s,
            "losses": losses, "torch": torch.__version__}  # fmt: skip


def bench_gpu(configs: list[str], seq_len: int, steps: int, warmup: int) -> list[dict]:
    rows = []
    for config in configs:  # e.g. "compile,fused,4": flags present or not, then the micro-batch
        parts = config.split(",")
        args = [str(int(p in parts)) for p in ("compile", "fused")] + [parts[-1]]
        out = subprocess.run([sys.executable, __file__, "gpu-worker", *args, str(seq_len), str(steps), str(warmup)],
                             capture_output=True, text=True, cwd=REPO, check=False)  # fmt: skip
        if out.returncode:
            tail = (out.stderr or out.stdout).strip().splitlines()[-1:]
            rows.append({"config": config, "error": tail[0] if tail else f"exit {out.returncode}"})
        else:
            rows.append({"config": config, **json.loads(out.stdout.strip().splitlines()[-1])})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "losses"}), flush=True)
    return rows


# ---- report -------------------------------------------------------------------------------------


def write_markdown(results: dict) -> str:
    lines = [
        "# PyTorch backend benchmarks",
        "",
        f"Machine: {results['machine']}. Run {results['date']}.",
        "",
    ]
    if "cpu" in results:
        c = results["cpu"]
        lines += [f"## CPU train step: ours vs transformers.LlamaForCausalLM (torch {c['torch']}, {c['threads']} threads)", "",
                  f"Model: preset `small` with vocab {c['spec']['vocab_size']:,} ({c['parameters']:,} parameters, tied), "
                  f"batch {c['rows']} x {c['seq_len']} tokens, fp32, AdamW (foreach), clipping; same weights from one "
                  f"checkpoint. Speed: both in one process after a warm-up step, {c['rounds']} rounds of one step "
                  "each, the order flipped every round. Memory: each alone in a fresh process (twice, the lower "
                  "figure; MALLOC_MMAP_THRESHOLD_=65536 so freed tensors leave the resident set): resident set "
                  "once the model is loaded vs its peak over two train steps (AdamW moments included).", "",
                  "| implementation | median s/step | min s/step | tokens/s | RSS added by training (MB) | peak RSS in training (MB) | peak RSS while loading (MB) | first loss |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for impl, s in c["summary"].items():
            lines.append(f"| {impl} | {s['median_step_s']:.3f} | {s['min_step_s']:.3f} | {s['tokens_per_s']:,.0f} | "
                         f"{s['train_added_mb']:.0f} | {s['train_peak_mb']:.0f} | {s['load_peak_mb']:.0f} | {s['first_loss']:.4f} |")  # fmt: skip
        lines += [
            "",
            f"Speed of ours / transformers: **{c['speedup_of_fastest']:.2f}x** comparing each one's "
            f"fastest (least disturbed) step; {c['speedup']:.2f}x as the median of per-round ratios, "
            f"{c['speedup_of_medians']:.2f}x as the ratio of median steps (these two move with the "
            "background load).",
            "",
        ]
        lines += [c.get("note", ""), ""]
    if "gpu" in results:
        torch_version = next((r["torch"] for r in results["gpu"]["runs"] if "torch" in r), "?")
        lines += [f"## GPU: preset `1b`, bf16 autocast, fp32 master weights and AdamW moments (torch {torch_version})", "",
                  "| config | micro-batch x seq | s/step | tokens/s | MFU | max allocated GB | reserved GB | warm-up s |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for r in results["gpu"]["runs"]:
            if "error" in r:
                lines.append(f"| {r['config']} | | failed: {r['error'][:80]} | | | | | |")
                continue
            mfu = f"{r['mfu']:.1%}" if r["mfu"] else "n/a"
            lines.append(f"| {r['config']} | {r['rows']} x {r['seq_len']} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | "
                         f"{mfu} | {r['max_allocated_gb']:.1f} | {r['max_reserved_gb']:.1f} | {r['warmup_s']:.0f} |")  # fmt: skip
        lines += ["", results["gpu"].get("note", ""), ""]
    return "\n".join(lines)


def save(results: dict, out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"model-torch-{name}.json"
    old = json.loads(json_path.read_text()) if json_path.exists() else {}
    merged = {**old, **results}
    json_path.write_text(json.dumps(merged, indent=1))
    (out / f"model-torch-{name}.md").write_text(write_markdown(merged))
    print(f"wrote {json_path} and .md")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "cpu-worker":
        impl, ckpt, rows, seq_len, steps = sys.argv[2:7]
        print(json.dumps(cpu_worker(impl, ckpt, int(rows), int(seq_len), int(steps))))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "gpu-worker":
        compile, fused, rows, seq_len, steps, warmup = map(int, sys.argv[2:8])
        print(json.dumps(gpu_worker(rows, seq_len, bool(compile), bool(fused), steps, warmup)))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("part", choices=["cpu", "gpu"])
    parser.add_argument(
        "--rounds", type=int, default=8, help="cpu: alternating rounds (one step of each)"
    )
    parser.add_argument("--steps", type=int, default=10, help="gpu: timed steps per configuration")
    parser.add_argument("--rows", type=int, default=4, help="cpu: sequences per batch")
    parser.add_argument("--seq-len", type=int, default=None, help="512 on cpu, 4096 on gpu")
    parser.add_argument(
        "--configs",
        default="fused,2;compile,fused,2;compile,fused,4",
        help="gpu: ';'-separated configurations: flags 'compile', 'fused', then the micro-batch",
    )
    parser.add_argument(
        "--warmup", type=int, default=3, help="gpu: untimed steps (compilation) first"
    )
    parser.add_argument(
        "--note", default="", help="a sentence for the markdown (conditions of the run)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    results = {"date": time.strftime("%Y-%m-%d")}
    if args.part == "cpu":
        results["cpu"] = bench_cpu(args.rounds, args.rows, args.seq_len or 512)
        results["cpu"]["note"] = args.note
        results["machine"] = f"{cpu_name()}, {os.cpu_count()} cores"
        save(results, args.out, machine_name())
    else:
        runs = bench_gpu(args.configs.split(";"), args.seq_len or 4096, args.steps, args.warmup)
        gpu = next((r["gpu"] for r in runs if "gpu" in r), "unknown GPU")
        results["gpu"] = {"runs": runs, "note": args.note}
        results["machine"] = f"{gpu}; {cpu_name()}, {os.cpu_count()} cores"
        save(results, args.out, machine_name(gpu))


if __name__ == "__main__":
    main()
