"""`hanyeong data select`: rejection sampling and two-reward-model filtering of a generation job.

    select(GEN, OUT, SelectConfig(by="reward:rm1", second="reward:rm2", output="sft"))

    OUT/selected.jsonl   sft: {"messages": the prompt's turns + the kept answer}, one per prompt;
                         pairs: {"messages": the prompt's turns, "chosen", "rejected"}, one per prompt;
                         each with its "provenance" (prompt_index, samples, scores)
    OUT/manifest.json    the policy (the job's checkpoint), the rule, each reward model or verifier,
                         and the counts: prompts read = kept + dropped by each reason

Best-of-N (Llama 3.1, Qwen2 and AFM's rejection sampling): of a prompt's answers that finished
(ended on a stop token; one cut by max_new_tokens is not kept unless `finished_only` is off), the one `by` scores highest (ties:
the first sample). `by` is a reward model's scores ("reward:NAME": `hanyeong model score` wrote
them) or a verifier ("verifier:numeric", orchestration/sampling/rewards.py), which keeps only
answers it scores 1 (the first of them). Pairs (for DPO): the best answer against the worst.

Two reward models (EXAONE 3.5 keeps preference data two reward models agree on): with `second`, a
prompt is kept only when the second model agrees with the first: for best-of-N it ranks the same
answer first; for pairs it also scores chosen above rejected by at least `min_margin`. `min_score`
drops a best answer the first model scores lower than it. The files are what `hanyeong data
prepare --format chat` (sft) and `--format preference` (pairs) read.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from hanyeong.errors import ConfigError
from hanyeong.files import write_atomic

OUTPUTS = ("sft", "pairs")
SELECTED, MANIFEST = "selected.jsonl", "manifest.json"


@dataclass(frozen=True)
class SelectConfig:
    """What is kept; the CLI options map onto these fields."""

    by: str
    """'reward:NAME' (scores of `hanyeong model score`) or 'verifier:NAME' (a reward function)."""
    second: str | None = None
    """'reward:NAME': a second reward model that must agree; None: no second filter."""
    output: str = "sft"
    """'sft': the best answer per prompt; 'pairs': the best against the worst."""
    min_score: float | None = None
    """Drop a prompt whose best answer scores below this under `by`."""
    min_margin: float = 0.0
    """Pairs: chosen must score above rejected by at least this, under each reward model."""
    finished_only: bool = True
    """Keep only answers that ended on a stop token (one cut by max_new_tokens is unfinished)."""

    def __post_init__(self) -> None:
        for name in ("by", "second"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or value.split(":")[0] not in ("reward", "verifier")
                                      or ":" not in value):  # fmt: skip
                raise ConfigError(f"{name} must be 'reward:NAME' or 'verifier:NAME', got {value!r}")
        if self.second is not None and not self.second.startswith("reward:"):
            raise ConfigError(f"second must be a reward model ('reward:NAME'), got {self.second!r}")
        if self.output not in OUTPUTS:
            raise ConfigError(f"output must be one of {', '.join(OUTPUTS)}, got {self.output!r}")
        if self.min_margin < 0:
            raise ConfigError(f"min_margin must be 0 or more, got {self.min_margin}")


def scores_of(spec: str, data: Path, table) -> np.ndarray:
    """float32 [rows] of a 'reward:NAME' or 'verifier:NAME' over the job's rows (in its order)."""
    kind, name = spec.split(":", 1)
    if kind == "reward":
        from orchestration.sampling.score import read_scores

        scores = read_scores(data, name)
        if len(scores) != table.num_rows:
            raise ConfigError(f"{data}: scores {name!r} have {len(scores)} rows, the job {table.num_rows}: score again")
        return scores
    from orchestration.sampling.rewards import get_reward

    verify = get_reward(name)
    answers, references = table.column("answer").to_pylist(), table.column("reference").to_pylist()
    return np.array([verify(a, r, None) for a, r in zip(answers, references)], np.float32)


def messages_of(row: dict) -> list[dict]:
    """The prompt's turns: the chat turns as the job kept them, or a plain prompt as one user turn."""
    return json.loads(row["prompt"]) if row["chat"] else [{"role": "user", "content": row["prompt"]}]


