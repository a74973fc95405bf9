"""`hanyeong model ...`: init, plan, export-hf, inspect, consolidate, average, upscale, score, generate
(orchestration/eval/cli.py).

Commands parse options, make one library call and print a summary; frameworks are imported inside
the command bodies so `hanyeong --help` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from orchestration.core.plan import GPUS, PlanConfig
from orchestration.eval.cli import generate_command

app = typer.Typer(help="Create, size, inspect and export models of the shared spec.", no_args_is_help=True)
app.command("generate")(generate_command)


@app.command()
def init(
    out: Path = typer.Option(..., "--out", "-o", help="Checkpoint directory to write."),
    preset: str = typer.Option("tiny", help="Model preset (see `hanyeong model presets`)."),
    seed: int = typer.Option(0, help="Seeds the initial weights."),
    vocab_size: int | None = typer.Option(None, help="Override the preset's vocabulary size (match your tokenizer)."),
    backend: str = typer.Option("torch", help="Backend that initialises the weights: torch or mlx."),
) -> None:
    """Write a freshly initialised checkpoint of a preset."""
    from orchestration.core.backends import get_backend
    from orchestration.core.presets import get_preset

    spec = get_preset(preset)
    if vocab_size is not None:
        spec = spec.replace(vocab_size=vocab_size)
    engine = get_backend(backend)
    engine.save(engine.init(spec, seed=seed), out)
    typer.echo(f"wrote {out}: {preset}, {spec.parameter_count():,} parameters, seed {seed}")


@app.command()
def presets() -> None:
    """List the model presets with their shapes and sizes."""
    from orchestration.core.presets import PRESETS

    typer.echo(f"{'preset':<18}{'params':>10}  d_model layers heads/kv  d_ff   vocab  context  rope θ")
    for name, s in PRESETS.items():
        typer.echo(
            f"{name:<18}{s.parameter_count() / 1e9:>9.3f}B  {s.d_model:>7} {s.n_layers:>6} {s.n_heads:>5}/{s.n_kv_heads:<3}"
            f"{s.d_ff:>6} {s.vocab_size:>7} {s.max_seq_len:>8}  {s.rope_theta:,.0f}{'  tied' if s.tie_embeddings else ''}"
        )


@app.command()
def plan(
    preset: str | None = typer.Option(None, help="Model preset to plan."),
    ckpt: Path | None = typer.Option(None, help="Or a checkpoint directory (its spec.json)."),
    recipe: Path | None = typer.Option(None, help="Or a recipe TOML: every stage with its own budget, shapes and spec."),
    tokens: str | None = typer.Option(None, help="Training tokens: 9T, 6.5T, 252M, 1e12 (not with --recipe)."),
    seq_len: int | None = typer.Option(None, help="Sequence length (default: the spec's max_seq_len)."),
    gpus: int = typer.Option(PlanConfig.gpus, help="Devices; weights/grads/optimizer are sharded over them "
                           "(a recipe's stages: over their own workers; the wall clock is on these)."),
    gpu: str = typer.Option(PlanConfig.gpu, help=f"Device kind: {', '.join(GPUS)}."),
    mfu: float = typer.Option(PlanConfig.mfu, help="Model FLOPs utilisation for the wall-clock estimate."),
    micro_batch: int | None = typer.Option(None, help=f"Sequences per device per micro-batch (default "
                                           f"{PlanConfig.micro_batch}; a recipe's stages have their own)."),
    activation_checkpointing: bool | None = typer.Option(
        None, "--activation-checkpointing/--no-activation-checkpointing", help="Recompute each block's "
        "activations in the backward pass, or not (with --recipe: in every stage). Default: as the preset "
        "(orchestration/core/presets.py) or each recipe stage says."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as one JSON object."),
) -> None:
    """Parameters, FLOPs (6·N·D), memory per device and wall clock of a run or a recipe's stages."""
    from orchestration.core import checkpoint
    from hanyeong.errors import ConfigError
    from orchestration.core.plan import describe, parse_count
    from orchestration.core.plan import plan as make_plan
    from orchestration.core.presets import get_preset

    if sum(x is not None for x in (preset, ckpt, recipe)) != 1:
        raise ConfigError("give one of --preset, --ckpt or --recipe")
    if recipe is None and tokens is None:
        raise ConfigError("give --tokens (e.g. 9T) with --preset or --ckpt")
    if recipe is not None and (tokens is not None or seq_len is not None or micro_batch is not None):
        raise ConfigError("--tokens, --seq-len and --micro-batch go with --preset or --ckpt; a recipe has its own "
                          "budgets and shapes (micro-batches: rows / workers / optim.grad_accum_steps)")
    config = PlanConfig(tokens=parse_count(tokens or 1), seq_len=seq_len, gpus=gpus, gpu=gpu, mfu=mfu,
                        micro_batch=micro_batch or PlanConfig.micro_batch)  # fmt: skip
    if recipe is not None:
        from orchestration.pipeline.recipe import load_recipe
        from orchestration.pipeline.recipe_plan import describe_recipe, plan_recipe

        result = plan_recipe(load_recipe(recipe), config, activation_checkpointing)
        typer.echo(json.dumps(result, indent=2) if as_json else "\n".join(describe_recipe(result)))
        return
    from dataclasses import replace

    from orchestration.core.presets import activation_checkpointing as preset_default

    spec = get_preset(preset) if preset else checkpoint.load_spec(ckpt)
    if activation_checkpointing is None:  # a stage on this preset would: the same rule (a checkpoint: off)
        activation_checkpointing = preset_default(preset)
    result = make_plan(spec, replace(config, activation_checkpointing=activation_checkpointing))
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        typer.echo("\n".join(describe(result)))


