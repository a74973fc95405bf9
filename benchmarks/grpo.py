"""A GRPO step (sample, score, update): ours (stage kind `grpo`) against TRL's GRPOTrainer, on CPU.

    python benchmarks/grpo.py [--preset small] [--prompts 4] [--group 8] [--new 64] [--steps 5]
                              [--tokenizer DIR]

The task: the shipped arithmetic prompts (data/reasoning/arithmetic-prompts.jsonl,
prepared as a reasoning chat dataset), rewarded by `numeric` (orchestration/sampling/rewards.py).
The tokenizer: the tests' 3,000-id one, trained here (~10 s) unless --tokenizer names one. The
model: a preset, random init (torch backend, seed 0), exported to transformers with
orchestration/core/export_hf.py for TRL; `small` (13.7M parameters at this vocabulary), as
benchmarks/preference.py: on `tiny` (0.3M) a step takes ~0.1 s, all dispatch overhead, and the
noise of a shared 2-core machine decides the ratio. Random weights score ~0 and rarely stop early,
so both sides generate about P x G x new tokens (counted and reported).

One step = one generation: P prompts x G answers of at most `new` tokens (temperature 1, top_p 1,
the same special ids suppressed on both sides), group-scaled advantages, no KL (beta 0, no
reference), one update per generation (ratio 1), DAPO's clip (0.2 / 0.28) and token-mean loss (TRL:
loss_type "dapo"), AdamW (lr 1e-6, constant, clip 1.0), fp32.
Both sides draw the same prompts in the same order (the stage's seeded permutation; TRL's dataset is
that list, unshuffled) and get the same prompt ids (TRL tokenizes the rendered prompt text; checked).

Ours runs through run_stage (as tests/orchestration/test_grpo_stage.py builds its request); its step
is the loop's step_seconds (next_batch + train_step) and generation the stage's generation_seconds
(backend.generate). TRL's step is Trainer.train's step between its on_step_begin and on_step_end
callbacks; its generation is `_generate_single_turn` (transformers' generate), timed by a wrapper.
Each side runs in its own fresh process (malloc returning freed blocks at once, as preference.py,
so the resident set is what is in use): 1 warm-up step, then `steps` timed steps (medians), and the
peak resident set (VmHWM) over the steps. Results go to benchmarks/results/grpo-<machine>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
TASK = REPO / "data" / "reasoning" / "arithmetic-prompts.jsonl"
LR, SEED = 1e-6, 0
BUSY = 1.0  # a 1-minute load average above this before the run: other work shares the CPU


def proc_status(field: str) -> float:
    found = re.search(rf"{field}:\s*(\d+) kB", Path("/proc/self/status").read_text())
    return int(found.group(1)) / 1024


def small_tokenizer(out: Path) -> Path:
    """The tests' tokenizer (tests/conftest.py train_small_tokenizer), one worker."""
    from tests.conftest import write_small_corpus
    from tokenizer.sampling import SampleConfig
    from tokenizer.train import TrainConfig, train_tokenizer

    corpus = out / "corpus"
    corpus.mkdir(parents=True)
    config = TrainConfig(vocab_size=3000, morphemes=("E",), sample=SampleConfig(ko_share=0.8))
    train_tokenizer([str(write_small_corpus(corpus))], out / "tok", config, workers=1, cache_dir=out / "cache")
    return out / "tok"


def prompt_answers(dataset: Path) -> tuple[list, list]:
    """The chat dataset's prompts and reference answers (token ids), as the grpo loader reads them."""
    from types import SimpleNamespace

    from orchestration.pipeline.online_stage import read_prompt_answers

    mixture = SimpleNamespace(sources=[SimpleNamespace(dataset=str(dataset), source="*")])
    return read_prompt_answers(mixture)[:2]


def planned_prompts(prompts: list, new: int, seq_len: int, per: int, generations: int) -> list[int]:
    """The prompt indices the stage draws, generation after generation (GrpoLoader, held_out 0)."""
    import numpy as np

    from orchestration.pipeline.online_stage import permuted_stream

    train = np.flatnonzero([len(p) + new <= seq_len + 1 for p in prompts])
    return [int(p) for g in range(generations) for p in permuted_stream(train, SEED, g * per, per)]


