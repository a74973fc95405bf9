"""GRPO (kind `grpo`): online RL on verifiable rewards with group-relative advantages.

DeepSeekMath's GRPO, as EXAONE Deep trains reasoning after SFT on `<thought>` traces. A GENERATION
is `updates_per_generation` optimizer steps on one batch of the policy's own answers:

1. draw P = rows / group_size prompts: a seeded permutation of the stage's chat prompts (a prompt is
   a conversation's turns up to its first assistant answer, whose text is the prompt's reference),
   epoch after epoch;
2. sample group_size answers to each from the CURRENT policy (temperature / top_p; `<thought>` and
   `</thought>` may be sampled; answer j of draw d keyed by (seed, d, j): core/generation.sample_key);
3. score each answer with the reward functions of `rewards` (name -> weight; orchestration/sampling/
   rewards.py, or "module:function" for a user's own) on its text, the reference and the prompt;
   the reward is the weighted sum;
4. advantages relative to the group (orchestration/core/grpo.py: `scale_rewards` group | batch |
   none); a group whose answers all score alike has advantage 0 everywhere (no gradient; counted);
5. the reference's log-probs (`beta` > 0) and, with more than one update, the sampling policy's
   (the ratio's denominator) are computed, and the generation is written to
   STAGE_DIR/rollouts/generation-NNNNN.parquet before any step uses it;
6. `updates_per_generation` steps on the whole batch: the clipped surrogate (`epsilon`,
   `epsilon_high`), aggregated per `loss_aggregation`, + beta * k3 KL when beta > 0 (the backends'
   `grpo` loss). With one update the ratio is exactly 1: the step is the plain policy gradient.

Defaults are the field's current practice: DAPO's asymmetric clip (0.2 / 0.28) and token-mean
aggregation, group scaling, no KL (beta 0: DAPO, Dr. GRPO and Open-Reasoner drop it; the reference
is then never loaded), one update per generation.

RESUME: the cursor is (generation, update). A generation's file is written before its first step,
so a stage killed mid-generation reads it back; one killed before samples it again from the
restored weights with the same keys, getting the same answers: the resumed stage ends on the
uninterrupted run's weights.

HELD-BACK PROMPTS: `held_out` prompts (drawn first, never trained on) are answered greedily at the
stage's start and end; STAGE_DIR/grpo.json holds their mean rewards (each function's and the
total), STAGE_DIR/grpo.png the stage's curves (rewards, zero-variance groups, clip fraction, KL,
entropy, answer length) from metrics.jsonl.

WORKERS: with N ddp workers every rank samples the same generation (same weights, same keys) and
trains on its rows, so the update is the one worker's on the same prompts; rank 0 writes the files.
Sampling is not split across ranks yet.
"""

from __future__ import annotations

import importlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hanyeong.errors import ConfigError, DataError
from orchestration.core.batch import Batch
from orchestration.core.grpo import AGGREGATIONS, SCALES, aggregation_weights, group_advantages
from orchestration.pipeline.stage_callbacks import Callback
from tokenizer.specials import NAMED_SPECIALS

ROLLOUTS_DIR, HELD_FILE, PLOT_FILE = "rollouts", "grpo.json", "grpo.png"
STOP_IDS = (NAMED_SPECIALS.index("[|endofturn|]"), NAMED_SPECIALS.index("[EOS]"))
THOUGHT_IDS = (NAMED_SPECIALS.index("<thought>"), NAMED_SPECIALS.index("</thought>"))


