"""`hanyeong eval`: score a checkpoint on benchmark tasks and write results.json + results.md.

    results = evaluate(ckpt, EvalConfig(tasks="kobest_boolq,kmmlu", limit=100))
    write_results(results, out_dir)        # results.json (per task; per item with items=True)

The model runs through the backend protocol (get_backend(name).load / .logprobs), so the same code
scores a checkpoint on PyTorch and on MLX. A task is planned (its per-item inputs), worked (one
result per item) and finished (its metrics from those results): plan.py. With workers > 1 the work
is sharded over Ray tasks (sharded.py) and the results are the same as in one process.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

from hanyeong.errors import ConfigError, DataError
from hanyeong.files import write_atomic
from orchestration.eval import chat_bench, generative, scoring
from orchestration.eval.plan import Plan
from orchestration.eval.tasks import Item, Selected, benchmarks_dir, load_items, read_texts, select

RESULTS_JSON, RESULTS_MD = "results.json", "results.md"
METRICS = ("acc", "acc_norm", "exact_match", "pass@1", "bits_per_byte")  # the table's columns
CHAT_METRICS = ("score", "score_turn1", "score_turn2")  # more columns when a chat task ran (1-10 scale)


@dataclass(frozen=True)
class EvalConfig:
    """What `hanyeong eval` runs; the CLI options map onto these fields."""

    tasks: str
    """Comma-separated task names, each optionally NAME=PATH (a local file of that task's shape)."""
    limit: int | None = None
    """Items (documents, for bits-per-byte tasks) per task: the first N of the file; None: all."""
    backend: str = "torch"
    """'torch' or 'mlx'."""
    batch_rows: int = 16
    """Sequences per forward pass."""
    num_fewshot: int = 0
    """Solved examples before each question (from the task's train split, else other items)."""
    chat_template: bool = False
    """Ask each question as a user turn of the chat template; the choice is the assistant's."""
    items: bool = False
    """Keep every item's log-likelihoods (generation tasks: completions) in results.json."""
    max_new_tokens: int = 256
    """Generation tasks: most tokens of an answer (at most half the model's context)."""
    code_timeout: float = 10.0
    """HumanEval: seconds each program may run in its sandbox."""
    judge: str | None = None
    """Chat tasks: a shell command that judges one answer (JSON on stdin, "[[score]]" on stdout)."""
    judgments: str | None = None
    """Chat tasks: FastChat *_single.jsonl judgments to read instead of judging: FILE or TASK=FILE,..."""
    model_id: str | None = None
    """Chat tasks: the model's name in answer and judgment files (evaluate: the checkpoint's folder)."""
    answers_dir: str | None = None
    """Chat tasks: folder for <task>_answers.jsonl and _judgments.jsonl (the CLI's --out); None: in
    the results."""
    chat_temperature: str | float = "category"
    """Chat tasks: 'category' answers each question at its category's temperature as FastChat does
    (chat_answers.CATEGORY_TEMPERATURE); a number forces that temperature on all (0: greedy)."""
    seed: int = 0
    """Chat tasks: seeds the sampled answers; the same seed gives the same answers."""
    workers: int = 1
    """`evaluate`: Ray tasks scoring shards of every task, this many at once (sharded.py); 1 (and
    no address): in this process, no Ray. (evaluate_model scores its loaded model in its process.)"""
    address: str | None = None
    """The Ray cluster whose tasks score the shards (even with workers = 1: on its GPUs);
    None: a local Ray when workers > 1."""

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be at least 1, got {self.limit}")
        if self.batch_rows < 1:
            raise ConfigError(f"batch_rows (--batch-size) must be at least 1, got {self.batch_rows}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.code_timeout <= 0:
            raise ConfigError(f"code_timeout must be above 0, got {self.code_timeout}")
        if self.num_fewshot < 0:
            raise ConfigError(f"num_fewshot must be 0 or more, got {self.num_fewshot}")
        if self.judge and self.judgments:
            raise ConfigError("give --judge or --judgments, not both")
        if self.workers < 1:
            raise ConfigError(f"workers (--workers) must be at least 1, got {self.workers}")
        object.__setattr__(self, "chat_temperature", chat_temperature(self.chat_temperature))


def chat_temperature(value: str | float) -> str | float:
    """'category', or the temperature forced as a float (the CLI gives it as text); ConfigError else."""
    try:
        forced = value if value == "category" else float(value)
    except (TypeError, ValueError):
        forced = None
    if forced is None or (forced != "category" and not 0 <= forced < float("inf")):
        raise ConfigError(f"chat_temperature (--chat-temperature) must be 'category' or a number >= 0, got {value!r}")
    return forced


def evaluate(ckpt: str | Path, config: EvalConfig, tokenizer_dir: str | Path | None = None,
             benchmarks: str | Path | None = None) -> dict:  # fmt: skip
    """Every task's metrics (and items) on the checkpoint, as one JSON-ready dict."""
    from orchestration.core.backends import get_backend
    from orchestration.core.checkpoint import load_spec

    selected = select(config.tasks, benchmarks_dir(Path(benchmarks) if benchmarks else None))
    tokenizer, tokenizer_dir = load_tokenizer(ckpt, tokenizer_dir)
    spec = load_spec(ckpt)
    if tokenizer.vocab_size > spec.vocab_size:
        raise DataError(f"{tokenizer_dir}: {tokenizer.vocab_size} ids do not fit the model's "
                        f"vocab_size {spec.vocab_size}")  # fmt: skip
    config = replace(config, model_id=config.model_id or chat_bench.default_model_id(ckpt))
    out = {"checkpoint": str(ckpt), "tokenizer": str(tokenizer_dir), "config": asdict(config)}
    if config.workers > 1 or config.address:  # the driver never loads the model: each shard does
        from orchestration.eval.sharded import evaluate_sharded

        plans = {chosen.task.name: plan_task(chosen, config) for chosen in selected}
        return out | {"tasks": evaluate_sharded(ckpt, tokenizer_dir, spec, config, plans)}
    backend = get_backend(config.backend)
    model = backend.load(ckpt)
    return out | {"tasks": evaluate_model(backend, model, tokenizer, spec, config, selected)}


def evaluate_model(backend, model, tokenizer, spec, config: EvalConfig, selected: list[Selected]) -> dict:
    """{task: result} of a loaded model (a recipe's [stage.eval] scores the model it trains)."""
    out = {}
    for chosen in selected:
        started = time.perf_counter()
        result = plan_task(chosen, config).run(backend, model, tokenizer, spec, config)
        result["seconds"] = round(time.perf_counter() - started, 3)
        out[chosen.task.name] = result
    return out


def load_tokenizer(ckpt: str | Path, given: str | Path | None):
    """The tokenizer given, else that of the run the checkpoint lies in; DataError when neither."""
    from orchestration.pipeline.run_manifest import run_tokenizer
    from tokenizer.bbpe import BBPETokenizer

    from orchestration.core.checkpoint import SPEC_FILE

    if not (Path(ckpt) / SPEC_FILE).is_file():  # say what is wrong before looking for its run
        raise DataError(f"{ckpt}: no checkpoint there (no {SPEC_FILE})")
    found = Path(given) if given else run_tokenizer(ckpt)
    if found is None:
        raise DataError(f"{ckpt}: not in a run directory with a tokenizer; give --tokenizer DIR")
    return BBPETokenizer.load(found), found


def prompts(items: list[Item], chosen: Selected, config: EvalConfig) -> tuple[list[Item], str]:
    """The items as the model sees them (few-shot examples, chat template) and the delimiter."""
    delimiter = chosen.task.delimiter
    if config.num_fewshot:
        from orchestration.eval.tasks import read_records, to_item

        same = chosen.fewshot_path is None
        pool = items if same else [to_item(chosen, r, i) for i, r in enumerate(read_records(chosen.fewshot_path))]
        items = scoring.with_fewshot(items, pool, config.num_fewshot, delimiter, same)
    if config.chat_template:
        from orchestration.data.chat import render

        items = [Item(render([{"role": "user", "content": it.context}], add_generation_prompt=True),
                      it.choices, it.gold) for it in items]  # fmt: skip
        delimiter = ""  # the answer opens the assistant turn
    return items, delimiter


def plan_task(chosen: Selected, config: EvalConfig) -> Plan:
    """The task's inputs, its per-item scoring and its metrics (plan.py), by its kind."""
    kind = chosen.task.kind
    if kind == "generate":
        return generative.plan_generate(chosen, config)
    if kind == "chat":
        return chat_bench.plan_chat(chosen, config)
    return plan_choice(chosen, config) if kind == "choice" else plan_bpb(chosen, config)


def plan_choice(chosen: Selected, config: EvalConfig) -> Plan:
    """Inputs: each item's (context, delimiter + choice) pairs; results: their log-likelihoods."""
    items, delimiter = prompts(load_items(chosen, config.limit), chosen, config)
    inputs = [[(item.context, delimiter + choice) for choice in item.choices] for item in items]
    return Plan(inputs, choice_loglikelihoods, partial(choice_result, chosen, items, config))


def choice_loglikelihoods(backend, model, tokenizer, spec, config: EvalConfig, inputs: list) -> list[list[float]]:
    """Per item, the log-likelihood (nats) of each choice after its context."""
    requests = scoring.encode_pairs(tokenizer, [pair for pairs in inputs for pair in pairs])
    flat = iter(scoring.loglikelihoods(backend, model, requests, spec.max_seq_len, config.batch_rows))
    return [[next(flat) for _ in pairs] for pairs in inputs]


def choice_result(chosen: Selected, items: list[Item], config: EvalConfig, lls: list[list[float]]) -> dict:
    result = {"kind": "choice", "path": str(chosen.path), "n": len(items),
              "metrics": scoring.choice_metrics(items, lls)}  # fmt: skip
    if config.items:
        result["items"] = [{"gold": item.gold, "loglikelihoods": scores}
                           for item, scores in zip(items, lls)]  # fmt: skip
    return result


def plan_bpb(chosen: Selected, config: EvalConfig) -> Plan:
    """Inputs: the documents; results: the log-likelihoods of each one's windows."""
    texts = read_texts(chosen.path)[: config.limit]
    return Plan(texts, bpb_loglikelihoods, partial(bpb_result, chosen, texts))


def bpb_loglikelihoods(backend, model, tokenizer, spec, config: EvalConfig, texts: list[str]) -> list[list[float]]:
    bos = tokenizer.hf.token_to_id("[BOS]")
    return scoring.window_loglikelihoods(backend, model, tokenizer, texts, spec.max_seq_len, config.batch_rows, bos)


def bpb_result(chosen: Selected, texts: list[str], lls: list[list[float]]) -> dict:
    return {"kind": "bpb", "path": str(chosen.path), "n": len(texts), "metrics": scoring.bpb_metrics(texts, lls)}


def markdown(results: dict) -> str:
    """The results as a Markdown table: one row per task; chat tasks add score columns and a note."""
    chat = {name: r for name, r in results["tasks"].items() if r.get("kind") == "chat"}
    lines = ["| task | n | acc | acc_norm | exact_match | pass@1 | bits/byte |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    if chat:
        lines = [lines[0] + " score | turn 1 | turn 2 |", lines[1] + "---:|" * 3]
    for name, result in results["tasks"].items():
        m = result["metrics"]
        cells = [f"{m[k]:.4f}" if k in m else "" for k in METRICS]
        cells += [f"{m[k]:.2f}" if k in m else "" for k in CHAT_METRICS] if chat else []
        lines.append(f"| {name} | {result['n']} | " + " | ".join(cells) + " |")
    notes = [chat_note(name, result) for name, result in chat.items()]
    return "\n".join(lines) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


def chat_note(name: str, result: dict) -> str:
    """Where a chat task's answers went and how many judgments counted."""
    answers = result["answers"] if isinstance(result["answers"], str) else "the results JSON (no --out folder)"
    m = result["metrics"]
    if "judged" not in m:
        return f"- {name}: answers in {answers}; no score (judge them with --judge CMD or --judgments FILE)"
    return (f"- {name}: answers in {answers}; {m['judged']} turns judged, {m['failed']} failed (no score in the "
            f"judge's output: left out, not 0), {m['missing']} without a judgment")


def write_results(results: dict, out: str | Path) -> tuple[Path, Path]:
    """results.json and results.md in `out`, each written atomically."""
    out = Path(out)
    write_atomic(out / RESULTS_JSON, json.dumps(results, ensure_ascii=False, indent=2) + "\n")
    write_atomic(out / RESULTS_MD, f"# eval of {results['checkpoint']}\n\n" + markdown(results))
    return out / RESULTS_JSON, out / RESULTS_MD