@app.command("export-hf")
def export_hf(
    ckpt: Path = typer.Argument(..., help="Checkpoint directory."),
    out: Path = typer.Argument(..., help="Directory to write (config.json, model.safetensors, tokenizer files)."),
    tokenizer: Path | None = typer.Option(None, "--tokenizer", "-t", help="hanyeong tokenizer directory to include "
                                          "(default: the tokenizer of the run CKPT was trained in)."),
) -> None:
    """Export a checkpoint as a Llama directory that transformers and mlx-lm load (a reward model:
    LlamaForSequenceClassification)."""
    from orchestration.core.checkpoint import load_spec
    from orchestration.core.export_hf import architecture
    from orchestration.core.export_hf import export_hf as export
    from orchestration.pipeline.run_manifest import run_tokenizer

    found = tokenizer or run_tokenizer(ckpt)
    export(ckpt, out, found)
    kind = architecture(load_spec(ckpt))  # LlamaForCausalLM, or a reward model's LlamaForSequenceClassification
    if found is None:
        typer.echo(f"wrote {out}: {kind} without a tokenizer ({ckpt} is not in a run directory "
                   f"that has one), so AutoTokenizer cannot load it; add one: hanyeong model export-hf {ckpt} {out} "
                   "--tokenizer DIR")  # fmt: skip
    else:
        typer.echo(f"wrote {out}: {kind} with the tokenizer {found}")


@app.command()
def inspect(ckpt: Path = typer.Argument(..., help="Checkpoint directory.")) -> None:
    """Verify a checkpoint (sizes and checksums) and print its spec and training state."""
    from orchestration.core import checkpoint

    index = checkpoint.verify(ckpt, checksums=True)
    spec = checkpoint.load_spec(ckpt)
    typer.echo(f"{ckpt}: intact, {len(index['files'])} files, {spec.parameter_count():,} parameters")
    typer.echo(json.dumps(spec.to_dict(), indent=2))
    if checkpoint.has_training_state(ckpt):
        state = checkpoint.read_trainer_state(ckpt)
        typer.echo(f"training state: step {state.get('step')}, {state.get('tokens_seen', 0):,} tokens seen")