@dataclass(frozen=True)
class GrpoSettings:
    """`[stage.grpo]`: how each generation samples, scores and trains (kind grpo)."""

    rewards: dict[str, float] = field(default_factory=lambda: {"numeric": 1.0})
    """Reward functions by name (orchestration/sampling/rewards.py, or "module:function") -> weight;
    an answer's reward is the weighted sum."""
    group_size: int = 8
    """Answers sampled per prompt (G); a step's rows are whole groups."""
    temperature: float = 1.0
    """Sampling temperature (above 0: a group of identical answers teaches nothing)."""
    top_p: float = 1.0
    """Nucleus sampling."""
    max_new_tokens: int = 256
    """Most tokens of an answer (its stop token included); dr_grpo divides by it."""
    scale_rewards: str = "group"
    """Advantages divided by the group's reward std ('group'), the batch's ('batch') or not ('none': Dr. GRPO)."""
    loss_aggregation: str = "token_mean"
    """'token_mean' (DAPO), 'seq_mean_token_mean' (the original GRPO) or 'dr_grpo' (orchestration/core/grpo.py)."""
    epsilon: float = 0.2
    """The ratio's clip below: 1 - epsilon."""
    epsilon_high: float = 0.28
    """The ratio's clip above: 1 + epsilon_high (DAPO's clip-higher; = epsilon for the symmetric clip)."""
    beta: float = 0.0
    """Weight of the k3 KL to the reference (the stage's start model); 0: no reference at all."""
    updates_per_generation: int = 1
    """Optimizer steps on each generation (> 1: PPO-style reuse, the sampling policy's log-probs kept)."""
    held_out: int = 32
    """Prompts never trained on, answered greedily at the start and end and scored (at most a tenth)."""

    def __post_init__(self) -> None:
        if not isinstance(self.rewards, dict) or not self.rewards:
            raise ConfigError(f"rewards must be a table of reward function -> weight, got {self.rewards!r}")
        for name, weight in self.rewards.items():
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight):
                raise ConfigError(f"rewards.{name} must be a finite weight, got {weight!r}")
            try:
                reward_function(name)  # known, or importable
            except ConfigError as err:
                raise ConfigError(f"rewards.{name}: {err}") from None
        for name in ("group_size", "max_new_tokens", "updates_per_generation"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.group_size < 2:
            raise ConfigError(f"group_size must be >= 2 (advantages compare answers to one prompt), got {self.group_size}")
        if not 0 < self.temperature < math.inf or not 0 < self.top_p <= 1:
            raise ConfigError(f"temperature must be > 0 and top_p in (0, 1], got {self.temperature!r}, {self.top_p!r}")
        if self.scale_rewards not in SCALES:
            raise ConfigError(f"scale_rewards must be one of {', '.join(SCALES)}, got {self.scale_rewards!r}")
        if self.loss_aggregation not in AGGREGATIONS:
            raise ConfigError(f"loss_aggregation must be one of {', '.join(AGGREGATIONS)}, got {self.loss_aggregation!r}")
        if not 0 <= self.epsilon < 1 or not 0 <= self.epsilon_high < math.inf:
            raise ConfigError(f"epsilon must be in [0, 1) and epsilon_high >= 0, got {self.epsilon!r}, {self.epsilon_high!r}")
        if not 0 <= self.beta < math.inf:
            raise ConfigError(f"beta must be >= 0, got {self.beta!r}")
        if isinstance(self.held_out, bool) or not isinstance(self.held_out, int) or self.held_out < 0:
            raise ConfigError(f"held_out must be an integer >= 0, got {self.held_out!r}")


def reward_function(name: str):
    """The reward called `name`: a registered one, else "module:function" imported."""
    from orchestration.sampling.rewards import REWARDS, get_reward

    if name in REWARDS or ":" not in name:
        return get_reward(name)
    module, _, attr = name.partition(":")
    try:
        function = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"cannot import {name!r} ({type(err).__name__}: {err})") from None
    if not callable(function):
        raise ConfigError(f"{name!r} is not callable")
    return function


# ---- the loader ---------------------------------------------------------------------------------


