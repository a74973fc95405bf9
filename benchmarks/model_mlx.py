"""MLX train-step throughput: our model (mlx_model) against mlx-lm's own Llama of the same shape.

    python benchmarks/model_mlx.py                  # the Linux-CPU shape (a few minutes on 2 cores)
    python benchmarks/model_mlx.py --shape small    # bigger shapes: run them on Apple silicon

Both models get the same weights and the very same compiled train step (mlx_model.step: causal-LM
loss, value_and_grad, global-norm clipping, AdamW), so the only difference measured is the model
code. The two alternate, `--repeats` rounds of `--steps` timed steps each after a warm-up (which
also pays for mx.compile); the median round is reported. Results go to
benchmarks/results/model-mlx-<machine>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from orchestration.core.batch import Batch  # noqa: E402
from orchestration.core.optim import OptimConfig  # noqa: E402
from orchestration.core.presets import PRESETS  # noqa: E402
from orchestration.core.spec import ModelSpec  # noqa: E402

from hardware import cpu_name, machine_name  # benchmarks/hardware.py

# name -> (spec, rows, tokens per row)
SHAPES: dict[str, tuple[ModelSpec, int, int]] = {
    # Linux CPU (reference BLAS): small enough for a few seconds per step on 2 cores
    "cpu": (ModelSpec(vocab_size=4096, d_model=256, n_layers=4, n_heads=8, n_kv_heads=2, d_ff=704,
                      max_seq_len=512, tie_embeddings=True), 4, 128),
    "small": (PRESETS["small"], 8, 1024),  # ~60M with embeddings: an M-series laptop
    "1b": (PRESETS["1b"], 4, 2048),  # a 64 GB+ Mac
}  # fmt: skip


def machine() -> dict:
    cpu = cpu_name()
    import mlx_lm

    return {"cpu": cpu, "cores": os.cpu_count(), "os": platform.platform(), "python": platform.python_version(),
            "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__, "device": str(mx.default_device())}  # fmt: skip


def mlx_lm_model(spec: ModelSpec):
    """mlx-lm's Llama with the spec's shape."""
    from mlx_lm.models import llama

    args = llama.ModelArgs(
        model_type="llama", hidden_size=spec.d_model, num_hidden_layers=spec.n_layers,
        intermediate_size=spec.d_ff, num_attention_heads=spec.n_heads, num_key_value_heads=spec.n_kv_heads,
        head_dim=spec.head_dim, rms_norm_eps=spec.norm_eps, vocab_size=spec.vocab_size,
        rope_theta=spec.rope_theta, max_position_embeddings=spec.max_seq_len,
        tie_word_embeddings=spec.tie_embeddings,
    )  # fmt: skip
    return llama.Model(args)


def models(spec: ModelSpec) -> dict:
    """Ours and mlx-lm's, holding the same weights (the names are the same: no mapping)."""
    from mlx_model.model import Model

    ours = Model(spec)
    ours.init_weights(0)
    theirs = mlx_lm_model(spec)
    theirs.load_weights(tree_flatten(ours.parameters()), strict=True)
    mx.eval(theirs.parameters())
    return {"hanyeong mlx_model": ours, "mlx-lm llama": theirs}


def bench(spec: ModelSpec, rows: int, seq_len: int, steps: int, repeats: int, warmup: int) -> dict:
    from mlx_model import step as train

    batch = Batch.from_tokens(
        np.random.default_rng(0).integers(0, spec.vocab_size, (rows, seq_len + 1))
    )
    optim = OptimConfig(lr=1e-4, warmup_steps=0, total_steps=10**6)
    states = {
        name: train.init_train_state(m, optim, compile=True) for name, m in models(spec).items()
    }
    first_loss = {
        name: train.train_step(s, batch)["loss"] for name, s in states.items()
    }  # compiles
    for _ in range(warmup - 1):
        for s in states.values():
            train.train_step(s, batch)
    wall, cpu = {name: [] for name in states}, {name: [] for name in states}
    for _ in range(repeats):  # alternate, so drift in the machine's load hits both alike
        for name, s in states.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(steps):
                train.train_step(s, batch)
            tokens = rows * seq_len * steps
            wall[name].append(tokens / (time.perf_counter() - start))
            cpu[name].append(tokens / (time.process_time() - start_cpu))
    ours, theirs = states
    result = {name: {"tokens_per_s": round(statistics.median(wall[name]), 1),
                     "tokens_per_cpu_s": round(statistics.median(cpu[name]), 1),
                     "rounds": [round(x, 1) for x in wall[name]], "first_loss": round(first_loss[name], 6)}
              for name in states}  # fmt: skip
    # paired rounds (run back to back) cancel most of the drift of a shared machine's load
    paired = [a / b for a, b in zip(wall[ours], wall[theirs], strict=True)]
    paired_cpu = [a / b for a, b in zip(cpu[ours], cpu[theirs], strict=True)]
    return {"models": result, "ours_over_mlx_lm": round(statistics.median(paired), 3),
            "ours_over_mlx_lm_cpu_time": round(statistics.median(paired_cpu), 3),
            "paired_cpu_time_ratios": [round(x, 3) for x in paired_cpu]}  # fmt: skip


