"""Stage kinds: what a `[[stage]]`'s `kind` means (STYLE rule 8: a registry from name to parts).

    kind      loss       its sources' formats   rows
    pretrain  causal_lm  text, chat             documents packed back to back, split across rows
    sft       sft        chat                   whole conversations, padded (loss on assistant turns)
    dpo       dpo        preference             one (chosen, rejected) pair per row, padded
    ipo       ipo        preference             the same; IPO's squared, length-averaged objective
    simper    simper     preference             the same; SimPER (no reference model)
    reward    reward     preference             the same, each answer whole; a reward model (score head)
    distill   afm, soft  text, chat             packed as pretrain, each batch with a teacher's top-k
    grpo      grpo       chat (prompts)         the policy's own answers, whole groups per step

A kind names the backend loss it trains with, the dataset formats its `[stage.data]` sources may
have (orchestration/data/manifest.py's DATASET_FORMATS), whether its rows hold whole documents, and
the function that builds its loader. The recipe checks (stage_config.py, recipe_checks.py),
`run_stage` (stage.py) and the recipe plan read this registry, never a list of names.

A new kind is: a loss in each backend (`register_loss` in cuda_model/losses.py and
mlx_model/losses.py), a dataset format for its data (DATASET_FORMATS and the preparation that writes
it), one `register_kind(StageKind(...))` line, and tests. A kind whose rows are not the mixture's
(pairs, prompt groups) brings its own `loader` function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from hanyeong.errors import ConfigError
from orchestration.core.batch import Batch
from orchestration.core.spec import HEADS
from orchestration.data.manifest import DATASET_FORMATS


class Loader(Protocol):
    """What a stage's loop and its callbacks use of a loader (orchestration/data/loader.py's
    MixtureLoader is one)."""

    seq_len: int
    """Tokens per row of the next batch; the Ramps callback sets it before each step."""
    batch_rows: int
    """Rows of the next batch; the Ramps callback sets it before each step."""
    sources: list[Any]
    """What it reads, each with `key` (a name) and `tokens` (every token id: the vocabulary check)."""

    def next_batch(self) -> Batch: ...

    def state(self) -> dict:
        """The cursor, JSON-serialisable: trainer_state.json's data_cursor."""
        ...

    def load_state(self, state: dict) -> None:
        """Resume at a cursor from state()."""
        ...

    # optional: `metrics() -> dict` of numbers about the batch just drawn, added to the step's
    # metrics line (grpo: the sampled answers' rewards, lengths and zero-variance groups)
    # optional: `rows_of`, set by run_stage to (rank, world): next_batch then returns only the rows
    # rank_rows would keep of the global batch (MixtureLoader: and reads only their tokens)


def mixture_loader(mixture, seq_len: int, rows: int, seed: int) -> Loader:
    """The weighted mixture of prepared datasets (orchestration/data/loader.py), packed or whole
    per row as `mixture.split_documents` says."""
    from orchestration.data.loader import MixtureLoader

    return MixtureLoader(mixture, seq_len, rows, seed)


@dataclass(frozen=True)
class StageKind:
    """One kind of training stage."""

    name: str
    """What a `[[stage]]`'s `kind` says: 'pretrain', 'sft', ..."""
    loss: str
    """The backend loss it trains with, registered in both backends (`register_loss`)."""
    formats: tuple[str, ...]
    """Dataset formats its `[stage.data]` sources may have (replay may read any)."""
    whole_documents: bool
    """Rows hold whole documents (conversations), padded, never split across rows: its stages'
    `data.split_documents` defaults to false and may not be true. False: documents are packed."""
    loader: Callable[..., Loader] = mixture_loader
    """`loader(mixture, seq_len, rows, seed)`: the stage's loader, its mixture's datasets given as
    directories."""
    tables: tuple[str, ...] = ()
    """Optional `[stage.<table>]` tables of its own that its stages may set (e.g. 'preference')."""
    head: str = "lm"
    """The head of the model its stages train (ModelSpec.head): 'lm', or 'score' (a reward model).
    A stage starting from a model with the other head gets it converted (orchestration/pipeline/
    stage.py start_model: an LM gets a fresh score head), or refused (a reward model cannot
    become a language model)."""
    sequences_per_row: int = 1
    """Sequences a row of its batches puts through the model: 2 for kinds whose rows are preference
    pairs (the chosen and the rejected answer, one forward over both); the plan costs that many."""
    prepare: Callable[..., list | None] | None = None
    """`prepare(run, recipe, init_from)`, called by run_stage once the model and loader are ready and
    before the first step: what the kind computes up front (preference kinds: the reference
    model's log-probs, the per-row settings, the held-back pairs' scores); returns the callbacks
    (orchestration/pipeline/stage_callbacks.py) it adds to the stage's loop, or None."""


KINDS: dict[str, StageKind] = {}


def register_kind(kind: StageKind) -> None:
    """Make `kind` what `kind = "<kind.name>"` means in a recipe; replaces a kind of that name."""
    unknown = sorted(set(kind.formats) - set(DATASET_FORMATS))
    if not kind.formats or unknown:
        known = ", ".join(DATASET_FORMATS)
        raise ConfigError(
            f"stage kind {kind.name!r}: formats must be some of {known}, got {list(kind.formats)}"
        )
    if kind.head not in HEADS:
        raise ConfigError(f"stage kind {kind.name!r}: head must be one of {', '.join(HEADS)}, "
                          f"got {kind.head!r}")  # fmt: skip
    KINDS[kind.name] = kind