class GrpoLoader:
    """The Loader protocol (orchestration/pipeline/kinds.py) over the policy's own answers,
    generation by generation. `prepare_grpo` gives it the sampler before the first step."""

    def __init__(self, mixture, seq_len: int, rows: int, seed: int):
        from orchestration.pipeline.online_stage import PromptSource, read_prompt_answers

        self.seq_len, self.batch_rows, self.seed = seq_len, rows, seed
        self.prompts, self.answers, self.data_hash = read_prompt_answers(mixture)
        self.sources = [PromptSource("prompts", np.concatenate(self.prompts))]
        self.settings: GrpoSettings | None = None
        self.generation, self.update = 0, 0
        self.current: dict | None = None  # the current generation (read or sampled on demand)
        self.train, self.held = np.arange(len(self.prompts)), np.zeros(0, np.int64)
        self.make_generation = None  # set by prepare_grpo: generation -> its rollout
        self.drawn_metrics: dict = {}

    def usable(self, max_new_tokens: int) -> int:
        """Keep the prompts whose answer fits a row (prompt + max_new_tokens <= seq_len + 1);
        returns how many were dropped."""
        fits = np.array([len(p) + max_new_tokens <= self.seq_len + 1 for p in self.prompts])
        if not fits.any():
            raise DataError(f"no prompt leaves room for {max_new_tokens} answer tokens in rows of seq_len "
                            f"{self.seq_len}; raise seq_len or lower grpo.max_new_tokens")  # fmt: skip
        self.train = np.flatnonzero(fits)
        return int((~fits).sum())

    def hold_out(self, count: int) -> None:
        from orchestration.pipeline.online_stage import held_and_trained

        self.held, self.train = held_and_trained(self.train, count, self.seed)

    def next_batch(self) -> Batch:
        if self.current is None:
            self.current = self.make_generation(self.generation)
        batch = rollout_batch(self.current, self.prompts, self.settings, self.seq_len)
        if len(batch.inputs) != self.batch_rows:
            raise ConfigError(f"grpo: a step has {self.batch_rows} rows but generation {self.generation} has "
                              f"{len(batch.inputs)}; keep batch_tokens / seq_len fixed (no batch ramp)")  # fmt: skip
        if self.update > 0:  # the metrics of sampling are the first update's
            self.drawn_metrics = {k: v for k, v in self.current["metrics"].items() if k != "generation_seconds"}
        else:
            self.drawn_metrics = dict(self.current["metrics"])
        self.update += 1
        if self.update == self.settings.updates_per_generation:
            self.generation, self.update, self.current = self.generation + 1, 0, None
        return batch

    def metrics(self) -> dict:
        """The numbers of the generation the last batch came from, for the step's metrics line."""
        return self.drawn_metrics

    def state(self) -> dict:
        return {"generation": self.generation, "update": self.update}

    def load_state(self, state: dict) -> None:
        self.generation, self.update, self.current = int(state["generation"]), int(state["update"]), None


def rollout_batch(rollout: dict, prompts: list, settings: GrpoSettings, seq_len: int) -> Batch:
    """A generation's rows in the backends' grpo layout: prompt + answer, the mask on the answer."""
    from orchestration.data.pair_loader import row

    rows = []
    for prompt, answer in zip(rollout["prompt"], rollout["answer"]):
        ids = np.concatenate([prompts[prompt], np.asarray(answer, np.int32)])
        mask = np.r_[np.zeros(len(prompts[prompt]), np.int8), np.ones(len(answer), np.int8)]
        rows.append(row(ids, mask, seq_len))
    inputs, targets, mask = (np.stack([r[k] for r in rows]) for k in range(3))
    B = len(rows)
    weight, count = aggregation_weights(settings.loss_aggregation, mask, settings.max_new_tokens)
    extras = {"advantages": np.asarray(rollout["advantage"], np.float32),
              "epsilon_low": np.full(B, settings.epsilon, np.float32),
              "epsilon_high": np.full(B, settings.epsilon_high, np.float32),
              "token_weight": weight, "row_count": count}  # fmt: skip
    for name in ("old_logprobs", "ref_logprobs"):
        if rollout.get(name) is not None:
            extras[name] = np.asarray(rollout[name], np.float32)
    if settings.beta > 0:
        extras["beta"] = np.full(B, settings.beta, np.float32)
    return Batch(inputs, targets, loss_mask=mask, extras=extras)


# ---- a generation --------------------------------------------------------------------------------


