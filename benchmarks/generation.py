"""Sampling throughput: what a generation job's actor runs (backend.generate with per-row keys)
against transformers' generate (torch) and mlx_lm's generate_step (MLX), same model and prompts.

    python benchmarks/generation.py [--preset small] [--batch 8] [--new 64] [--skip-mlx]

The model: a preset (random init, vocab 16k), exported with orchestration/core/export_hf.py for the
peers. Prompts: `batch` random prompts of 16 to 64 tokens (different lengths: left padding on both
torch sides). Every answer is exactly `new` tokens (no stop id; transformers: min_new_tokens = new,
eos_token_id None), sampled at temperature 1, fp32, on the CPU. Tokens/s = batch x new / wall, the
median of `repeats` runs after one warm-up. mlx_lm's `generate` is one prompt at a time (its
generate_step), so the MLX line compares our batched sampling with the prompts run one after another.
Results go to benchmarks/results/generation-<machine>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
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
VOCAB = 16_000


def timed(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def ours(name: str, ckpt: Path, prompts: list[list[int]], new: int, repeats: int) -> float:
    from orchestration.core.backends import get_backend
    from orchestration.core.generation import sample_key

    backend = get_backend(name)
    model = backend.load(ckpt)
    keys = [sample_key(0, i, 0) for i in range(len(prompts))]
    return timed(lambda: backend.generate(model, prompts, new, temperature=1.0, suppress_ids=(), row_seeds=keys), repeats)


def transformers_generate(hf_dir: Path, prompts: list[list[int]], new: int, repeats: int) -> float:
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def run():
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=True,
                           temperature=1.0, top_k=0, pad_token_id=0, eos_token_id=None)  # fmt: skip

    return timed(run, repeats)


def mlx_lm_generate(hf_dir: Path, prompts: list[list[int]], new: int, repeats: int) -> float:
    import importlib

    import mlx.core as mx
    from mlx_lm.utils import load_model

    generate_step = importlib.import_module("mlx_lm.generate").generate_step
    model, _ = load_model(hf_dir)

    def run():
        for p in prompts:  # mlx_lm.generate: one prompt at a time
            for _, _ in zip(range(new), generate_step(mx.array(p), model, max_tokens=new,
                                                      sampler=lambda logits: mx.random.categorical(logits))):  # fmt: skip
                pass

    return timed(run, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-mlx", action="store_true")
    a = parser.parse_args()

    import torch

    from orchestration.core.backends import get_backend
    from orchestration.core.export_hf import export_hf
    from orchestration.core.presets import PRESETS

    torch.set_num_threads(max(1, torch.get_num_threads()))
    rng = np.random.default_rng(0)
    prompts = [[1, *rng.integers(300, VOCAB, int(n) - 1).tolist()] for n in rng.integers(16, 65, a.batch)]
    spec = PRESETS[a.preset].replace(vocab_size=VOCAB)
    work = Path(tempfile.mkdtemp(prefix="bench-generation-"))
    backend = get_backend("torch")
    backend.save(backend.init(spec, seed=0), work / "ckpt")
    hf_dir = export_hf(work / "ckpt", work / "hf")
    tokens = a.batch * a.new
    rows = {"ours (torch)": ours("torch", work / "ckpt", prompts, a.new, a.repeats),
            "transformers generate": transformers_generate(hf_dir, prompts, a.new, a.repeats)}  # fmt: skip
    if not a.skip_mlx:
        rows["ours (mlx)"] = ours("mlx", work / "ckpt", prompts, a.new, a.repeats)
        rows["mlx_lm generate_step"] = mlx_lm_generate(hf_dir, prompts, a.new, a.repeats)
    result = {"machine": machine_name(), "cpu": cpu_name(), "preset": a.preset, "parameters": spec.parameter_count(),
              "batch": a.batch, "new_tokens": a.new, "prompt_tokens": [len(p) for p in prompts],
              "seconds": rows, "tokens_per_s": {k: round(tokens / v, 1) for k, v in rows.items()}}  # fmt: skip
    name = f"generation-{machine_name()}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    speed = result["tokens_per_s"]
    md = [f"# Sampling throughput on {result['cpu']} ({machine_name()})", "",
          f"Preset {a.preset} ({result['parameters']:,} parameters, vocab {VOCAB:,}), {a.batch} prompts of "
          f"{min(result['prompt_tokens'])}-{max(result['prompt_tokens'])} tokens, {a.new} new tokens each, "
          "temperature 1, fp32, CPU; median of "
          f"{a.repeats} runs. Command: `python benchmarks/generation.py --preset {a.preset} --batch {a.batch} "
          f"--new {a.new}`.", "", "| | tokens/s | vs peer |", "|---|---:|---:|"]  # fmt: skip
    pairs = {"ours (torch)": "transformers generate", "ours (mlx)": "mlx_lm generate_step"}
    for k, v in speed.items():
        peer = pairs.get(k)
        ratio = f"{v / speed[peer]:.2f}x" if peer in speed else ""
        md.append(f"| {k} | {v:,.1f} | {ratio} |")
    (RESULTS / f"{name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
