"""Rejection-sampling SFT (kind `rejection-sft`): SFT on the best of the start model's own answers.

Llama 3.1, Qwen2 and AFM fine-tune on the best of N sampled answers; EXAONE 3.5 keeps only what two
reward models agree on. Before the first step the stage:

1. draws `prompts` prompts of its chat data (a seeded permutation; a prompt is a conversation's
   turns up to its first assistant answer) and samples `samples` answers to each from its start
   model (temperature / top_p; answer j of prompt i keyed by (seed, i, j));
2. scores them with the reward model (`reward`: an earlier stage's name or a checkpoint) and, with
   `second`, a second one;
3. keeps per prompt the finished answer the first model scores highest, when the second ranks the
   same answer first (orchestration/sampling/select.py's rule; the counts of each reason dropped);
4. writes STAGE_DIR/kept/selected.jsonl (each kept prompt and answer as text, with provenance),
   the kept conversations as a chat dataset in STAGE_DIR/kept/dataset (token ids as sampled: the
   prompt, the answer and its [|endofturn|], a newline, [EOS]; the loss on the answer, as chat data
   puts it) and STAGE_DIR/kept/manifest.json last (the rule and the counts); the stage then trains
   on the dataset (SFT, whole conversations per row).

A resumed stage finds STAGE_DIR/kept/manifest.json and trains on the dataset as it was; nothing is
sampled again. One worker (the start model samples in the stage's own process).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from hanyeong.errors import ConfigError, DataError

KEPT_DIR = "kept"


@dataclass(frozen=True)
class RejectionSettings:
    """`[stage.rejection]`: what is sampled and what is kept (kind rejection-sft)."""

    reward: str
    """The reward model ranking the answers: an earlier stage's name or a checkpoint directory."""
    second: str | None = None
    """A second reward model that must rank the same answer first; None: the first alone."""
    prompts: int = 64
    """Prompts sampled (the first of a seeded permutation of the stage's chat data)."""
    samples: int = 4
    """Answers per prompt (N of best-of-N)."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling."""
    max_new_tokens: int = 64
    """Most tokens of an answer; an answer cut there is never kept."""

    def __post_init__(self) -> None:
        for name in ("reward", "second"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"{name} must name an earlier stage or a checkpoint directory, got {value!r}")
        for name in ("prompts", "samples", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not 0 < self.temperature < math.inf or not 0 < self.top_p <= 1:
            raise ConfigError(f"temperature must be > 0 and top_p in (0, 1], got {self.temperature!r}, {self.top_p!r}")


class DeferredLoader:
    """The Loader protocol for a stage whose data are made in `prepare`: the prompts stand in for
    the vocabulary check; batches and the cursor go to the loader `prepare` starts."""

    def __init__(self, mixture, seq_len: int, rows: int, seed: int):
        from orchestration.pipeline.online_stage import PromptSource, read_prompts

        self.mixture, self.seq_len, self.batch_rows, self.seed = mixture, seq_len, rows, seed
        self.prompts, _ = read_prompts(mixture)
        self.sources = [PromptSource("prompts", np.concatenate(self.prompts))]
        self.inner, self.cursor = None, None

    def start(self, inner) -> None:
        """Train on `inner` from now on (at the saved cursor when the stage resumed)."""
        self.inner = inner
        if self.cursor is not None:
            inner.load_state(self.cursor)

    def next_batch(self):
        self.inner.seq_len, self.inner.batch_rows = self.seq_len, self.batch_rows  # the ramps set them here
        return self.inner.next_batch()

    def state(self) -> dict:
        return self.inner.state()

    def load_state(self, state: dict) -> None:
        self.cursor = state
        if self.inner is not None:
            self.inner.load_state(state)


def sample_and_keep(run, settings: RejectionSettings, recipe, out: Path, policy: str) -> dict:
    """Steps 1-4 with the stage's start model; returns OUT/manifest.json's content."""
    from hanyeong.files import write_atomic
    from orchestration.core.generation import sample_key, suppressed_ids
    from orchestration.pipeline.online_stage import STOP_IDS, Round
    from orchestration.sampling.select import SelectConfig, choose

    loader, backend = run.loader, run.backend
    order = np.random.default_rng([loader.seed, 7]).permutation(len(loader.prompts))[: settings.prompts]
    prompts = [loader.prompts[i] for i in order for _ in range(settings.samples)]
    keys = [sample_key(loader.seed, int(i), j) for i in order for j in range(settings.samples)]
    model = run.state.model  # the start model: nothing has trained yet
    parts = Round(backend, run.state, None, None, run.directory, suppressed_ids(model.spec.vocab_size, STOP_IDS))
    answers = parts.answers(model, prompts, settings, keys)
    scores = {}
    for role in ("reward", "second"):
        if getattr(settings, role) is not None:
            parts.reward = reward_model(backend, getattr(settings, role), recipe, run)
            scores[role] = parts.scores(prompts, answers).reshape(len(order), settings.samples)
    finished = np.array([bool(a) and a[-1] in STOP_IDS for a in answers]).reshape(len(order), settings.samples)
    rule = SelectConfig(by="reward:first", second="reward:second" if settings.second else None)
    tokenizer, kept, lines, dropped = run_tokenizer(recipe, run), [], [], Counter()
    for k, i in enumerate(order):
        second = scores["second"][k] if "second" in scores else None
        picked, reason = choose(scores["reward"][k], second, finished[k], rule, verifier=False)
        if picked is None:
            dropped[reason] += 1
            continue
        j = picked[0]
        answer = answers[k * settings.samples + j]
        kept.append(conversation(loader.prompts[i], answer, tokenizer))
        lines.append({"prompt": tokenizer.decode(loader.prompts[i].tolist()),
                      "answer": tokenizer.stream_decoder(skip_special_tokens=True).decode(answer),
                      "provenance": {"prompt": int(i), "sample": j,
                                     "scores": {r: float(scores[r][k][j]) for r in scores}}})  # fmt: skip
    write_atomic(out / "selected.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines))
    manifest = {"policy": policy, "rule": asdict(settings), "prompts": len(order),
                "kept": len(kept), "dropped": dict(dropped)}  # fmt: skip
    if kept:
        write_dataset(out / "dataset", kept, tokenizer_dir(recipe, run))
    write_atomic(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def conversation(prompt: np.ndarray, answer: list[int], tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """A kept conversation as chat data encodes one (orchestration/data/chat.py): the prompt, the
    answer with its [|endofturn|], a newline and [EOS]; the loss on the answer and [|endofturn|]."""
    newline = tokenizer.encode("\n")
    eos = tokenizer.hf.token_to_id("[EOS]")
    ids = np.concatenate([prompt, np.asarray(answer, np.int32), np.asarray([*newline, eos], np.int32)])
    mask = np.concatenate([np.zeros(len(prompt), np.int8), np.ones(len(answer), np.int8),
                           np.zeros(len(newline) + 1, np.int8)])  # fmt: skip
    return ids.astype(np.int32), mask


def write_dataset(dataset: Path, kept: list, tokenizer: Path) -> None:
    """The kept conversations as a chat dataset (one source, one shard) in the dataset contract."""
    import shutil

    from orchestration.data import manifest as mf
    from orchestration.data.chat_dataset import write_shard
    from orchestration.data.shards import tokenizer_info

    tok, tmp, rel = tokenizer_info(tokenizer), mf.staging_dir(dataset), "shards/kept/part-00000.parquet"
    try:
        entry = write_shard(tmp / rel, [f"kept#{i}" for i in range(len(kept))], ["und"] * len(kept),
                            [ids for ids, _ in kept], [mask for _, mask in kept])  # fmt: skip
        sources = {"kept": {"documents": len(kept), "tokens": entry["tokens"],
                            "trained_tokens": entry["trained_tokens"], "shards": [{"path": rel, **entry}]}}  # fmt: skip
        manifest = {"format": mf.FORMAT, "version": mf.VERSION, "kind": "chat", "tokenizer": tok,
                    "sources": sources, "content_hash": mf.content_hash(tok, sources)}  # fmt: skip
        mf.publish(tmp, dataset, manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def reward_model(backend, name: str, recipe, run):
    """The reward model `name` (an earlier stage or a checkpoint), loaded; ConfigError for an LM."""
    from orchestration.core.checkpoint import load_spec
    from orchestration.pipeline.online_stage import reward_checkpoint

    path = reward_checkpoint(name, recipe, run.index, run.directory)
    if load_spec(path).head != "score":
        raise ConfigError(f"{path}: a language model, not a reward model")
    return backend.load(path)


def tokenizer_dir(recipe, run) -> Path:
    """The run's tokenizer: the recipe's path, else the one the runner trained into RUN_DIR."""
    return Path(recipe.run.tokenizer.path or run.directory.parent.parent / "tokenizer")


def run_tokenizer(recipe, run):
    from tokenizer.bbpe import BBPETokenizer

    return BBPETokenizer.load(tokenizer_dir(recipe, run))


def prepare_rejection(run, recipe, init_from: str | None) -> list:
    """Make (or find) the kept conversations and start the stage's loader on them."""
    from orchestration.data.loader import MixtureConfig, MixtureLoader, SourceWeight

    if run.world > 1:
        raise ConfigError(f"{run.name}: rejection-sft samples in the stage's own process; give it workers = 1")
    out = run.directory / KEPT_DIR
    if not (out / "manifest.json").is_file():
        if run.state.step:
            raise DataError(f"{out}: missing, but the stage resumes at step {run.state.step}; remove {run.directory}")
        policy = init_from or (run.stage.start if run.stage.start != "init" else "a fresh init")
        sample_and_keep(run, run.stage.rejection, recipe, out, str(policy))
    kept = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    if not kept["kept"]:
        raise DataError(f"{run.name}: no answer kept of {kept['prompts']} prompts ({kept['dropped']})")
    mixture = MixtureConfig((SourceWeight(str(out / "dataset")),), split_documents=False)
    run.loader.start(MixtureLoader(mixture, run.loader.seq_len, run.loader.batch_rows, run.loader.seed))
    run.notes.append(f"kept {kept['kept']} of {kept['prompts']} prompts' best answers "
                     f"(dropped: {kept['dropped'] or 'none'})")  # fmt: skip
    return []