@dataclass
class Sampler:
    """What a generation needs besides the loader: the models, the tokenizer, the reward functions."""

    backend: object
    policy: object  # the TrainState whose .model is the current policy
    reference: object | None
    tokenizer: object
    directory: Path
    suppress: np.ndarray
    write: bool  # rank 0 writes the generation files

    def answers(self, model, prompts: list[np.ndarray], settings: GrpoSettings, keys, greedy: bool = False):
        return self.backend.generate(model, [p.tolist() for p in prompts], settings.max_new_tokens,
                                     0.0 if greedy else settings.temperature, settings.top_p, stop_ids=STOP_IDS,
                                     suppress_ids=self.suppress, row_seeds=keys)  # fmt: skip

    def text(self, ids) -> str:
        """An answer's (or reference's) text, `<thought>` tokens kept, stop tokens dropped."""
        return self.tokenizer.decode([int(i) for i in ids if int(i) not in STOP_IDS])

    def rewards(self, loader: GrpoLoader, drawn: list[int], answers: list) -> dict[str, np.ndarray]:
        """Each reward function's score of each answer ([N] per name), unweighted."""
        from orchestration.sampling.prompts import Prompt

        settings = loader.settings
        out = {name: np.zeros(len(answers)) for name in settings.rewards}
        for row, (p, answer) in enumerate(zip(drawn, answers)):
            reference = self.text(loader.answers[p])
            prompt = Prompt(int(p), None, self.tokenizer.decode(loader.prompts[p].tolist(), skip_special_tokens=True),
                            reference)  # fmt: skip
            text = self.text(answer)
            for name in settings.rewards:
                value = float(reward_function(name)(text, reference, prompt))
                if not math.isfinite(value):
                    raise DataError(f"reward {name!r} returned {value} for an answer to prompt {p}")
                out[name][row] = value
        return out


def make_generation(loader: GrpoLoader, sampler: Sampler, g: int) -> dict:
    """Generation g: read from STAGE_DIR/rollouts/ or sampled, scored and written there first."""
    from orchestration.core.generation import sample_key
    from orchestration.pipeline.online_stage import permuted_stream

    path = sampler.directory / ROLLOUTS_DIR / f"generation-{g:05d}.parquet"
    if path.exists():  # read back (a resumed stage): no time spent sampling it in this run
        return read_rollout(path)
    s = loader.settings
    started = time.perf_counter()
    per = loader.batch_rows // s.group_size
    drawn = permuted_stream(loader.train, loader.seed, g * per, per)
    prompts = [int(p) for p in drawn for _ in range(s.group_size)]
    keys = [sample_key(loader.seed, g * per + k, j) for k in range(per) for j in range(s.group_size)]
    answers = sampler.answers(sampler.policy.model, [loader.prompts[p] for p in prompts], s, keys)
    seconds = time.perf_counter() - started
    scores = sampler.rewards(loader, prompts, answers)
    total = sum(w * scores[name] for name, w in s.rewards.items())
    advantages, zero_std = group_advantages(total, s.group_size, s.scale_rewards)
    rollout = {"prompt": prompts, "answer": [list(map(int, a)) for a in answers], "reward": total.tolist(),
               "scores": {k: v.tolist() for k, v in scores.items()}, "advantage": advantages.tolist()}  # fmt: skip
    batch = rollout_batch(rollout, loader.prompts, s, loader.seq_len)
    tokens = Batch(batch.inputs, batch.targets)
    if s.updates_per_generation > 1:  # the ratio's denominator: the sampling policy, before any update
        rollout["old_logprobs"] = sampler.backend.logprobs(sampler.policy.model, tokens)
    if s.beta > 0:
        rollout["ref_logprobs"] = sampler.backend.logprobs(sampler.reference, tokens)
    lengths = np.array([len(a) for a in answers], np.float64)
    finished = np.array([bool(a) and a[-1] in STOP_IDS for a in answers])
    rollout["metrics"] = {"reward": float(total.mean()), **{f"reward/{k}": float(v.mean()) for k, v in scores.items()},
                          "reward_std": float(total.reshape(-1, s.group_size).std(axis=1, ddof=1).mean()),
                          "zero_std_groups": float(zero_std.mean()), "answer_tokens": float(lengths.mean()),
                          "finished": float(finished.mean()), "generation_seconds": round(seconds, 4)}  # fmt: skip
    if sampler.write:
        write_rollout(path, rollout)
    return rollout