def choose(first: np.ndarray, second: np.ndarray | None, finished: np.ndarray, config: SelectConfig,
           verifier: bool) -> tuple[tuple[int, ...] | None, str | None]:  # fmt: skip
    """Among one prompt's answers: (best,) or (chosen, rejected) indices, or None and the reason."""
    candidates = np.flatnonzero(finished)
    if verifier and config.output == "sft":
        candidates = candidates[first[candidates] == 1]
        if not len(candidates):
            return None, "no correct answer"
    if not len(candidates):
        return None, "no finished answer"
    best = int(candidates[np.argmax(first[candidates])])  # argmax: the first of equal scores
    if config.min_score is not None and first[best] < config.min_score:
        return None, "best below min_score"
    if config.output == "sft":
        if second is not None and int(candidates[np.argmax(second[candidates])]) != best:
            return None, "second model ranks another answer first"
        return (best,), None
    if len(candidates) < 2:
        return None, "fewer than 2 finished answers"
    worst = int(candidates[::-1][np.argmin(first[candidates][::-1])])  # the last of equal lows
    if first[best] - first[worst] <= 0 or first[best] - first[worst] < config.min_margin:
        return None, "no margin" if first[best] == first[worst] else "margin below min_margin"
    if second is not None and second[best] - second[worst] < max(config.min_margin, np.finfo(np.float32).tiny):
        return None, "second model disagrees"
    return (best, worst), None


def select(data: str | Path, out: str | Path, config: SelectConfig) -> dict:
    """Write OUT/selected.jsonl and OUT/manifest.json from the generation job DATA; the manifest."""
    from orchestration.sampling.job import read_generations, read_job

    data, out = Path(data), Path(out)
    job = read_job(data)
    table = read_generations(data)
    first = scores_of(config.by, data, table)
    second = scores_of(config.second, data, table) if config.second else None
    rows = table.to_pylist()
    finished = np.array([r["finish_reason"] == "stop" or not config.finished_only for r in rows])
    prompts = np.array([r["prompt_index"] for r in rows])
    starts = np.flatnonzero(np.r_[True, prompts[1:] != prompts[:-1]])
    records, dropped = [], Counter()
    for lo, hi in zip(starts, [*starts[1:], len(rows)]):
        picked, reason = choose(first[lo:hi], None if second is None else second[lo:hi], finished[lo:hi], config,
                                config.by.startswith("verifier:"))  # fmt: skip
        if picked is None:
            dropped[reason] += 1
            continue
        records.append(record(rows, lo, picked, first, second))
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    write_atomic(out / SELECTED, text)
    manifest = {"format": "hanyeong-selection", "source": str(data), "policy": job["checkpoint"],
                "policy_sha256": job["checkpoint_sha256"], "sampling": job["sampling"], "rule": asdict(config),
                "scorers": {spec: scorer_info(spec, data) for spec in filter(None, (config.by, config.second))},
                "prompts": len(starts), "kept": len(records), "dropped": dict(dropped)}  # fmt: skip
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def record(rows: list[dict], lo: int, picked: tuple[int, ...], first, second) -> dict:
    """One output line: the conversation (sft) or the pair, with where it came from."""
    head = rows[lo]
    scores = {"by": [float(first[lo + i]) for i in picked]}
    if second is not None:
        scores["second"] = [float(second[lo + i]) for i in picked]
    provenance = {"prompt_index": head["prompt_index"], "samples": [rows[lo + i]["sample"] for i in picked],
                  "scores": scores}  # fmt: skip
    answers = [rows[lo + i]["answer"] for i in picked]
    if len(picked) == 1:
        return {"messages": [*messages_of(head), {"role": "assistant", "content": answers[0]}], "provenance": provenance}
    return {"messages": messages_of(head), "chosen": answers[0], "rejected": answers[1], "provenance": provenance}


def scorer_info(spec: str, data: Path) -> dict:
    """A reward model's provenance (its scores' .json), or the verifier's name."""
    kind, name = spec.split(":", 1)
    if kind == "verifier":
        return {"verifier": name}
    from orchestration.sampling.score import SCORES

    return json.loads((data / SCORES / f"{name}.json").read_text(encoding="utf-8"))
