"""A preference (DPO) train step: ours (torch backend, loss "dpo") against TRL's DPOTrainer, on CPU.

    python benchmarks/preference.py [--pairs 4] [--prompt 64] [--answer 64] [--steps 4]

The same model (preset "small", vocab 16k, random init; exported to transformers with
orchestration/core/export_hf.py for TRL), the same batch of pairs (random token ids: a shared
prompt, a chosen and a rejected answer of the same lengths), the same optimizer (AdamW, lr 1e-5,
clip 1.0), fp32. Both use precomputed reference log-probs (ours: the stage's cached reference; TRL:
precompute_ref_log_probs=True), so neither step runs a reference model. Each side runs in its own
fresh process: 1 warm-up step, then `steps` timed steps (median reported), and the peak resident set
(VmHWM) over the steps after loading. TRL's step is Trainer.train's own step (training_step +
clip + optimizer.step + scheduler), timed between its on_step_begin and on_step_end callbacks.
Results go to benchmarks/results/preference-<machine>.{json,md}.
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

from hardware import cpu_name, machine_name  # benchmarks/hardware.py

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
VOCAB, LR, BETA = 16_000, 1e-5, 0.1


def proc_status(field: str) -> float:
    found = re.search(rf"{field}:\s*(\d+) kB", Path("/proc/self/status").read_text())
    return int(found.group(1)) / 1024


def pairs(n: int, prompt: int, answer: int) -> list[dict]:
    rng = np.random.default_rng(0)
    ids = lambda k: rng.integers(3, VOCAB, k).tolist()  # noqa: E731
    # answers end with EOS (id 1), as TRL's own data preparation makes them (it appends none then)
    return [{"prompt_ids": ids(prompt), "chosen_ids": ids(answer - 1) + [1], "rejected_ids": ids(answer - 1) + [1]}
            for _ in range(n)]  # fmt: skip


def run_ours(ckpt: str, data: list[dict], steps: int) -> dict:
    import torch

    from cuda_model.backend import TorchBackend
    from orchestration.core.batch import Batch
    from orchestration.core.optim import OptimConfig
    from orchestration.data.pair_loader import row

    backend = TorchBackend("cpu")
    model = backend.load(ckpt)
    T = len(data[0]["prompt_ids"]) + len(data[0]["chosen_ids"]) - 1

    def rows(key):
        out = [row(np.array(p["prompt_ids"] + p[key]), np.array([0] * len(p["prompt_ids"]) + [1] * len(p[key])), T)
               for p in data]  # fmt: skip
        return [np.stack([r[k] for r in out]) for k in range(3)]

    (ci, ct, cm), (ri, rt, rm) = rows("chosen_ids"), rows("rejected_ids")
    b = Batch(ci, ct, loss_mask=cm, extras={"rejected_inputs": ri, "rejected_targets": rt, "rejected_mask": rm,
                                             "beta": np.full(len(data), BETA, np.float32)})  # fmt: skip
    # the cached reference: the start model's summed answer log-probs (as preference_stage computes)
    with torch.no_grad():
        lc = backend.logprobs(model, Batch(ci, ct))
        lr = backend.logprobs(model, Batch(ri, rt))
    b.extras["ref_chosen_logps"] = (lc * cm).sum(-1).astype(np.float32)
    b.extras["ref_rejected_logps"] = (lr * rm).sum(-1).astype(np.float32)
    state = backend.init_train_state(model, OptimConfig(lr=LR, warmup_steps=0, total_steps=1000, grad_clip=1.0),
                                     fused=False)  # fmt: skip
    loaded = proc_status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    times, losses = [], []
    for _ in range(steps + 1):
        t = time.perf_counter()
        losses.append(backend.train_step(state, b, loss="dpo")["loss"])
        times.append(time.perf_counter() - t)
    return {"times": times[1:], "first_loss": losses[0], "losses": losses, "rss_loaded_mb": loaded,
            "peak_rss_mb": proc_status("VmHWM")}  # fmt: skip


def run_trl(hf_dir: str, data: list[dict], steps: int) -> dict:
    import torch
    import transformers
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32,
                                                              attn_implementation="sdpa")  # fmt: skip
    # a word-level tokenizer whose word "t<i>" is token i: TRL tokenizes text, and these texts are
    # exactly the pairs' token ids (no special tokens added)
    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=words, pad_token="t0", eos_token="t1")
    text = lambda ids: "".join(f" t{i}" for i in ids)  # noqa: E731
    data = [{k[:-4]: text(v) for k, v in p.items()} for p in data]
    times, marks = [], {}

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            marks["t"] = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - marks["t"])
            if len(times) == 1:  # after the warm-up step (AdamW's moments exist): peak from here
                marks["loaded"] = proc_status("VmRSS")

    args = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=len(data), max_steps=steps + 1,
                     learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
                     beta=BETA, precompute_ref_log_probs=True, logging_steps=1, save_strategy="no", report_to=[],
                     use_cpu=True, dataloader_num_workers=0, max_length=None, seed=0,
                     weight_decay=0.1, adam_beta2=0.95, adam_epsilon=1e-8, disable_tqdm=True)  # fmt: skip
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(data), processing_class=tok,
                         callbacks=[Clock()])  # fmt: skip
    loaded = proc_status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"times": times[1:], "first_loss": losses[0] if losses else None, "losses": losses,
            "rss_loaded_mb": loaded, "peak_rss_mb": proc_status("VmHWM")}  # fmt: skip


def worker(impl: str, path: str, data_file: str, steps: int) -> None:
    data = json.loads(Path(data_file).read_text())
    out = run_ours(path, data, steps) if impl == "ours" else run_trl(path, data, steps)
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--answer", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    a = parser.parse_args()
    import torch
    import transformers
    import trl

    from cuda_model.backend import TorchBackend
    from orchestration.core.export_hf import export_hf
    from orchestration.core.presets import PRESETS

    spec = PRESETS["small"].replace(vocab_size=VOCAB)
    work = Path(tempfile.mkdtemp())
    backend = TorchBackend("cpu")
    backend.save(backend.init(spec, seed=0), work / "ckpt")
    export_hf(work / "ckpt", work / "hf")
    data_file = work / "pairs.json"
    data_file.write_text(json.dumps(pairs(a.pairs, a.prompt, a.answer)))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "TOKENIZERS_PARALLELISM": "false"}
    runs = {}
    for impl, path in (("ours", work / "ckpt"), ("trl", work / "hf")):
        out = subprocess.run([sys.executable, __file__, "worker", impl, str(path), str(data_file), str(a.steps)],
                             capture_output=True, text=True, cwd=REPO, env=env)  # fmt: skip
        if out.returncode:
            sys.exit(f"{impl} failed:\n{out.stderr[-4000:]}")
        runs[impl] = json.loads(out.stdout.strip().splitlines()[-1])
        print(impl, f"median {statistics.median(runs[impl]['times']):.3f} s, peak {runs[impl]['peak_rss_mb']:.0f} MB",
              f"first loss {runs[impl]['first_loss']}", flush=True)  # fmt: skip
    med = {k: statistics.median(v["times"]) for k, v in runs.items()}
    result = {"machine": machine_name(), "cpu": cpu_name(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
              "spec": spec.to_dict(), "parameters": spec.parameter_count(), "pairs": a.pairs,
              "prompt_tokens": a.prompt, "answer_tokens": a.answer, "timed_steps": a.steps,
              "median_step_s": med, "speedup": med["trl"] / med["ours"],
              "peak_rss_mb": {k: v["peak_rss_mb"] for k, v in runs.items()}, "runs": runs}  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"preference-{machine_name()}"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    tokens = a.pairs * 2 * (a.prompt + a.answer)
    md = [f"# Preference (DPO) step: ours vs TRL DPOTrainer — {machine_name()}", "",
          f"{cpu_name()}, {torch.get_num_threads()} threads; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, trl {trl.__version__}. Preset `small` (vocab {VOCAB}, "
          f"{spec.parameter_count() / 1e6:.1f}M parameters), fp32, {a.pairs} pairs x (prompt {a.prompt} + answer "
          f"{a.answer}) tokens = {tokens} tokens per step, precomputed reference log-probs on both sides; "
          f"median of {a.steps} steps after 1 warm-up, each side in its own process.", "",
          "| | median step (s) | tokens/s | peak RSS (MB) | first loss |", "|---|---:|---:|---:|---:|"]  # fmt: skip
    for k, label in (("ours", "hanyeong (torch, loss dpo)"), ("trl", "TRL DPOTrainer")):
        md.append(f"| {label} | {med[k]:.3f} | {tokens / med[k]:.0f} | {runs[k]['peak_rss_mb']:.0f} | "
                  f"{runs[k]['first_loss']:.4f} |")  # fmt: skip
    md += ["", f"TRL / ours step time: {result['speedup']:.2f}x "
           f"({'ours <= TRL: met' if med['ours'] <= med['trl'] else 'ours > TRL: NOT met'})."]  # fmt: skip
    (RESULTS / f"{name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        main()
