"""`hanyeong eval`, `hanyeong chat` and `hanyeong model generate`: thin commands over
orchestration/eval (frameworks and the tokenizer are imported inside the bodies)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from orchestration.eval.evaluate import EvalConfig


def eval_command(
    ckpt: Path = typer.Argument(..., help="Checkpoint directory."),
    tasks: str = typer.Option(..., "--tasks", help="Comma-separated tasks (kobest_boolq, kobest_copa, "
                              "kobest_hellaswag, kobest_sentineg, kobest_wic, kmmlu, click, truthfulqa_mc1, "
                              "kobbq, gsm8k, humaneval, mt_bench, komt_bench, bpb_ko, bpb_en); NAME=PATH "
                              "reads a local file of that task's shape."),
    limit: int | None = typer.Option(EvalConfig.limit, help="First N items (documents) of each task."),
    backend: str = typer.Option(EvalConfig.backend, help="torch or mlx."),
    batch_size: int = typer.Option(EvalConfig.batch_rows, help="Sequences per forward pass."),
    num_fewshot: int = typer.Option(EvalConfig.num_fewshot, help="Solved examples before each question."),
    chat_template: bool = typer.Option(EvalConfig.chat_template, "--chat-template",
                                       help="Ask each question as a user turn of the chat template."),
    items: bool = typer.Option(EvalConfig.items, "--items", help="Keep per-item log-likelihoods in results.json."),
    max_new_tokens: int = typer.Option(EvalConfig.max_new_tokens, help="Generation and chat tasks: most tokens "
                                       "of an answer."),
    code_timeout: float = typer.Option(EvalConfig.code_timeout, help="HumanEval: seconds each program may run "
                                       "in its sandbox."),
    judge: str | None = typer.Option(EvalConfig.judge, help="Chat tasks (mt_bench, komt_bench): a shell command "
                                     "run per question and turn, a JSON object on stdin, the score on stdout "
                                     "as FastChat reads it (8 or 8.5 in double square brackets)."),
    judgments: str | None = typer.Option(EvalConfig.judgments, help="Chat tasks: read FastChat *_single.jsonl "
                                         "judgments instead of judging: FILE, or TASK=FILE,..."),
    model_id: str | None = typer.Option(EvalConfig.model_id, help="Chat tasks: the model's name in answer and "
                                        "judgment files (default: the checkpoint's folder name)."),
    chat_temperature: str = typer.Option(str(EvalConfig.chat_temperature), help="Chat tasks: 'category' answers "
                                         "each question at its category's temperature, as FastChat does (0.7 "
                                         "writing and roleplay, 0.1 stem and humanities, greedy for the rest); a "
                                         "number forces it on all (0: greedy)."),
    seed: int = typer.Option(EvalConfig.seed, help="Chat tasks: seeds sampled answers (same seed, same answers)."),
    workers: int = typer.Option(EvalConfig.workers, help="Score shards of every task in this many Ray tasks at "
                                "once, each loading the checkpoint (a GPU each where the cluster has them; MLX: "
                                "apple_silicon); chat answers are generated in shards, judged here. 1: in this "
                                "process, no Ray."),
    address: str | None = typer.Option(EvalConfig.address, help="The Ray cluster whose tasks score the shards "
                                       "(default: a local Ray with --workers above 1). CKPT and the tokenizer "
                                       "must be readable at the same paths on its nodes."),
    tokenizer: Path | None = typer.Option(None, "--tokenizer", "-t", help="Tokenizer directory "
                                          "(default: the tokenizer of the run CKPT was trained in)."),
    benchmarks: Path | None = typer.Option(None, help="Benchmarks folder (default: $HANYEONG_BENCHMARKS, "
                                           "else ../shared/data/benchmarks beside the checkout)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Folder for results.json and results.md (and chat "
                                    "tasks' <task>_answers.jsonl, <task>_judgments.jsonl)."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as one JSON object."),
) -> None:
    """Score a checkpoint on benchmarks: multiple choice (acc, acc_norm), generation (GSM8K exact match,
    HumanEval pass@1 in a sandbox), chat (MT-Bench, KoMT-Bench: answers, scored by a judge command) and
    bits per byte; in this process, or sharded over Ray tasks with --workers."""
    from orchestration.eval.evaluate import evaluate, markdown, write_results

    config = EvalConfig(tasks=tasks, limit=limit, backend=backend, batch_rows=batch_size,
                        num_fewshot=num_fewshot, chat_template=chat_template, items=items,
                        max_new_tokens=max_new_tokens, code_timeout=code_timeout, judge=judge, judgments=judgments,
                        model_id=model_id, answers_dir=str(out) if out is not None else None,
                        chat_temperature=chat_temperature, seed=seed, workers=workers, address=address)  # fmt: skip
    results = evaluate(ckpt, config, tokenizer, benchmarks)
    if out is not None:
        write_results(results, out)
    if as_json:
        typer.echo(json.dumps(results, ensure_ascii=False))
    else:
        typer.echo(markdown(results).rstrip())
        if out is not None:
            typer.echo(f"wrote {out}/results.json and results.md")


def _sampling(max_new_tokens: int, temperature: float, top_p: float, seed: int):
    from orchestration.eval.talk import SamplingConfig

    return SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)


def generate_command(
    ckpt: Path = typer.Argument(..., help="Checkpoint directory."),
    prompt: list[str] = typer.Option([], "--prompt", "-p", help="A prompt (repeat for several)."),
    prompts: Path | None = typer.Option(None, "--prompts", help="A file of prompts: one a line; with --out any "
                                        "prompt dataset (jsonl/json/csv/parquet/txt, .gz): `prompt` fields or "
                                        "conversations, whose last user turn is asked."),
    chat: bool = typer.Option(False, "--chat", help="Each plain prompt is a user turn of the chat template."),
    reasoning: bool = typer.Option(False, "--reasoning", help="With --out: ask chat prompts as EXAONE Deep's "
                                   "template does (the answer opened with <thought>); answers keep their thought."),
    system: str | None = typer.Option(None, help="System turn (with --chat, without --out)."),
    max_new_tokens: int = typer.Option(128, help="Most new tokens per answer."),
    temperature: float | None = typer.Option(None, help="0: greedy; above: sampling at this temperature "
                                             "(default: 0, with --out 1)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling: keep this much probability."),
    top_k: int = typer.Option(0, help="With --out: sample from the k most likely tokens (0: all)."),
    seed: int = typer.Option(0, help="Seeds sampling."),
    n: int = typer.Option(1, "--n", help="With --out: answers per prompt."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write a Parquet dataset of prompts and answers "
                                    "here (resumable: run again to finish a killed job)."),
    workers: int = typer.Option(1, help="With --out: Ray actors sampling, one model each."),
    address: str | None = typer.Option(None, help="With --out: the Ray cluster to sample on (default: this "
                                       "machine)."),
    limit: int | None = typer.Option(None, help="With --out: the first N prompts only."),
    backend: str = typer.Option("torch", help="torch or mlx."),
    tokenizer: Path | None = typer.Option(None, "--tokenizer", "-t", help="Tokenizer directory "
                                          "(default: the tokenizer of the run CKPT was trained in)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON line per prompt: prompt and completion."),
) -> None:
    """Complete prompts given as arguments or in a file (one batch), or with --out sample N answers per
    prompt of a dataset into Parquet (a resumable job over Ray actors)."""
    from hanyeong.errors import ConfigError
    from orchestration.eval.talk import Talker

    if out is not None:
        return generate_job(ckpt, prompts, out, n, temperature, top_p, top_k, max_new_tokens, seed, chat, workers,
                            address, limit, backend, tokenizer, prompt, reasoning)  # fmt: skip
    if reasoning:
        raise ConfigError("--reasoning is for a generation job: give --out DIR")
    texts = list(prompt)
    if prompts is not None:
        try:
            lines = prompts.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise ConfigError(f"{prompts}: no such file") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{prompts}: not UTF-8 text") from None
        texts += [line for line in lines if line.strip()]
        if not texts:
            raise ConfigError(f"{prompts}: no prompt in it (one a line)")
    if not texts:
        raise ConfigError("give --prompt TEXT or --prompts FILE")
    sampling = _sampling(max_new_tokens, temperature or 0.0, top_p, seed)
    talker = Talker.load(ckpt, backend, tokenizer, sampling)
    for text, completion in zip(texts, talker.complete(texts, chat=chat, system=system)):
        if as_json:
            typer.echo(json.dumps({"prompt": text, "completion": completion}, ensure_ascii=False))
        else:
            typer.echo(f"{text}{completion}" if not chat else completion)
            if len(texts) > 1:
                typer.echo("")


def generate_job(ckpt, prompts, out, n, temperature, top_p, top_k, max_new_tokens, seed, chat, workers, address,
                 limit, backend, tokenizer, prompt, reasoning=False) -> None:  # fmt: skip
    """`model generate --out`: the generation job (orchestration/sampling/job.py)."""
    from hanyeong.errors import ConfigError
    from orchestration.sampling.job import GenerateConfig, generate_dataset

    if prompts is None or prompt:
        raise ConfigError("--out samples a prompt dataset: give --prompts FILE (not --prompt)")
    config = GenerateConfig(n=n, temperature=1.0 if temperature is None else temperature, top_p=top_p, top_k=top_k,
                            max_new_tokens=max_new_tokens, seed=seed, chat=chat, workers=workers, backend=backend,
                            limit=limit, reasoning=reasoning)  # fmt: skip
    manifest = generate_dataset(ckpt, [prompts], out, config, tokenizer, address)
    reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(manifest["finish_reasons"].items()))
    skipped = sum(manifest["skipped"].values())
    typer.echo(f"wrote {out}: {manifest['rows']:,} answers to {manifest['prompts_read']:,} prompts ({reasons}; "
               f"{manifest['answer_tokens']:,} tokens)" + (f"; {skipped:,} records skipped, not prompts" if skipped else ""))


def chat_command(
    ckpt: Path = typer.Argument(..., help="Checkpoint directory."),
    system: str | None = typer.Option(None, help="System turn that opens the conversation."),
    max_new_tokens: int = typer.Option(256, help="Most new tokens per reply."),
    temperature: float = typer.Option(0.7, help="0: greedy; above: sampling at this temperature."),
    top_p: float = typer.Option(0.9, help="Nucleus sampling: keep this much probability."),
    seed: int = typer.Option(0, help="Seeds sampling."),
    backend: str = typer.Option("torch", help="torch or mlx."),
    tokenizer: Path | None = typer.Option(None, "--tokenizer", "-t", help="Tokenizer directory "
                                          "(default: the tokenizer of the run CKPT was trained in)."),
) -> None:
    """Chat with a checkpoint in the terminal (chat template, streamed replies; /reset, /exit)."""
    import sys

    from orchestration.eval.talk import Talker, chat_loop

    talker = Talker.load(ckpt, backend, tokenizer, _sampling(max_new_tokens, temperature, top_p, seed))

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    chat_loop(talker, system, input, write)