def stage_request(a, work: Path, vocab: int, seq_len: int) -> dict:
    from orchestration.pipeline.recipe import Recipe

    rows = a.prompts * a.group
    grpo = {"group_size": a.group, "max_new_tokens": a.new, "temperature": 1.0, "top_p": 1.0, "held_out": 0,
            "rewards": {"numeric": 1.0}, "beta": 0.0, "epsilon": 0.2, "epsilon_high": 0.28,
            "loss_aggregation": "token_mean", "scale_rewards": "group", "updates_per_generation": 1}  # fmt: skip
    stage = {"name": "grpo", "kind": "grpo", "start": str(work / "ckpt"), "seq_len": seq_len,
             "batch_tokens": seq_len * rows, "token_budget": seq_len * rows * (a.steps + 1), "data_seed": SEED,
             "data": {"sources": [{"dataset": "problems", "weight": 1.0}]}, "grpo": grpo,
             "optim": {"lr": LR, "warmup_steps": 0, "schedule": "constant", "grad_clip": 1.0}}  # fmt: skip
    tables = {"run": {"name": "bench", "preset": a.preset, "vocab_size": vocab, "backend": "torch",
                      "tokenizer": {"path": str(work / "tok")},
                      "datasets": [{"name": "problems", "path": str(work / "problems"), "format": "chat"}]},
              "stage": [stage]}  # fmt: skip
    return {"recipe": Recipe.from_dict(tables).to_dict(), "index": 0, "stage_dir": str(work / "stage"),
            "tokenizer": str(work / "tok"), "datasets": {"problems": str(work / "problems")},
            "backend": "torch"}  # fmt: skip


def run_ours(job: dict) -> dict:
    import pyarrow.parquet as pq
    import torch

    from cuda_model.backend import TorchBackend
    from orchestration.pipeline.grpo_stage import GrpoLoader
    from orchestration.pipeline.stage import run_stage

    marks = {"update": [], "peak": 0.0}
    train_step, next_batch = TorchBackend.train_step, GrpoLoader.next_batch

    def timed_step(self, *args, **kwargs):  # the update alone, and the peak after it
        started = time.perf_counter()
        out = train_step(self, *args, **kwargs)
        marks["update"].append(time.perf_counter() - started)
        marks["peak"] = proc_status("VmHWM")
        return out

    def first_batch(self):  # model and optimizer are loaded: the peak counts from here
        if "loaded" not in marks:
            marks["loaded"] = proc_status("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")
        return next_batch(self)

    TorchBackend.train_step, GrpoLoader.next_batch = timed_step, first_batch
    run_stage(job["request"])
    stage = Path(job["request"]["stage_dir"])
    lines = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    drawn = [p for f in sorted((stage / "rollouts").glob("*.parquet")) for p in pq.read_table(f)["prompt"].to_pylist()]
    return {"times": [x["step_seconds"] for x in lines][1:], "generation": [x["generation_seconds"] for x in lines][1:],
            "update": marks["update"][1:], "tokens": [x["answer_tokens"] * x["batch_rows"] for x in lines][1:],
            "reward": [x["reward"] for x in lines], "first_loss": lines[0]["loss"], "drawn": drawn[:: job["group"]],
            "threads": torch.get_num_threads(), "rss_loaded_mb": marks["loaded"],
            "peak_rss_mb": marks["peak"]}  # fmt: skip


def run_trl(job: dict) -> dict:
    import torch
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from orchestration.sampling.rewards import numeric

    torch.manual_seed(SEED)
    hf, stops = job["hf"], set(job["stop_ids"])
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, attn_implementation="sdpa")
    text = lambda ids: tok.decode([i for i in ids if i not in stops])  # noqa: E731  (as the stage's Sampler.text)

    def numeric_reward(prompts, completions, completion_ids, reference, **_):
        return [numeric(text(ids), ref) for ids, ref in zip(completion_ids, reference)]

    rows = [{"prompt": job["prompt_text"][p], "reference": job["reference_text"][p]} for p in job["drawn"]]
    times, marks, generation, scoring, tokens, prompt_ids = [], {"peak": 0.0}, [], [], [], []

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            marks["t"] = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - marks["t"])
            marks["peak"] = proc_status("VmHWM")

    args = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=job["prompts"] * job["group"],
                      gradient_accumulation_steps=1, num_generations=job["group"], steps_per_generation=1,
                      num_iterations=1, max_completion_length=job["new"], temperature=1.0, top_p=1.0, top_k=0,
                      generation_kwargs={"suppress_tokens": job["suppress_ids"]}, beta=0.0, loss_type="dapo",
                      epsilon=0.2, epsilon_high=0.28, scale_rewards="group", learning_rate=LR,
                      lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, weight_decay=0.1,
                      adam_beta2=0.95, adam_epsilon=1e-8, optim="adamw_torch", max_steps=job["steps"] + 1,
                      shuffle_dataset=False, logging_strategy="no", save_strategy="no", report_to=[], use_cpu=True,
                      dataloader_num_workers=0, seed=SEED, disable_tqdm=True, log_completions=False)  # fmt: skip
    trainer = GRPOTrainer(model=model, reward_funcs=numeric_reward, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tok, callbacks=[Clock()])  # fmt: skip
    tokenize, sample = trainer._tokenize_prompts, trainer._generate_single_turn
    score = trainer._generate_and_score_completions

    def tokenized(prompts):
        out = tokenize(prompts)
        prompt_ids.extend(out[0][:: job["group"]])
        return out

    def sampled(*a, **k):  # transformers' generate and the cut after the first EOS
        started = time.perf_counter()
        out = sample(*a, **k)
        generation.append(time.perf_counter() - started)
        tokens.append(sum(map(len, out[0])))
        return out

    def scored(*a, **k):  # tokenize, sample, decode, reward, advantages: all but the update
        started = time.perf_counter()
        out = score(*a, **k)
        scoring.append(time.perf_counter() - started)
        return out

    trainer._tokenize_prompts, trainer._generate_single_turn = tokenized, sampled
    trainer._generate_and_score_completions = scored
    loaded = proc_status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    trainer.train()
    same = [list(map(int, ids)) for ids in prompt_ids] == [job["prompt_ids"][p] for p in job["drawn"]]
    return {"times": times[1:], "generation": generation[1:], "update": [t - s for t, s in zip(times, scoring)][1:],
            "tokens": tokens[1:], "prompt_ids_match": same, "threads": torch.get_num_threads(),
            "rss_loaded_mb": loaded, "peak_rss_mb": marks["peak"]}  # fmt: skip


