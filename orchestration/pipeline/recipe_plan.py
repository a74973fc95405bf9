"""What a whole recipe costs: `orchestration.core.plan` per stage, summed (`hanyeong model plan --recipe`).

Each stage is planned with its own model spec (rope/max_seq_len overrides applied, an `upscale`'s
new depth) over the runs of its step plan, so a sequence-length ramp is costed at the length each
run trains at and an up-scaled stage at its new size.
"""

from __future__ import annotations

from dataclasses import replace

from orchestration.core.plan import PlanConfig, plan


def plan_recipe(recipe, config: PlanConfig) -> dict:
    """{"stages": [...], "total": {...}} for `recipe` on the devices of `config` (its tokens unused)."""
    stages = []
    for stage, spec in zip(recipe.stages, recipe.stage_specs()):
        runs = [plan(spec, replace(config, tokens=float(n * rows * seq_len), seq_len=seq_len))
                for n, seq_len, rows in stage.plan()]  # fmt: skip
        last = runs[-1]
        stages.append({
            "name": stage.name, "kind": stage.kind, "tokens": stage.token_budget, "steps": stage.total_steps,
            "seq_lens": sorted(set(stage.seq_lens)), "batch_tokens": stage.batch_tokens,
            "parameters": last["parameters"], "n_layers": spec.n_layers, "rope_theta": spec.rope_theta,
            "training_flops": sum(r["training_flops"] for r in runs),
            "attention_flops": sum(r["attention_flops"] for r in runs),
            "wall_clock_seconds": sum(r["wall_clock_seconds"] for r in runs),
            "gpu_hours": sum(r["gpu_hours"] for r in runs),
            "memory_per_device_bytes": max((r["memory_per_device_bytes"] for r in runs), key=lambda m: m["total"]),
            "fits": all(r["fits"] for r in runs),
        })  # fmt: skip
    keys = (
        "tokens",
        "steps",
        "training_flops",
        "attention_flops",
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
              f"{'days':>8}  memory/device")  # fmt: skip
    lines = [title, header]
    for s in result["stages"]:
        memory = s["memory_per_device_bytes"]["total"]
        seq = "→".join(f"{x:,}" for x in s["seq_lens"])
        lines.append(f"{s['name']:<22}{s['kind']:<10}{s['n_layers']:>6}{_count(s['tokens']):>10}{s['steps']:>10,}  {seq:<12}"
                     f"{s['training_flops'] + s['attention_flops']:>9.3g}{s['wall_clock_seconds'] / 86_400:>8.1f}  "
                     f"{_bytes(memory)}{'' if s['fits'] else ' (does NOT fit)'}")  # fmt: skip
    t = result["total"]
    kinds = " + ".join(f"{kind} {_count(n)}" for kind, n in t["tokens_by_kind"].items())
    lines.append(f"{'total':<22}{'':<16}{_count(t['tokens']):>10}{t['steps']:>10,}  {'':<12}"
                 f"{t['training_flops'] + t['attention_flops']:>9.3g}{t['wall_clock_seconds'] / 86_400:>8.1f}  "
                 f"{kinds} tokens, {t['gpu_hours']:,.0f} GPU-hours")  # fmt: skip
    if not all(s["fits"] for s in result["stages"]):
        lines.append("hint: shard over more devices (--gpus) or add --activation-checkpointing")
    return lines


def _bytes(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.0f} MiB"


def _count(n: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.4g}{suffix}"
    return f"{n:g}"