@app.command()
def consolidate(
    ckpt: Path = typer.Argument(..., help="A sharded checkpoint (an FSDP stage's: a sharded/ folder of pieces)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Directory of the single-file checkpoint "
                                    "(default: CKPT itself, replaced atomically)."),
    weights_only: bool = typer.Option(False, "--weights-only", help="Keep the pieces and the training state and "
                                      "add model.safetensors (what a stage's final checkpoint has)."),
) -> None:
    """Turn a sharded checkpoint into the single-file layout (model.safetensors, optimizer.safetensors,
    trainer_state.json) that export-hf, the MLX backend and single-worker runs read; one piece in
    memory at a time."""
    from orchestration.core import checkpoint
    from orchestration.core.backends import get_backend

    written = get_backend("torch").consolidate(ckpt, out, weights_only=weights_only)
    index = checkpoint.verify(written)
    size = sum(f["bytes"] for f in index["files"].values())
    typer.echo(f"wrote {written}: {'sharded with its weights consolidated' if weights_only else 'single-file'}, "
               f"{len(index['files'])} files, {size / 2**20:,.1f} MiB")


@app.command()
def average(
    ckpts: list[Path] = typer.Argument(..., help="Checkpoints of one spec (for ema: oldest first)."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory of the merged checkpoint."),
    method: str = typer.Option("linear", help="linear (weighted mean), ema (moving average in order), slerp "
                               "(of the task vectors from --base), warp (slerp, then toward --base by --eta)."),
    weights: str | None = typer.Option(None, help="linear: one weight per checkpoint, comma-separated "
                                       "(normalised to sum 1); default uniform."),
    ema: float = typer.Option(0.1, help="ema: the weight of each newer checkpoint."),
    t: float = typer.Option(0.5, help="slerp/warp with two checkpoints: 0 gives the first, 1 the second."),
    eta: float = typer.Option(0.5, help="warp: how far from --base toward the slerp (LITI)."),
    base: Path | None = typer.Option(None, help="slerp/warp: the checkpoint the others started from."),
) -> None:
    """Average checkpoints' weights (Llama 3.1's model averaging; Gemma 2's WARP: SLERP of task vectors,
    then interpolation toward the start)."""
    from hanyeong.errors import ConfigError
    from orchestration.core.merge import average as merge

    try:
        parsed = None if weights is None else [float(w) for w in weights.split(",")]
    except ValueError:
        raise ConfigError(f"weights: comma-separated numbers, got {weights!r}") from None
    merge(ckpts, out, method=method, weights=parsed, alpha=ema, t=t, eta=eta, base=base)
    typer.echo(f"wrote {out}: {method} of {len(ckpts)} checkpoints" + (f" from {base}" if base else ""))


@app.command()
def upscale(
    ckpt: Path = typer.Argument(..., help="Checkpoint directory."),
    layers: str = typer.Option(..., help="Layer ranges START:END, in the new order: SOLAR's 0:24,8:32."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory of the up-scaled checkpoint."),
) -> None:
    """Depth up-scaling (SOLAR): stack copies of the given layer ranges into a deeper model."""
    from orchestration.core.checkpoint import load_spec
    from orchestration.core.upscale import upscale as deepen

    before = load_spec(ckpt)
    after = load_spec(deepen(ckpt, layers, out))
    typer.echo(f"wrote {out}: {before.n_layers} -> {after.n_layers} layers, {before.parameter_count():,} -> "
               f"{after.parameter_count():,} parameters")


@app.command()
def score(
    ckpt: Path = typer.Argument(..., help="A reward model's checkpoint (a 'reward' stage's)."),
    data: Path = typer.Option(..., help="A finished generation job's folder (hanyeong model generate --out)."),
    name: str | None = typer.Option(None, help="Name of the scores in DATA/scores/ (default: the checkpoint's "
                                    "folder name)."),
    backend: str = typer.Option("torch", help="torch or mlx."),
    batch_size: int = typer.Option(16, help="Sequences per forward pass."),
    workers: int = typer.Option(1, help="Ray tasks scoring contiguous shares of the answers."),
    address: str | None = typer.Option(None, help="The Ray cluster to score on (default: this machine)."),
) -> None:
    """Score every answer of a generation job with a reward model: DATA/scores/NAME.parquet."""
    from orchestration.sampling.score import score_generations

    info = score_generations(ckpt, data, name, backend, batch_size, workers, address)
    named = name or ckpt.resolve().name
    typer.echo(f"wrote {data}/scores/{named}.parquet: {info['rows']:,} answers, mean score {info['mean']:.4f}")