def worker(impl: str, job_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    print(json.dumps(run_ours(job) if impl == "ours" else run_trl(job)))


def prepare(a, work: Path) -> tuple[dict, object]:
    """Tokenizer, dataset, model (saved and exported) and the job both workers read; and the spec."""
    from orchestration.core.backends import get_backend
    from orchestration.core.export_hf import export_hf
    from orchestration.core.generation import suppressed_ids
    from orchestration.core.presets import PRESETS
    from orchestration.data.chat import ChatConfig
    from orchestration.data.chat_dataset import prepare_chat
    from orchestration.pipeline.grpo_stage import STOP_IDS, THOUGHT_IDS
    from tokenizer.bbpe import BBPETokenizer

    if a.tokenizer:
        (work / "tok").symlink_to(Path(a.tokenizer).resolve())
    else:
        os.rename(small_tokenizer(work / "tokenizer"), work / "tok")
    prepare_chat([str(TASK)], work / "tok", work / "problems", config=ChatConfig(reasoning=True))
    tok = BBPETokenizer.load(work / "tok")
    spec = PRESETS[a.preset].replace(vocab_size=tok.vocab_size)
    backend = get_backend("torch")
    backend.save(backend.init(spec, seed=SEED), work / "ckpt")
    export_hf(work / "ckpt", work / "hf", tokenizer_dir=work / "tok")
    prompts, answers = prompt_answers(work / "problems")
    seq_len = max(map(len, prompts)) + a.new - 1  # the longest prompt and a full answer fill a row
    drawn = planned_prompts(prompts, a.new, seq_len, a.prompts, a.steps + 1)
    job = {"request": stage_request(a, work, spec.vocab_size, seq_len), "hf": str(work / "hf"),
           "prompts": a.prompts, "group": a.group, "new": a.new, "steps": a.steps, "drawn": drawn,
           "stop_ids": list(STOP_IDS),
           "suppress_ids": suppressed_ids(spec.vocab_size, STOP_IDS, allow_ids=THOUGHT_IDS).tolist(),
           "prompt_ids": [p.tolist() for p in prompts],
           "prompt_text": [tok.decode(p.tolist()) for p in prompts],
           "reference_text": [tok.decode([int(i) for i in r if int(i) not in STOP_IDS]) for r in answers],
           "seq_len": seq_len, "prompt_tokens": [len(prompts[p]) for p in drawn]}  # fmt: skip
    return job, spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--prompts", type=int, default=4, help="P: prompts per step")
    parser.add_argument("--group", type=int, default=8, help="G: answers per prompt")
    parser.add_argument("--new", type=int, default=64, help="most answer tokens (max_new_tokens)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after 1 warm-up")
    parser.add_argument("--tokenizer", default=None, help="a trained hanyeong tokenizer directory (default: train one)")
    a = parser.parse_args()
    import torch
    import transformers
    import trl

    work = Path(tempfile.mkdtemp(prefix="bench-grpo-"))
    load = [os.getloadavg()[0]]  # a shared machine: other work slows both sides, a lot
    job, spec = prepare(a, work)
    (work / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "TOKENIZERS_PARALLELISM": "false"}
    runs = {}
    for impl in ("ours", "trl"):
        out = subprocess.run([sys.executable, __file__, "worker", impl, str(work / "job.json")],
                             capture_output=True, text=True, cwd=REPO, env=env)  # fmt: skip
        if out.returncode:
            sys.exit(f"{impl} failed:\n{out.stderr[-4000:]}")
        runs[impl] = json.loads(out.stdout.strip().splitlines()[-1])
        print(impl, f"median {statistics.median(runs[impl]['times']):.3f} s, peak {runs[impl]['peak_rss_mb']:.0f} MB",
              flush=True)  # fmt: skip
    load.append(os.getloadavg()[0])
    shutil.rmtree(work)  # ~250 MB: the tokenizer's corpus and cache, the model twice, the stage's checkpoint
    if runs["ours"]["drawn"] != job["drawn"] or not runs["trl"]["prompt_ids_match"]:
        sys.exit("the two sides did not get the same prompts (order or token ids)")
    write_results(a, spec, job, runs, load, torch.__version__, transformers.__version__, trl.__version__)


def write_results(a, spec, job: dict, runs: dict, load: list[float], *versions: str) -> None:
    parts = ("times", "generation", "update", "tokens")
    med = {k: {m: statistics.median(v[m]) for m in parts} for k, v in runs.items()}
    ratio = med["trl"]["times"] / med["ours"]["times"]
    result = {"machine": machine_name(), "cpu": cpu_name(), "threads": runs["ours"]["threads"],
              "torch": versions[0], "transformers": versions[1], "trl": versions[2], "preset": a.preset,
              "spec": spec.to_dict(), "parameters": spec.parameter_count(), "prompts_per_step": a.prompts,
              "group_size": a.group, "max_new_tokens": a.new, "seq_len": job["seq_len"],
              "prompt_tokens": [min(job["prompt_tokens"]), max(job["prompt_tokens"])], "timed_steps": a.steps,
              "lr": LR, "load_average_1min": load, "median": med, "trl_over_ours": ratio,
              "peak_rss_mb": {k: v["peak_rss_mb"] for k, v in runs.items()}, "runs": runs}  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"grpo-{machine_name()}"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lo, hi = result["prompt_tokens"]
    md = [f"# GRPO step: ours vs TRL GRPOTrainer — {machine_name()}", "",
          f"{cpu_name()}, {result['threads']} threads; torch {versions[0]}, transformers {versions[1]}, trl "
          f"{versions[2]}. Preset `{a.preset}` (vocab {spec.vocab_size:,}, {spec.parameter_count() / 1e6:.1f}M "
          f"parameters, random init), fp32. One step = one generation: {a.prompts} arithmetic prompts ({lo}-{hi} "
          f"tokens) x G = {a.group} answers of at most {a.new} tokens (temperature 1), reward `numeric`, beta 0, "
          f"one update (DAPO clip 0.2/0.28, token-mean loss), AdamW lr {LR:g}, clip 1.0. Median of {a.steps} steps "
          f"after 1 warm-up, each side in its own process; 1-minute load average {load[0]:.1f} before, {load[1]:.1f} "
          f"after. Command: `python benchmarks/grpo.py --preset {a.preset} "
          f"--prompts {a.prompts} --group {a.group} --new {a.new} --steps {a.steps}`.", "",
          "| | step (s) | generation (s) | generation share | update (s) | tokens generated | peak RSS (MB) |",
          "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for k, label in (("ours", "hanyeong (grpo stage, torch)"), ("trl", "TRL GRPOTrainer")):
        m = med[k]
        md.append(f"| {label} | {m['times']:.3f} | {m['generation']:.3f} | {m['generation'] / m['times']:.0%} | "
                  f"{m['update']:.3f} | {m['tokens']:.0f} | {runs[k]['peak_rss_mb']:.0f} |")  # fmt: skip
    met = "ours <= TRL: met" if med["ours"]["times"] <= med["trl"]["times"] else "ours > TRL: NOT met"
    md += ["", "Generation: ours backend.generate (the stage's generation_seconds); TRL _generate_single_turn "
           "(transformers generate). Update: ours backend.train_step; TRL the step less "
           "_generate_and_score_completions. The rest of a step (the step less both) is decoding, scoring and "
           "advantages (ours also writes the generation's parquet file).", "",
           f"TRL / ours step time: {ratio:.2f}x ({met})."]  # fmt: skip
    if load[0] > BUSY:
        md += ["", f"NOTE: other work was running (load average {load[0]:.1f} before the run, on {os.cpu_count()} "
               "cores): both sides' times are inflated, generation's (many small ops per token) the most, and the "
               "ratio is not this CPU's. Rerun on a quiet machine."]  # fmt: skip
    (RESULTS / f"{name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker(sys.argv[2], sys.argv[3])
    else:
        main()