def get_kind(name: str) -> StageKind:
    """The kind called `name`; an unknown name is a ConfigError listing the known ones."""
    try:
        return KINDS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"kind must be one of {', '.join(KINDS)}, got {name!r}") from None


register_kind(
    StageKind("pretrain", loss="causal_lm", formats=("text", "chat"), whole_documents=False)
)
register_kind(StageKind("sft", loss="sft", formats=("chat",), whole_documents=True))


def pair_loader(mixture, seq_len: int, rows: int, seed: int) -> Loader:
    """Whole preference pairs, one per row (orchestration/data/pair_loader.py)."""
    from orchestration.data.pair_loader import PairLoader

    return PairLoader(mixture, seq_len, rows, seed)


def prepare_pairs(run, recipe, init_from: str | None) -> list:
    """The reference log-probs, per-row settings and held-back pairs
    (orchestration/pipeline/preference_stage.py)."""
    from orchestration.pipeline.preference_stage import prepare_pairs as prepare

    return prepare(run, recipe, init_from)


for _name in ("dpo", "ipo", "simper"):  # [stage.preference] sets beta, label_smoothing, sft_weight
    register_kind(StageKind(_name, loss=_name, formats=("preference",), whole_documents=True,
                            loader=pair_loader, tables=("preference",), prepare=prepare_pairs,
                            sequences_per_row=2))  # fmt: skip


def reward_loader(mixture, seq_len: int, rows: int, seed: int) -> Loader:
    """Whole preference pairs as a reward model scores them (orchestration/pipeline/reward_stage.py)."""
    from orchestration.pipeline.reward_stage import RewardLoader

    return RewardLoader(mixture, seq_len, rows, seed)


def prepare_rewards(run, recipe, init_from: str | None) -> list:
    """The held-back pairs and per-row settings of a reward stage (orchestration/pipeline/reward_stage.py)."""
    from orchestration.pipeline.reward_stage import prepare_rewards as prepare

    return prepare(run, recipe, init_from)


# [stage.reward] sets center_rewards_coefficient and held_out
register_kind(StageKind("reward", loss="reward", formats=("preference",), whole_documents=True,
                        loader=reward_loader, tables=("reward",), head="score", prepare=prepare_rewards,
                        sequences_per_row=2))  # fmt: skip


def online_loader(mixture, seq_len: int, rows: int, seed: int) -> Loader:
    """Pairs the policy samples round by round from chat prompts (orchestration/pipeline/online_stage.py)."""
    from orchestration.pipeline.online_stage import OnlineLoader

    return OnlineLoader(mixture, seq_len, rows, seed)


def prepare_online(run, recipe, init_from: str | None) -> list:
    """The reference, the reward model and the held-back prompts of an online-dpo stage."""
    from orchestration.pipeline.online_stage import prepare_online as prepare

    return prepare(run, recipe, init_from)


# [stage.online] (required) names the reward model and how each round samples
register_kind(StageKind("online-dpo", loss="dpo", formats=("chat",), whole_documents=True,
                        loader=online_loader, tables=("online",), prepare=prepare_online, sequences_per_row=2))  # fmt: skip


def prepare_distill(run, recipe, init_from: str | None) -> list:
    """The teacher's top-k for every batch: cached or live (orchestration/pipeline/distill_stage.py)."""
    from orchestration.pipeline.distill_stage import prepare_distill as prepare

    return prepare(run, recipe, init_from)


# [stage.distill] names the teacher and the objective: its `objective` is the loss ('afm' the default)
register_kind(StageKind("distill", loss="afm", formats=("text", "chat"), whole_documents=False,
                        tables=("distill",), prepare=prepare_distill))  # fmt: skip


def rejection_loader(mixture, seq_len: int, rows: int, seed: int) -> Loader:
    """Chat prompts until the kept answers are made, then those (orchestration/pipeline/rejection_stage.py)."""
    from orchestration.pipeline.rejection_stage import DeferredLoader

    return DeferredLoader(mixture, seq_len, rows, seed)


def prepare_rejection(run, recipe, init_from: str | None) -> list:
    """Sample, score and keep the best answers before the first step (rejection_stage.py)."""
    from orchestration.pipeline.rejection_stage import prepare_rejection as prepare

    return prepare(run, recipe, init_from)


# [stage.rejection] (required) names the reward model(s) and how many answers are sampled
register_kind(StageKind("rejection-sft", loss="sft", formats=("chat",), whole_documents=True,
                        loader=rejection_loader, tables=("rejection",), prepare=prepare_rejection))  # fmt: skip


def grpo_loader(mixture, seq_len: int, rows: int, seed: int) -> Loader:
    """The policy's own answers to chat prompts, generation by generation (orchestration/pipeline/grpo_stage.py)."""
    from orchestration.pipeline.grpo_stage import GrpoLoader

    return GrpoLoader(mixture, seq_len, rows, seed)


def prepare_grpo(run, recipe, init_from: str | None) -> list:
    """The sampler, the reference (beta > 0) and the held-back prompts of a grpo stage."""
    from orchestration.pipeline.grpo_stage import prepare_grpo as prepare

    return prepare(run, recipe, init_from)


# [stage.grpo] (optional: its defaults) names the reward functions and how each generation is made
register_kind(StageKind("grpo", loss="grpo", formats=("chat",), whole_documents=True,
                        loader=grpo_loader, tables=("grpo",), prepare=prepare_grpo))  # fmt: skip
