"""Items per second of `hanyeong eval` against lm-evaluation-harness, on CPU.

    python benchmarks/eval.py [--limit 20] [--preset small] [--batch-size 8] [--threads 2] [--tokenizer DIR]

The same model (a preset with the quickstart tokenizer's 8,000 ids, random init: speed does not
depend on the weights), exported with `hanyeong model export-hf` for lm_eval's HF model; the same
items (the first `limit` of KoBEST BoolQ, KoBEST COPA and the KMMLU slice in
../shared/data/benchmarks), the same prompts (lm_eval's, in the task YAMLs the parity test uses too:
orchestration/eval/lm_eval_tasks.py), the same batch size, fp32, torch on the CPU
with `threads` threads. Each side runs end to end as a user calls it, in this process: ours
`evaluate(ckpt, EvalConfig(...))` (load the checkpoint and tokenizer, read the files, score),
theirs `simple_evaluate(model="hf", ...)` (load the exported model, build the tasks from the local
files, score); lm_eval's task index (TaskManager) is built once, before the timed runs. Runs
alternate, ours, theirs, ours, theirs, and the best of each counts. Where the time goes is kept
too: scoring (ours the tasks' own seconds, theirs the time inside HFLM.loglikelihood) and the
model's share of it, with the rows and padded tokens each side ran through the model. Both sides'
accuracies are printed beside the figures (they should agree: the parity test checks that on 12
items). Results go to benchmarks/results/eval-<machine>.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from hardware import cpu_name, machine_name  # benchmarks/hardware.py

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
TASKS = ("kobest_boolq", "kobest_copa", "kmmlu")
TEXT_FIELDS = ("text", "Q", "A", "instruction", "response")  # recipes/quickstart.toml [run.tokenizer]


def build(work: Path, preset: str, tokenizer: Path | None) -> tuple[Path, Path, Path]:
    """(tokenizer dir, checkpoint, exported HF dir) in `work`: the quickstart's tokenizer (trained
    here unless given) and a randomly initialised `preset` with its vocabulary."""
    from cuda_model.backend import TorchBackend
    from orchestration.core.export_hf import export_hf
    from orchestration.core.presets import get_preset
    from tokenizer.bbpe import BBPETokenizer
    from tokenizer.train import TrainConfig, train_tokenizer

    if tokenizer is None:
        tokenizer = work / "tokenizer"
        config = TrainConfig(vocab_size=8000, text_fields=TEXT_FIELDS)
        train_tokenizer([str(REPO / "data" / "quickstart")], tokenizer, config, workers=2, cache_dir=work / "cache")
    spec = get_preset(preset).replace(vocab_size=BBPETokenizer.load(tokenizer).vocab_size)
    backend = TorchBackend("cpu")
    backend.save(backend.init(spec, seed=0), work / "ckpt")
    export_hf(work / "ckpt", work / "hf", tokenizer)
    return tokenizer, work / "ckpt", work / "hf"


@contextlib.contextmanager
def watching(cls, method: str, shape):
    """Time the calls of cls.method, and count the rows and (padded) tokens `shape(*args)` says each
    passes to the model: {"seconds", "calls", "rows", "tokens"}."""
    seen = {"seconds": 0.0, "calls": 0, "rows": 0, "tokens": 0}
    original = getattr(cls, method)

    def watched(self, *args, **kwargs):
        rows, width = shape(*args) or (0, 0)
        seen["calls"] += 1
        seen["rows"], seen["tokens"] = seen["rows"] + rows, seen["tokens"] + rows * width
        started = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            seen["seconds"] += time.perf_counter() - started

    setattr(cls, method, watched)
    try:
        yield seen
    finally:
        setattr(cls, method, original)


def run_ours(ckpt: Path, tokenizer: Path, limit: int, batch: int) -> dict:
    from cuda_model.backend import TorchBackend
    from orchestration.eval.evaluate import EvalConfig, evaluate

    config = EvalConfig(tasks=",".join(TASKS), limit=limit, backend="torch", batch_rows=batch)
    with watching(TorchBackend, "logprobs_at", lambda model, tokens, *queries: tokens.shape) as forward:
        started = time.perf_counter()
        tasks = evaluate(ckpt, config, tokenizer)["tasks"]
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "scoring_seconds": sum(t["seconds"] for t in tasks.values()), "forward": forward,
            "items": sum(t["n"] for t in tasks.values()),
            "acc": {name: tasks[name]["metrics"]["acc"] for name in TASKS}}  # fmt: skip


def run_theirs(hf_dir: Path, task_manager, batch: int) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from orchestration.eval.lm_eval_tasks import PREFIX

    with watching(HFLM, "loglikelihood", lambda *a: None) as scoring, \
            watching(HFLM, "_model_call", lambda inps, *a: tuple(inps.shape)) as forward:  # fmt: skip
        started = time.perf_counter()
        out = simple_evaluate(model="hf", model_args=f"pretrained={hf_dir},dtype=float32", device="cpu",
                              batch_size=batch, tasks=[PREFIX + name for name in TASKS],
                              task_manager=task_manager, log_samples=False)  # fmt: skip
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "scoring_seconds": scoring["seconds"], "forward": forward,
            "items": sum(out["n-samples"][PREFIX + name]["effective"] for name in TASKS),
            "acc": {name: out["results"][PREFIX + name]["acc,none"] for name in TASKS}}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=20, help="Items per task (the first N of each file).")
    parser.add_argument("--preset", default="small", help="Model preset (orchestration/core/presets.py).")
    parser.add_argument("--batch-size", type=int, default=8, help="Sequences per forward pass, both sides.")
    parser.add_argument("--threads", type=int, default=2, help="torch threads.")
    parser.add_argument("--repeats", type=int, default=2, help="Runs of each side (alternating); the best counts.")
    parser.add_argument("--tokenizer", type=Path, help="A tokenizer directory (default: train the quickstart's).")
    a = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hanyeong-eval-bench-"))
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "TQDM_DISABLE",
                "HF_DATASETS_DISABLE_PROGRESS_BARS"):  # fmt: skip
        os.environ[var] = "1"
    os.environ["HF_DATASETS_CACHE"] = str(work / "datasets")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    import lm_eval
    import torch
    import transformers

    torch.set_num_threads(a.threads)
    try:
        spec, runs = measure(a, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_results(a, spec, runs, torch.__version__, transformers.__version__, lm_eval.__version__)


def measure(a, work: Path) -> tuple:
    """The model's spec and both sides' runs, alternating: {"ours": [...], "lm_eval": [...]}."""
    from lm_eval.tasks import TaskManager

    from orchestration.core.checkpoint import load_spec
    from orchestration.eval.lm_eval_tasks import write_tasks

    tokenizer, ckpt, hf_dir = build(work, a.preset, a.tokenizer)
    write_tasks(work, a.limit, names=TASKS)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-task notes about the YAMLs
    task_manager = TaskManager(include_path=str(work))
    runs: dict[str, list[dict]] = {"ours": [], "lm_eval": []}
    for repeat in range(a.repeats):
        for side in runs:
            if side == "ours":
                run = run_ours(ckpt, tokenizer, a.limit, a.batch_size)
            else:
                run = run_theirs(hf_dir, task_manager, a.batch_size)
            run["load_average"] = os.getloadavg()[0]  # other work on the machine slows both sides
            runs[side].append(run)
            f = run["forward"]
            print(f"{side} run {repeat + 1}: {run['items']} items in {run['seconds']:.2f} s "
                  f"({run['items'] / run['seconds']:.2f} items/s); scoring {run['scoring_seconds']:.2f} s, of which the "
                  f"model {f['seconds']:.2f} s ({f['calls']} calls, {f['rows']} rows, {f['tokens']:,} tokens); "
                  f"acc {run['acc']}; load average {run['load_average']:.2f}", flush=True)  # fmt: skip
    return load_spec(ckpt), runs


def write_results(a, spec, runs: dict, torch_v: str, transformers_v: str, lm_eval_v: str) -> None:
    items = runs["ours"][0]["items"]
    best = {side: min(rs, key=lambda r: r["seconds"]) for side, rs in runs.items()}
    rate = {side: items / r["seconds"] for side, r in best.items()}
    scoring_rate = {side: items / min(r["scoring_seconds"] for r in rs) for side, rs in runs.items()}
    result = {"machine": machine_name(), "cpu": cpu_name(), "threads": a.threads, "torch": torch_v,
              "transformers": transformers_v, "lm_eval": lm_eval_v, "preset": a.preset, "spec": spec.to_dict(),
              "parameters": spec.parameter_count(), "tasks": list(TASKS), "limit": a.limit, "items": items,
              "batch_size": a.batch_size, "items_per_s": rate, "ratio": rate["ours"] / rate["lm_eval"],
              "scoring_items_per_s": scoring_rate, "scoring_ratio": scoring_rate["ours"] / scoring_rate["lm_eval"],
              "runs": runs}  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"eval-{machine_name()}"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# `hanyeong eval` vs lm-evaluation-harness — {machine_name()}", "",
          f"{cpu_name()}, {a.threads} torch threads; torch {torch_v}, transformers {transformers_v}, lm_eval "
          f"{lm_eval_v}. Preset `{a.preset}` (vocab {spec.vocab_size:,}, {spec.parameter_count() / 1e6:.1f}M "
          f"parameters, random init), fp32, batch size {a.batch_size}. The first {a.limit} items of "
          f"{', '.join(TASKS)} ({items} items), lm_eval's prompts on both sides. Each side end to end in this "
          f"process (load the model, read the files, score); runs alternate, the best of {a.repeats} each counts "
          "(its row below).", "",
          "| | items/s | wall (s) | scoring (s) | model (s) | model calls | rows | tokens (padded) | model tokens/s "
          "| acc |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for side, label in (("ours", "hanyeong eval (torch)"), ("lm_eval", "lm_eval (hf)")):
        r, f = best[side], best[side]["forward"]
        acc = ", ".join(f"{k} {v:.3f}" for k, v in r["acc"].items())
        md.append(f"| {label} | {rate[side]:.2f} | {r['seconds']:.2f} | {r['scoring_seconds']:.2f} | "
                  f"{f['seconds']:.2f} | {f['calls']} | {f['rows']} | {f['tokens']:,} | "
                  f"{f['tokens'] / f['seconds']:,.0f} | {acc} |")  # fmt: skip
    met = "met" if result["ratio"] >= 1.0 else "NOT met"
    loads = ", ".join(f"{r['load_average']:.1f}" for pair in zip(*runs.values()) for r in pair)
    md += ["", f"ours / lm_eval items per second: {result['ratio']:.2f}x end to end (goal >= 1.0x: {met}), "
           f"{result['scoring_ratio']:.2f}x scoring alone (best of each). Load average (1 min) after each run, in "
           f"order: {loads} on {os.cpu_count()} CPUs (a load above the CPU count means other work shared the runs).", "",
           "Scoring: ours the tasks' own seconds (read the file, encode, run the model), lm_eval the time inside "
           "HFLM.loglikelihood (encode, run the model). Model: ours TorchBackend.logprobs_at (forward, the output "
           "layer at the scored positions only, log-probs), lm_eval HFLM._model_call (forward, the output layer "
           "everywhere; its log-softmax is outside). Rows and tokens are what reached the model: both run a row "
           "shared by several requests (a context whose choices are all one token, KMMLU's A-D) once for all."]  # fmt: skip
    (RESULTS / f"{name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
