"""Online DPO (kind `online-dpo`): the policy samples its own pairs, round by round.

EXAONE 3.0 and Qwen2 follow offline DPO with online rounds: sample answers from the current
policy, rank them with a reward model, train DPO on the best against the worst, repeat. Per round:

1. draw `prompts_per_round` prompts (a seeded permutation of the stage's chat data, epoch after
   epoch; a prompt is a conversation's turns up to its first assistant answer);
2. sample `samples` answers to each from the CURRENT policy (temperature / top_p; each answer's
   random stream keyed by (seed, draw, sample): orchestration/core/generation.sample_key);
3. score them with the reward model (`reward`: an earlier stage of the run by name, or a
   checkpoint directory) at each answer's last token, as the reward stage trained it;
4. keep the best and the worst answer of each prompt as a pair when the reward model's margin is
   above `min_margin` (a round's drops are counted), score both under the reference (the stage's
   start model) and write the round to STAGE_DIR/rounds/round-NNNNN.parquet;
5. train DPO on the round's pairs (the dpo loss, `beta`), `batch_tokens // seq_len` pairs a step.

RESUME: the cursor is (round, pair); a round's file is written before any step uses it, so a stage
killed mid-round reads its pairs back and continues; one killed before a round's file exists
samples it again from the restored weights with the same keys, getting the same pairs.

HELD-BACK PROMPTS: `held_out` prompts (drawn first, never sampled for training) are answered
greedily at the stage's start and end and scored by the reward model: STAGE_DIR/online.json holds
the two mean rewards (whether the rounds raised the reward model's score of the policy's answers
on prompts it never trained on), and each round's pair count and mean reward of its sampled
answers.

One worker only (the policy samples in the stage's own process).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hanyeong.errors import ConfigError, DataError, TrainingError
from orchestration.core.batch import Batch
from orchestration.pipeline.stage_callbacks import Callback
from tokenizer.specials import NAMED_SPECIALS

ROUNDS_DIR, HELD_FILE = "rounds", "online.json"
STOP_IDS = (NAMED_SPECIALS.index("[|endofturn|]"), NAMED_SPECIALS.index("[EOS]"))
EMPTY_ROUNDS = 5  # rounds in a row without a pair: the reward model cannot rank the policy's answers


@dataclass(frozen=True)
class OnlineSettings:
    """`[stage.online]`: how each round samples, ranks and trains (kind online-dpo)."""

    reward: str
    """The reward model: an earlier stage's name (its final checkpoint) or a checkpoint directory."""
    prompts_per_round: int = 32
    """Prompts sampled per round; each gives at most one pair."""
    samples: int = 2
    """Answers per prompt (k); the best and the worst make the pair."""
    temperature: float = 1.0
    """Sampling temperature (above 0: answers must differ to make a pair)."""
    top_p: float = 1.0
    """Nucleus sampling."""
    max_new_tokens: int = 64
    """Most tokens of an answer."""
    min_margin: float = 0.0
    """A pair is kept only when the reward model scores the best above the worst by more than this."""
    beta: float = 0.1
    """DPO's beta."""
    held_out: int = 16
    """Prompts never trained on, answered greedily at the start and end and scored (at most a tenth)."""

    def __post_init__(self) -> None:
        if not isinstance(self.reward, str) or not self.reward:
            raise ConfigError(f"reward must name an earlier stage or a checkpoint directory, got {self.reward!r}")
        for name in ("prompts_per_round", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 2:
            raise ConfigError(f"samples must be an integer >= 2 (a pair needs two answers), got {self.samples!r}")
        if not 0 < self.temperature < math.inf:
            raise ConfigError(f"temperature must be above 0 (greedy answers are all alike), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not 0 < self.beta < math.inf or self.min_margin < 0:
            raise ConfigError(f"beta must be > 0 and min_margin >= 0, got {self.beta!r} and {self.min_margin!r}")
        if isinstance(self.held_out, bool) or not isinstance(self.held_out, int) or self.held_out < 0:
            raise ConfigError(f"held_out must be an integer >= 0, got {self.held_out!r}")


# ---- prompts ------------------------------------------------------------------------------------


def read_prompts(mixture) -> tuple[list[np.ndarray], str]:
    """Every conversation's prompt (ids up to its first trained token: [BOS] ... [|assistant|]) of
    the chat datasets of `mixture`, and their datasets' content hashes."""
    prompts, _, hashes = read_prompt_answers(mixture)
    return prompts, hashes


def read_prompt_answers(mixture) -> tuple[list[np.ndarray], list[np.ndarray], str]:
    """Every conversation's prompt (as read_prompts), its first assistant answer (the ids of the
    first run of trained tokens: the answer and its [|endofturn|]), and the datasets' content hashes."""
    import pyarrow.parquet as pq

    prompts, answers, hashes = [], [], []
    for entry in mixture.sources:
        directory = Path(entry.dataset)
        manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
        if manifest.get("kind") != "chat":
            raise DataError(f"{directory}: prompts are read from chat datasets, not {manifest.get('kind')!r}")
        hashes.append(manifest.get("content_hash", ""))
        for name, source in manifest["sources"].items():
            if entry.source not in ("*", name):
                continue
            for shard in source["shards"]:
                table = pq.read_table(directory / shard["path"], columns=["input_ids", "loss_mask"]).to_pydict()
                for ids, mask in zip(table["input_ids"], table["loss_mask"]):
                    first = next((i for i, m in enumerate(mask) if m), None)
                    if first:
                        end = next((i for i in range(first, len(mask)) if not mask[i]), len(mask))
                        prompts.append(np.asarray(ids[:first], np.int32))
                        answers.append(np.asarray(ids[first:end], np.int32))
    if not prompts:
        raise DataError(f"no chat prompts in {', '.join(e.dataset for e in mixture.sources)}")
    return prompts, answers, "-".join(h[:16] for h in hashes)


def held_and_trained(indices: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(held, trained), both sorted: `count` of `indices` (at most a tenth) drawn by `seed`, and the rest."""
    count = min(int(count), len(indices) // 10)
    drawn = np.asarray(indices)[np.random.default_rng([seed, 1 << 30]).permutation(len(indices))]
    return np.sort(drawn[:count]), np.sort(drawn[count:])


def permuted_stream(train: np.ndarray, seed: int, first: int, count: int) -> np.ndarray:
    """Draws first .. first + count - 1 of the stream of seeded permutations of `train`, one
    permutation per epoch."""
    n = len(train)
    draws = np.arange(first, first + count)
    out = np.empty(count, np.int64)
    for epoch in np.unique(draws // n):
        order = train[np.random.default_rng([seed, int(epoch)]).permutation(n)]
        here = draws // n == epoch
        out[here] = order[draws[here] % n]
    return out


# ---- the loader ---------------------------------------------------------------------------------


class OnlineLoader:
    """The Loader protocol (orchestration/pipeline/kinds.py) over pairs sampled round by round.
    `prepare_online` gives it the policy, the reference and the reward model before the first step."""

    def __init__(self, mixture, seq_len: int, rows: int, seed: int):
        self.seq_len, self.batch_rows, self.seed = seq_len, rows, seed
        self.prompts, self.data_hash = read_prompts(mixture)
        self.sources = [PromptSource("prompts", np.concatenate(self.prompts))]
        self.settings: OnlineSettings | None = None
        self.round, self.position = 0, 0
        self.pairs: list | None = None  # the current round's pairs (loaded or sampled on demand)
        self.held = np.zeros(0, np.int64)
        self.train = np.arange(len(self.prompts))
        self.make_round = None  # set by prepare_online: round -> its pairs

    def hold_out(self, count: int) -> None:
        self.held, self.train = held_and_trained(np.arange(len(self.prompts)), count, self.seed)

    def round_prompts(self, r: int) -> np.ndarray:
        """The training prompts of round r: the r-th run of `prompts_per_round` draws of the stream
        of seeded permutations (one per epoch over the training prompts)."""
        per = self.settings.prompts_per_round
        return permuted_stream(self.train, self.seed, r * per, per)

    def next_batch(self) -> Batch:
        chosen, rejected, refs = [], [], []
        empty = 0
        while len(chosen) < self.batch_rows:
            if self.pairs is None:
                self.pairs = self.make_round(self.round)
            if self.position >= len(self.pairs["chosen"]):
                empty = empty + 1 if not len(self.pairs["chosen"]) else 0
                if empty >= EMPTY_ROUNDS:
                    raise TrainingError(f"online-dpo: {EMPTY_ROUNDS} rounds in a row gave no pair (every answer "
                                        "scored alike within min_margin)")  # fmt: skip
                self.round, self.position, self.pairs = self.round + 1, 0, None
                continue
            i = self.position
            chosen.append(self.pairs["chosen"][i])
            rejected.append(self.pairs["rejected"][i])
            refs.append(self.pairs["reference"][i])
            self.position += 1
        return pair_batch(chosen, rejected, np.array(refs, np.float32), self.seq_len, self.settings.beta)

    def state(self) -> dict:
        return {"round": self.round, "position": self.position}

    def load_state(self, state: dict) -> None:
        self.round, self.position, self.pairs = int(state["round"]), int(state["position"]), None


@dataclass
class PromptSource:
    """What the loader reads, for the stage's vocabulary check (`key`, every token id)."""

    key: str
    tokens: np.ndarray


def pair_batch(chosen: list, rejected: list, refs: np.ndarray, seq_len: int, beta: float) -> Batch:
    """The pairs as the dpo loss reads them (orchestration/data/pair_loader.py's layout)."""
    from orchestration.data.pair_loader import row

    T = seq_len
    c = [row(ids[: T + 1], mask[: T + 1], T) for ids, mask in chosen]
    r = [row(ids[: T + 1], mask[: T + 1], T) for ids, mask in rejected]
    stack = lambda rows, k: np.stack([x[k] for x in rows])  # noqa: E731
    extras = {"rejected_inputs": stack(r, 0), "rejected_targets": stack(r, 1), "rejected_mask": stack(r, 2),
              "ref_chosen_logps": refs[:, 0], "ref_rejected_logps": refs[:, 1],
              "beta": np.full(len(chosen), beta, np.float32)}  # fmt: skip
    return Batch(stack(c, 0), stack(c, 1), loss_mask=stack(c, 2), extras=extras)


# ---- a round -------------------------------------------------------------------------------------


@dataclass
class Round:
    """What a round needs besides the loader: the models and where rounds are kept."""

    backend: object
    policy: object  # the TrainState whose .model is the current policy
    reference: object
    reward: object
    directory: Path
    suppress: np.ndarray

    def answers(self, model, prompts: list[np.ndarray], settings: OnlineSettings, keys, greedy: bool = False):
        """One answer per prompt (its ids, ending on a stop id when it finished)."""
        temperature = 0.0 if greedy else settings.temperature
        return self.backend.generate(model, [p.tolist() for p in prompts], settings.max_new_tokens, temperature,
                                     settings.top_p, stop_ids=STOP_IDS, suppress_ids=self.suppress,
                                     row_seeds=keys)  # fmt: skip

    def scores(self, prompts: list[np.ndarray], answers: list[list[int]]) -> np.ndarray:
        from orchestration.sampling.score import score_rows

        rows = [np.asarray([*p, *a], np.int64) for p, a in zip(prompts, answers)]
        return score_rows(self.backend, self.reward, rows, batch_rows=16)


def make_round(loader: OnlineLoader, parts: Round, r: int) -> dict:
    """Round r's pairs: read from STAGE_DIR/rounds/ or sampled, ranked, scored under the reference
    and written there (before any step trains on them)."""
    from orchestration.core.generation import sample_key

    path = parts.directory / ROUNDS_DIR / f"round-{r:05d}.parquet"
    if path.exists():
        return read_round(path)
    s = loader.settings
    drawn = loader.round_prompts(r)
    prompts = [loader.prompts[i] for i in drawn for _ in range(s.samples)]
    keys = [sample_key(loader.seed, r * s.prompts_per_round + k, j) for k in range(len(drawn)) for j in range(s.samples)]
    answers = parts.answers(parts.policy.model, prompts, s, keys)
    scores = parts.scores(prompts, answers).reshape(len(drawn), s.samples)
    pairs = {"prompt": [], "chosen": [], "rejected": [], "scores": []}
    for k, row in enumerate(scores):
        best, worst = int(np.argmax(row)), int(len(row) - 1 - np.argmin(row[::-1]))
        if row[best] - row[worst] <= s.min_margin:
            continue
        prompt = loader.prompts[drawn[k]]
        for side, j in (("chosen", best), ("rejected", worst)):
            answer = answers[k * s.samples + j]
            ids = np.concatenate([prompt, np.asarray(answer, np.int32)])
            pairs[side].append((ids, np.r_[np.zeros(len(prompt), np.int8), np.ones(len(answer), np.int8)]))
        pairs["prompt"].append(int(drawn[k]))
        pairs["scores"].append((float(row[best]), float(row[worst])))
    pairs["reference"] = reference_logps(parts, pairs, loader.seq_len)
    pairs["mean_reward"] = float(scores.mean())
    write_round(path, pairs)
    return pairs


def reference_logps(parts: Round, pairs: dict, seq_len: int) -> list:
    """The reference's summed answer log-probs of each pair: [(chosen, rejected), ...]."""
    out = []
    for chosen, rejected in zip(pairs["chosen"], pairs["rejected"]):
        both = pair_batch([chosen], [rejected], np.zeros((1, 2), np.float32), seq_len, 1.0)
        c = parts.backend.logprobs(parts.reference, Batch(both.inputs, both.targets))
        rj = parts.backend.logprobs(parts.reference, Batch(both["rejected_inputs"], both["rejected_targets"]))
        out.append((float((c * both.loss_mask).sum()), float((rj * both["rejected_mask"]).sum())))
    return out


def write_round(path: Path, pairs: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hanyeong.files import write_atomic

    table = pa.table({
        "prompt": pa.array(pairs["prompt"], pa.int64()),
        "chosen_ids": [c[0].tolist() for c in pairs["chosen"]], "chosen_mask": [c[1].tolist() for c in pairs["chosen"]],
        "rejected_ids": [r[0].tolist() for r in pairs["rejected"]],
        "rejected_mask": [r[1].tolist() for r in pairs["rejected"]],
        "chosen_score": [s[0] for s in pairs["scores"]], "rejected_score": [s[1] for s in pairs["scores"]],
        "ref_chosen": [r[0] for r in pairs["reference"]], "ref_rejected": [r[1] for r in pairs["reference"]],
    }, metadata={"mean_reward": str(pairs["mean_reward"])})  # fmt: skip
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_atomic(path, sink.getvalue().to_pybytes())


def read_round(path: Path) -> dict:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    t = table.to_pydict()
    side = lambda k: [(np.asarray(i, np.int32), np.asarray(m, np.int8)) for i, m in zip(t[f"{k}_ids"], t[f"{k}_mask"])]  # noqa: E731
    return {"prompt": t["prompt"], "chosen": side("chosen"), "rejected": side("rejected"),
            "scores": list(zip(t["chosen_score"], t["rejected_score"])),
            "reference": list(zip(t["ref_chosen"], t["ref_rejected"])),
            "mean_reward": float(table.schema.metadata[b"mean_reward"])}  # fmt: skip


# ---- the kind's prepare and callback -------------------------------------------------------------


def reward_checkpoint(name: str, recipe, index: int, directory: Path) -> Path:
    """A reward model: an earlier stage's final checkpoint (by name), else a checkpoint directory."""
    from orchestration.pipeline.run_manifest import stage_dir_name

    names = [s.name for s in recipe.stage[:index]]
    if name in names:
        return directory.parent.parent / stage_dir_name(names.index(name), name) / "checkpoint"
    return Path(name)


def prepare_online(run, recipe, init_from: str | None) -> list:
    """Load the reference (the start model) and the reward model, wire the loader's rounds, score
    the held-back prompts at step 0. Returns the loop's callbacks."""
    from orchestration.core.checkpoint import load_spec
    from orchestration.core.generation import suppressed_ids
    from orchestration.pipeline.stage import start_model

    if run.world > 1:
        raise ConfigError(f"{run.name}: online-dpo samples in the stage's own process; give it workers = 1")
    loader, settings = run.loader, run.stage.online
    loader.settings = settings
    loader.hold_out(settings.held_out)
    rm = reward_checkpoint(settings.reward, recipe, run.index, run.directory)
    if load_spec(rm).head != "score":
        raise ConfigError(f"{run.name}: online.reward {settings.reward!r} is a language model, not a reward model")
    reference = start_model(run.backend, recipe, run.index, init_from, run.directory, run.main)
    spec = run.state.model.spec
    parts = Round(run.backend, run.state, reference, run.backend.load(rm), run.directory,
                  suppressed_ids(spec.vocab_size, STOP_IDS))  # fmt: skip
    loader.make_round = lambda r: make_round(loader, parts, r)
    held = HeldPrompts(run.directory / HELD_FILE, parts, loader)
    if run.state.step == 0:
        held.write("start", held.score(run.state.model))
    return [held]


class HeldPrompts(Callback):
    """The held-back prompts' mean reward (greedy answers) at the start and end: STAGE_DIR/online.json;
    each round's mean reward and pair count in the metrics."""

    def __init__(self, path: Path, parts: Round, loader: OnlineLoader):
        self.path, self.parts, self.loader = path, parts, loader

    def score(self, model) -> float | None:
        from orchestration.core.generation import sample_key

        if not len(self.loader.held):
            return None
        prompts = [self.loader.prompts[i] for i in self.loader.held]
        keys = [sample_key(self.loader.seed, -1, int(i)) for i in self.loader.held]
        answers = self.parts.answers(model, prompts, self.loader.settings, keys, greedy=True)
        return round(float(self.parts.scores(prompts, answers).mean()), 6)

    def write(self, when: str, value: float | None) -> None:
        from hanyeong.files import write_atomic

        body = json.loads(self.path.read_text(encoding="utf-8")) if self.path.exists() and when == "end" else {}
        body |= {"held_out": len(self.loader.held), when: value}
        write_atomic(self.path, json.dumps(body, indent=2) + "\n")

    def at_end(self, run) -> None:
        self.write("end", self.score(run.state.model))
        body = json.loads(self.path.read_text(encoding="utf-8"))
        body["rounds"] = [{"round": int(p.stem.split("-")[1]), "pairs": len(r["chosen"]), "mean_reward": r["mean_reward"]}
                          for p in sorted((self.path.parent / ROUNDS_DIR).glob("round-*.parquet"))
                          for r in [read_round(p)]]  # fmt: skip
        from hanyeong.files import write_atomic

        write_atomic(self.path, json.dumps(body, indent=2) + "\n")
        if body.get("start") is not None:
            run.notes.append(f"held-back prompts' mean reward {body['start']:.3f} -> {body['end']:.3f} "
                             f"({body['held_out']} prompts, greedy answers)")  # fmt: skip