def write_rollout(path: Path, rollout: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hanyeong.files import write_atomic

    columns = {"prompt": pa.array(rollout["prompt"], pa.int64()), "answer": pa.array(rollout["answer"], pa.list_(pa.int32())),
               "reward": pa.array(rollout["reward"], pa.float64()), "advantage": pa.array(rollout["advantage"], pa.float32()),
               **{f"reward/{k}": pa.array(v, pa.float64()) for k, v in rollout["scores"].items()}}  # fmt: skip
    for name in ("old_logprobs", "ref_logprobs"):
        if rollout.get(name) is not None:
            columns[name] = pa.array([r.tolist() for r in np.asarray(rollout[name], np.float32)], pa.list_(pa.float32()))
    table = pa.table(columns, metadata={"metrics": json.dumps(rollout["metrics"])})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_atomic(path, sink.getvalue().to_pybytes())


def read_rollout(path: Path) -> dict:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    t = table.to_pydict()
    metrics = json.loads(table.schema.metadata[b"metrics"]) | {"generation_seconds": 0.0}  # not sampled now
    rollout = {"prompt": t["prompt"], "answer": t["answer"], "reward": t["reward"], "advantage": t["advantage"],
               "scores": {k.split("/", 1)[1]: v for k, v in t.items() if k.startswith("reward/")},
               "metrics": metrics}  # fmt: skip
    for name in ("old_logprobs", "ref_logprobs"):
        rollout[name] = np.asarray(t[name], np.float32) if name in t else None
    return rollout


# ---- the kind's prepare and callbacks ------------------------------------------------------------


def prepare_grpo(run, recipe, init_from: str | None) -> list:
    """Check the shapes, load the reference (beta > 0), wire the loader's generations, score the
    held-back prompts at step 0. Returns the loop's callbacks."""
    from orchestration.core.generation import suppressed_ids
    from orchestration.pipeline.rejection_stage import run_tokenizer
    from orchestration.pipeline.stage import start_model
    from orchestration.pipeline.stage_config import stage_label

    loader, settings, where = run.loader, run.stage.grpo or GrpoSettings(), stage_label(run.index, run.name)
    if run.world > 1 and run.stage.parallelism == "fsdp":
        raise ConfigError(f"{where}: grpo samples from the policy in every rank; use parallelism = 'ddp'")
    if loader.batch_rows % settings.group_size:
        raise ConfigError(f"{where}: a step's rows (batch_tokens / seq_len = {loader.batch_rows}) must be whole "
                          f"groups of grpo.group_size = {settings.group_size}")  # fmt: skip
    loader.settings = settings
    dropped = loader.usable(settings.max_new_tokens)
    if dropped:
        run.notes.append(f"{dropped} prompt(s) too long for seq_len {loader.seq_len} with "
                         f"{settings.max_new_tokens} answer tokens were left out")  # fmt: skip
    loader.hold_out(settings.held_out)
    reference = None
    if settings.beta > 0:
        reference = start_model(run.backend, recipe, run.index, init_from, run.directory, run.main)
    spec = run.state.model.spec
    suppress = suppressed_ids(spec.vocab_size, STOP_IDS, allow_ids=THOUGHT_IDS)
    sampler = Sampler(run.backend, run.state, reference, run_tokenizer(recipe, run), run.directory, suppress, run.main)
    loader.make_generation = lambda g: make_generation(loader, sampler, g)
    held = HeldPrompts(run.directory / HELD_FILE, sampler, loader)
    if run.state.step == 0 and run.main:
        held.write("start", held.score(run.state.model))
    return [held, GrpoPlot(run.directory / PLOT_FILE)]


class HeldPrompts(Callback):
    """The held-back prompts' mean rewards (greedy answers) at the start and end: STAGE_DIR/grpo.json."""

    def __init__(self, path: Path, sampler: Sampler, loader: GrpoLoader):
        self.path, self.sampler, self.loader = path, sampler, loader

    def score(self, model) -> dict | None:
        from orchestration.core.generation import sample_key

        held = [int(i) for i in self.loader.held]
        if not held:
            return None
        keys = [sample_key(self.loader.seed, -1, i) for i in held]
        answers = self.sampler.answers(model, [self.loader.prompts[i] for i in held], self.loader.settings, keys,
                                       greedy=True)  # fmt: skip
        scores = self.sampler.rewards(self.loader, held, answers)
        total = sum(w * scores[name] for name, w in self.loader.settings.rewards.items())
        return {"reward": round(float(total.mean()), 6), **{k: round(float(v.mean()), 6) for k, v in scores.items()},
                "answer_tokens": round(float(np.mean([len(a) for a in answers])), 2)}  # fmt: skip

    def write(self, when: str, value: dict | None) -> None:
        from hanyeong.files import write_atomic

        body = json.loads(self.path.read_text(encoding="utf-8")) if self.path.exists() and when == "end" else {}
        body |= {"held_out": len(self.loader.held), when: value}
        write_atomic(self.path, json.dumps(body, indent=2) + "\n")

    def at_end(self, run) -> None:
        if not run.main:
            return
        self.write("end", self.score(run.state.model))
        body = json.loads(self.path.read_text(encoding="utf-8"))
        if body.get("start") and body.get("end"):
            run.notes.append(f"held-back prompts' reward {body['start']['reward']:.3f} -> {body['end']['reward']:.3f} "
                             f"({body['held_out']} prompts, greedy answers)")  # fmt: skip


class GrpoPlot(Callback):
    """STAGE_DIR/grpo.png at the end (rank 0), from the stage's metrics.jsonl."""

    def __init__(self, path: Path):
        self.path = path

    def at_end(self, run) -> None:
        if run.main:
            from orchestration.pipeline.stage import METRICS

            plot_grpo(run.directory / METRICS, self.path, f"{run.name} (grpo)")


PANELS = (("reward", "reward (mean of the batch)", "reward/"), ("zero_std_groups", "groups with equal rewards", None),
          ("grpo/clip_ratio", "clipped share", None), ("grpo/kl", "KL to the reference (k3)", None),
          ("grpo/entropy", "entropy (nats / token)", None), ("answer_tokens", "answer tokens", None))  # fmt: skip


def plot_grpo(metrics: Path, out: Path, title: str) -> Path | None:
    """The GRPO curves of `metrics` (a metrics.jsonl) to `out`; None when it has none."""
    from matplotlib.backends.backend_agg import (
        FigureCanvasAgg,  # Agg without touching pyplot's state
    )
    from matplotlib.figure import Figure

    from hanyeong.files import write_figure
    from orchestration.pipeline.run_report import read_metrics

    lines = [line for line in read_metrics(metrics) if "reward" in line]
    if not lines:
        return None
    steps = [line["step"] for line in lines]
    figure = Figure(figsize=(13, 6), dpi=110)
    FigureCanvasAgg(figure)
    for ax, (key, label, parts) in zip(figure.subplots(2, 3).ravel(), PANELS):
        if any(key in line for line in lines):
            ax.plot(steps, [line.get(key, np.nan) for line in lines], color="C0", linewidth=1.3, label="total")
        else:  # the KL without a reference (beta = 0)
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, color="0.5")
        for i, part in enumerate(sorted({k for line in lines for k in line if parts and k.startswith(parts)})):
            ax.plot(steps, [line.get(part, np.nan) for line in lines], color=f"C{i + 1}", linewidth=1.0,
                    label=part.split("/", 1)[1])  # fmt: skip
        if parts:
            ax.legend(fontsize=7)
        ax.set_xlabel("step")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    return write_figure(out, figure)
