"""What a whole recipe costs: `orchestration.core.plan` per stage, summed (`hanyeong model plan --recipe`).

Each stage is planned with its own model spec (rope/max_seq_len overrides applied, an `upscale`'s
new depth) over the runs of its step plan, so a sequence-length ramp is costed at the length each
run trains at and an up-scaled stage at its new size.

MEMORY PER DEVICE is what the stage's code holds, by the same rules: FSDP shards the weights, grads
and AdamW over the stage's `workers` (DDP and one worker: not sharded; `parallelism` resolved as the
runner does), a worker's largest micro-batch is its share of a step's rows cut into
optim.grad_accum_steps (`micro_batch_rows`), and activations are checkpointed when the stage
recomputes them (its `activation_checkpointing`, else its run preset's default, as run_stage
decides; `plan_recipe`'s own activation_checkpointing, true or false, is every stage's instead, to
see what it would give). The recomputed forward is counted in the wall clock, which is on the
plan's `gpus`.
"""

from __future__ import annotations

from dataclasses import replace

from orchestration.core.plan import PlanConfig, plan


def micro_batch_rows(rows: int, workers: int, grad_accum_steps: int, backend: str) -> int:
    """Rows in the largest micro-batch a worker runs of a step of `rows`: its share of the rows
    (orchestration/core/parallel.rank_rows, ceil(rows / workers)) cut into micro-batches as its
    backend's step does: torch grad_accum_steps of them (cuda_model/step.local_split), MLX
    ceil(grad_accum_steps / workers) per rank (mlx_model/step.split); never more than its rows."""
    local = -(-rows // workers)
    n = grad_accum_steps if backend == "torch" or workers == 1 else -(-grad_accum_steps // workers)
    return -(-local // max(1, min(n, local)))


def shards(stage, spec, backend: str) -> int:
    """Devices a stage's weights, grads and AdamW are sharded over: its workers under FSDP, else 1."""
    from orchestration.core.backends import capabilities
    from orchestration.core.parallel import SHARDED, resolve_parallelism

    if stage.workers == 1:
        return 1
    parallel = resolve_parallelism(stage.parallelism, capabilities(backend), spec.parameter_count())
    return stage.workers if parallel == SHARDED else 1


def plan_recipe(recipe, config: PlanConfig, activation_checkpointing: bool | None = None) -> dict:
    """{"stages": [...], "total": {...}} for `recipe` on the devices of `config` (its tokens,
    micro_batch, shards and activation_checkpointing unused: each stage has its own; see the
    module doc); `activation_checkpointing` true or false: every stage's instead."""
    from orchestration.core.backends import known

    backend, stages = known(recipe.run.backend), []
    for stage, spec in zip(recipe.stages, recipe.stage_specs()):
        recompute = activation_checkpointing
        if recompute is None:
            recompute = stage.recomputes_activations(recipe.run.preset)
        accum, sharded_over = stage.optim.grad_accum_steps, shards(stage, spec, backend)
        pairs = stage.stage_kind.sequences_per_row  # a preference row is 2 sequences through the model
        runs = [plan(spec, replace(config, tokens=float(n * rows * seq_len * pairs), seq_len=seq_len,
                                   micro_batch=pairs * micro_batch_rows(rows, stage.workers, accum, backend),
                                   shards=sharded_over, activation_checkpointing=recompute))
                for n, seq_len, rows in stage.plan()]  # fmt: skip
        last = runs[-1]
        peak = max(runs, key=lambda r: r["memory_per_device_bytes"]["total"])
        stages.append({
            "name": stage.name, "kind": stage.kind, "tokens": stage.token_budget, "steps": stage.total_steps,
            "seq_lens": sorted(set(stage.seq_lens)), "batch_tokens": stage.batch_tokens,
            "parameters": last["parameters"], "n_layers": spec.n_layers, "rope_theta": spec.rope_theta,
            "training_flops": sum(r["training_flops"] for r in runs),
            "attention_flops": sum(r["attention_flops"] for r in runs),
            "recompute_flops": sum(r["recompute_flops"] for r in runs),
            "wall_clock_seconds": sum(r["wall_clock_seconds"] for r in runs),
            "gpu_hours": sum(r["gpu_hours"] for r in runs),
            "activation_checkpointing": recompute, "workers": stage.workers,
            "shards": sharded_over,
            "memory_per_device_bytes": peak["memory_per_device_bytes"],
            "micro_batch": {"rows": peak["micro_batch"], "seq_len": peak["seq_len"]},
            "fits": all(r["fits"] for r in runs),
        })  # fmt: skip
    keys = (
        "tokens",
        "steps",
        "training_flops",
        "attention_flops",
        "recompute_flops",
        "wall_clock_seconds",
        "gpu_hours",
    )
    total = {k: sum(s[k] for s in stages) for k in keys}
    total["tokens_by_kind"] = {}  # in the order the recipe first uses each kind
    for s in stages:
        total["tokens_by_kind"][s["kind"]] = total["tokens_by_kind"].get(s["kind"], 0) + s["tokens"]
    device = {"gpu": config.gpu, "count": config.gpus, "mfu": config.mfu}
    return {"recipe": recipe.run.name, "device": device, "stages": stages, "total": total}


def describe_recipe(result: dict) -> list[str]:
    """The recipe plan as lines a person reads: one per stage, then the total."""
    device = result["device"]
    title = (f"{result['recipe']}: {len(result['stages'])} stages on {device['count']:,} × "
             f"{device['gpu']} at {device['mfu']:.0%} MFU")  # fmt: skip
    header = (f"{'stage':<22}{'kind':<10}{'layers':>6}{'tokens':>10}{'steps':>10}  {'seq_len':<12}{'FLOPs':>9}"
              f"{'days':>8}  memory/device (at its largest micro-batch)")  # fmt: skip
    lines = [title, header]
    for s in result["stages"]:
        memory = s["memory_per_device_bytes"]["total"]
        seq = "→".join(f"{x:,}" for x in s["seq_lens"])
        micro = f"{s['micro_batch']['rows']} × {s['micro_batch']['seq_len']:,}"
        how = f"{micro}{', checkpointed' if s['activation_checkpointing'] else ''}"
        lines.append(f"{s['name']:<22}{s['kind']:<10}{s['n_layers']:>6}{_count(s['tokens']):>10}{s['steps']:>10,}  {seq:<12}"
                     f"{s['training_flops'] + s['attention_flops']:>9.3g}{s['wall_clock_seconds'] / 86_400:>8.1f}  "
                     f"{_bytes(memory)} ({how}){'' if s['fits'] else ' does NOT fit'}")  # fmt: skip
    t = result["total"]
    kinds = " + ".join(f"{kind} {_count(n)}" for kind, n in t["tokens_by_kind"].items())
    lines.append(f"{'total':<22}{'':<16}{_count(t['tokens']):>10}{t['steps']:>10,}  {'':<12}"
                 f"{t['training_flops'] + t['attention_flops']:>9.3g}{t['wall_clock_seconds'] / 86_400:>8.1f}  "
                 f"{kinds} tokens, {t['gpu_hours']:,.0f} GPU-hours")  # fmt: skip
    if not all(s["fits"] for s in result["stages"]):
        lines.append("hint: in the stages that do not fit, set activation_checkpointing = true, raise "
                     "optim.grad_accum_steps (smaller micro-batches) or workers (more shards, fewer rows each)")
    return lines


def _bytes(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.0f} MiB"


def _count(n: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.4g}{suffix}"
    return f"{n:g}"