def write_markdown(results: dict) -> str:
    m, r, s = results["machine"], results["result"], results["shape"]
    linux = m["os"].startswith("Linux")
    lines = [
        "# MLX model benchmark: train-step throughput",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores; {m['os']}; Python {m['python']}, mlx {m['mlx']}, "
        f"mlx-lm {m['mlx_lm']}, device {m['device']}. Run {results['date']} with `{results['command']}`.",
        "",
        f"Shape `{results['shape_name']}`: vocab {s['vocab_size']:,}, d_model {s['d_model']}, {s['n_layers']} layers, "
        f"{s['n_heads']} heads / {s['n_kv_heads']} kv heads, d_ff {s['d_ff']}, tied {s['tie_embeddings']}; "
        f"{results['rows']} rows × {results['seq_len']} tokens per step, fp32. Same weights and the same compiled "
        f"step (loss, value_and_grad, clipping, AdamW) for both; {results['repeats']} alternating rounds of "
        f"{results['steps']} steps after {results['warmup']} warm-up steps, median round.",
        "",
        "| model | tokens/s (median) | tokens per CPU-second | rounds (tokens/s) | loss at step 1 |",
        "|---|---:|---:|---|---:|",
    ]
    for name, x in r["models"].items():
        rounds = ", ".join(f"{v:,.0f}" for v in x["rounds"])
        lines.append(
            f"| {name} | {x['tokens_per_s']:,} | {x['tokens_per_cpu_s']:,} | {rounds} | {x['first_loss']} |"
        )
    lines += ["", f"Ours / mlx-lm, median of back-to-back rounds: **{r['ours_over_mlx_lm']}×** wall time, "
              f"**{r['ours_over_mlx_lm_cpu_time']}×** CPU time (goal ≥ 1); the CPU-time ratios of the "
              f"rounds range {min(r['paired_cpu_time_ratios'])}–{max(r['paired_cpu_time_ratios'])}, so a "
              "median within a few percent of 1 is a tie. Equal step-1 losses: the two compute the same "
              "function; both run the fast kernels (mx.fast rms_norm, rope, scaled_dot_product_attention) "
              "inside one mx.compile'd step.", ""]  # fmt: skip
    if linux:
        lines += ["On Linux MLX runs on its CPU build (matrix products through a reference BLAS, no Metal): "
                  "these figures compare the two model codes with each other on the same machine and say "
                  "nothing about MLX's speed on Apple silicon, nor against PyTorch. Rerun on a Mac for real "
                  "throughput, e.g. `python benchmarks/model_mlx.py --shape small`.", ""]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=list(SHAPES), default="cpu")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round")
    parser.add_argument("--repeats", type=int, default=9, help="alternating rounds per model")
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed steps first (the first compiles)"
    )
    args = parser.parse_args()
    spec, rows, seq_len = SHAPES[args.shape]
    result = bench(spec, rows, seq_len, args.steps, args.repeats, args.warmup)
    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "shape_name": args.shape,
               "shape": spec.to_dict(), "rows": rows, "seq_len": seq_len, "steps": args.steps,
               "repeats": args.repeats, "warmup": args.warmup, "result": result,
               "command": " ".join(["python benchmarks/model_mlx.py", *sys.argv[1:]])}  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    # Named by the kind of machine, not its (random, container) host name.
    host = machine_name()
    suffix = "" if args.shape == "cpu" else f"-{args.shape}"
    (RESULTS / f"model-mlx-{host}{suffix}.json").write_text(json.dumps(results, indent=1) + "\n")
    (RESULTS / f"model-mlx-{host}{suffix}.md").write_text(write_markdown(results))
    print(write_markdown(results))


if __name__ == "__main__":
    main()
