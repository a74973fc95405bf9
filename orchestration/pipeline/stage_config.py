"""`[[stage]]` of a recipe: what one training stage reads, for how many tokens, in which shapes.

THE TOKEN BUDGET. `token_budget` counts the positions a stage trains on: every step takes
rows × seq_len tokens (padding included for SFT, as the backends' `tokens_seen` counts them), with
rows = batch_tokens // seq_len. The step starting at `tokens` uses the seq_len and batch_tokens of
the last ramp entry with `after_tokens <= tokens` (a step is never split, so a ramp takes effect at
the first step starting at or past its point). The last step takes only the rows the budget has
left, so a stage ends on its budget exactly; that remainder must be a whole number of rows, which
`plan()` checks when the recipe is loaded (a budget that is a multiple of every seq_len in use and
of the final batch always is). The LR schedule spans exactly the stage's steps: `[stage.optim]`
leaves total_steps out and `train_optim` is the optimizer config with it filled in.

NUMBERING. Messages name a stage as `pipeline status` and the stage folders do, from 1 and with its
name: `stage 1 'stage1-general'` (`stage_label`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

from hanyeong.errors import ConfigError
from orchestration.core.config import build, positive_int, to_table
from orchestration.core.optim import OptimConfig
from orchestration.core.merge import MergeSettings
from orchestration.core.parallel import PARALLELISMS
from orchestration.data.loader import MixtureConfig
from orchestration.pipeline.distill_stage import DistillSettings
from orchestration.pipeline.kinds import KINDS, StageKind, get_kind, mixture_loader
from orchestration.pipeline.preference_stage import PreferenceSettings
from orchestration.pipeline.grpo_stage import GrpoSettings
from orchestration.pipeline.online_stage import OnlineSettings
from orchestration.pipeline.rejection_stage import RejectionSettings
from orchestration.pipeline.reward_stage import RewardSettings
from orchestration.pipeline.stage_eval import StageEvalConfig

STARTS = ("init", "previous")  # anything else is a checkpoint path
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def stage_label(index: int, name: object = None) -> str:
    """How messages name stage `index` (0-based): "stage 1 'stage1-general'", 1-based as the stage
    folders (01-...) and `pipeline status`; without a usable name, "stage 1"."""
    return f"stage {index + 1} {name!r}" if isinstance(name, str) and name else f"stage {index + 1}"


# ---- ramps ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeqLenStep:
    """`[[stage.seq_len_ramp]]`: from the first step starting at or past after_tokens, a new seq_len."""

    after_tokens: int
    """Tokens of the stage trained before the change."""
    seq_len: int
    """Tokens per row from then on (Llama 3.1: 4,096 -> 8,192 after 252M tokens)."""

    def __post_init__(self) -> None:
        positive_int(self.after_tokens, "after_tokens")
        positive_int(self.seq_len, "seq_len")


@dataclass(frozen=True)
class BatchStep:
    """`[[stage.batch_ramp]]`: from the first step starting at or past after_tokens, a new batch."""

    after_tokens: int
    """Tokens of the stage trained before the change."""
    batch_tokens: int
    """Tokens per optimizer step from then on (Llama 3.1 doubled it twice)."""

    def __post_init__(self) -> None:
        positive_int(self.after_tokens, "after_tokens")
        positive_int(self.batch_tokens, "batch_tokens")


@dataclass(frozen=True)
class StageResources:
    """`[stage.resources]`: what each worker of the stage asks Ray for (defaults: the runner's
    choice: one GPU per worker on a GPU cluster, the node's CPUs on a CPU one, an `apple_silicon`
    slot for MLX)."""

    cpus: float | None = None
    """CPUs per worker (torch on CPUs: its thread count)."""
    gpus: float | None = None
    """GPUs per worker (torch only)."""

    def __post_init__(self) -> None:
        for name in ("cpus", "gpus"):
            value = getattr(self, name)
            if value is not None and not 0 < value < math.inf:
                raise ConfigError(f"{name} must be a positive number, got {value!r}")

    def to_dict(self) -> dict:
        return to_table(self)


# ---- the stage ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageConfig:
    """`[[stage]]`: one training stage of a recipe."""

    name: str
    """Names the stage's directory and its log lines (letters, digits, '.', '_', '-')."""
    token_budget: int
    """Tokens the stage trains on, exactly (rows × seq_len summed over its steps; see above)."""
    seq_len: int
    """Tokens per row at the start (seq_len_ramp changes it)."""
    batch_tokens: int
    """Tokens per optimizer step at the start, a multiple of seq_len (batch_ramp changes it)."""
    data: MixtureConfig
    """`[stage.data]`: the mixture; each `dataset` names a [[run.datasets]] entry."""
    kind: str = "pretrain"
    """A registered stage kind (orchestration/pipeline/kinds.py): 'pretrain' (causal LM on every
    token) or 'sft' (loss on assistant tokens of chat data), ..."""
    start: str = "previous"
    """'init' (fresh weights of run.preset / run.init_checkpoint), 'previous' (the stage before's
    final checkpoint) or a checkpoint directory."""
    checkpoint_every_tokens: int | None = None
    """Write the resumable checkpoint after the first step at or past every multiple of this many
    tokens; it is always written at the end. None: only at the end."""
    rope_theta: float | None = None
    """Override the model's RoPE base from this stage on (long-context stage)."""
    max_seq_len: int | None = None
    """Override the model's max_seq_len from this stage on (long-context stage)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """`[stage.optim]`: OptimConfig without total_steps, which the stage derives from its budget
    (`train_optim`)."""
    seq_len_ramp: tuple[SeqLenStep, ...] = ()
    """`[[stage.seq_len_ramp]]`, in increasing after_tokens."""
    batch_ramp: tuple[BatchStep, ...] = ()
    """`[[stage.batch_ramp]]`, in increasing after_tokens."""
    workers: int = 1
    """Data-parallel workers (ranks): each trains on its share of every step's rows, so the same
    global batch gives the same update with any count (torch: Ray Train; MLX: mx.distributed ring)."""
    parallelism: str = "auto"
    """'ddp' (weights replicated), 'fsdp' (torch: weights, gradients and AdamW sharded, FSDP2) or
    'auto' (fsdp from 1B parameters on torch, ddp otherwise)."""
    resources: StageResources = field(default_factory=StageResources)
    """`[stage.resources]`: CPUs / GPUs per worker."""
    activation_checkpointing: bool | None = None
    """Recompute each transformer block's activations in the backward pass (both backends): the
    same losses, gradients and weights, for activation memory of a block's input per block instead
    of all its activations, at about a third more compute. None: the run preset's default
    (orchestration/core/presets.py `activation_checkpointing`). `hanyeong model plan` costs it.
    Not part of the stage's identity: a stage resumes with it switched on or off."""
    carry_optimizer: bool = False
    """Start with the AdamW moments of the checkpoint the stage starts from (the previous stage's,
    same parameters) and their step count, instead of fresh ones; the LR schedule is still the
    stage's own (its warmup_steps, default 0, and decay). Off by default: every stage starts
    with fresh moments, as the EXAONE recipe's stages do."""
    preference: PreferenceSettings | None = None
    """`[stage.preference]`: beta, label_smoothing, sft_weight of the preference kinds (dpo, ipo,
    simper); None: their defaults. Left out of other stages' tables, so their identities stay."""
    reward: RewardSettings | None = None
    """`[stage.reward]`: center_rewards_coefficient and held_out of a reward stage; None: their
    defaults. Left out of other stages' tables."""
    online: OnlineSettings | None = None
    """`[stage.online]`: the reward model and the rounds of an online-dpo stage (required there)."""
    rejection: RejectionSettings | None = None
    """`[stage.rejection]`: the reward model(s) and sampling of a rejection-sft stage (required there)."""
    grpo: GrpoSettings | None = None
    """`[stage.grpo]`: rewards, groups, clipping and aggregation of a grpo stage (None: its defaults;
    orchestration/pipeline/grpo_stage.py). Left out of other stages' tables."""
    eval: StageEvalConfig | None = None
    """`[stage.eval]`: validation loss and benchmark tasks every N tokens and at the end
    (orchestration/pipeline/stage_eval.py); None: no evaluation. Not part of the stage's identity,
    except through the documents it holds out of training (data.hold_out)."""
    distill: DistillSettings | None = None
    """`[stage.distill]`: the teacher and objective of a distill stage (required there, refused
    elsewhere; orchestration/pipeline/distill_stage.py)."""
    data_seed: int | None = None
    """Seeds the stage's data order; None: run.seed + the stage's index (0-based). Two stages with
    the same data_seed, data and shapes draw the same rows (a distilled student and its baseline)."""
    merge: MergeSettings | None = None
    """`[stage.merge]`: start from a merge of earlier stages (WARP: SLERP of their task vectors
    from this stage's start, then LITI toward it; orchestration/core/merge.py); None: the start
    as it is."""
    upscale: str | None = None
    """Depth up-scaling (SOLAR) of the start checkpoint before the stage trains: half-open ranges of
    its layers, stacked in order ("0:24,8:32" is SOLAR's 32 -> 48; orchestration/core/upscale.py).
    None: the start as it is."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not NAME.match(self.name):
            raise ConfigError(f"name must be letters, digits, '.', '_' or '-', got {self.name!r}")
        kind = get_kind(self.kind)
        if not self.start:
            raise ConfigError("start must be 'init', 'previous' or a checkpoint directory")
        for name in ("token_budget", "seq_len", "batch_tokens", "workers"):
            positive_int(getattr(self, name), name)
        if self.data_seed is not None and (isinstance(self.data_seed, bool) or self.data_seed < 0):
            raise ConfigError(f"data_seed must be an integer >= 0, got {self.data_seed!r}")
        for name in ("checkpoint_every_tokens", "max_seq_len"):
            if getattr(self, name) is not None:
                positive_int(getattr(self, name), name)
        if self.rope_theta is not None and not 1.0 < self.rope_theta < math.inf:
            raise ConfigError(f"rope_theta must be a number > 1, got {self.rope_theta!r}")
        for ramp in ("seq_len_ramp", "batch_ramp"):
            points = [step.after_tokens for step in getattr(self, ramp)]
            if points != sorted(set(points)) or (points and points[-1] >= self.token_budget):
                raise ConfigError(f"{ramp}: after_tokens must increase and stay below token_budget "
                                  f"({self.token_budget:,}), got {points}")  # fmt: skip
        if self.parallelism not in PARALLELISMS:
            raise ConfigError(f"parallelism must be one of {', '.join(PARALLELISMS)}, got {self.parallelism!r}")
        if self.preference is not None and "preference" not in kind.tables:
            takes = [k.name for k in KINDS.values() if "preference" in k.tables]
            raise ConfigError(f"preference: [stage.preference] is for kinds {', '.join(takes)}, not "
                              f"{kind.name!r}")  # fmt: skip
        if self.grpo is not None and "grpo" not in kind.tables:
            raise ConfigError(f"grpo: [stage.grpo] is for kind grpo, not {kind.name!r}")
        if self.reward is not None and "reward" not in kind.tables:
            takes = [k.name for k in KINDS.values() if "reward" in k.tables]
            raise ConfigError(f"reward: [stage.reward] is for kinds {', '.join(takes)}, not {kind.name!r}")
        for table, owner in (("online", "online-dpo"), ("rejection", "rejection-sft")):
            if (getattr(self, table) is not None) != (table in kind.tables):
                if getattr(self, table) is None:
                    raise ConfigError(f"{table}: a {kind.name!r} stage needs [stage.{table}] with its reward model")
                raise ConfigError(f"{table}: [stage.{table}] is for kind {owner}, not {kind.name!r}")
        self._check_distill(kind)
        self._check_upscale()
        self._check_carry()
        if kind.head != "lm" and self.eval is not None and self.eval.tasks:
            raise ConfigError(f"eval.tasks: benchmark tasks score a language model; a {kind.name!r} stage trains a "
                              "reward model (its held-back pairs are scored instead)")  # fmt: skip
        self._resolve_hold_out(kind)
        if kind.whole_documents and self.data.split_documents:
            raise ConfigError(f"data.split_documents must be false for kind {kind.name!r}: its rows "
                              "hold whole documents")  # fmt: skip
        if self.optim.total_steps is not None:
            raise ConfigError(
                "optim.total_steps is derived from token_budget and batch_tokens; remove it"
            )
        total = self.total_steps  # plan(): the budget is reachable in whole rows
        if self.optim.warmup_steps > total:
            raise ConfigError(f"optim.warmup_steps ({self.optim.warmup_steps:,}) exceeds the stage's "
                              f"{total:,} steps (derived from token_budget and batch_tokens)")  # fmt: skip

    def _check_distill(self, kind: StageKind) -> None:
        if self.distill is not None and "distill" not in kind.tables:
            takes = [k.name for k in KINDS.values() if "distill" in k.tables]
            raise ConfigError(f"distill: [stage.distill] is for kinds {', '.join(takes)}, not {kind.name!r}")
        if self.distill is None and "distill" in kind.tables:
            raise ConfigError(f"distill: a {kind.name!r} stage needs [stage.distill] with its teacher")

    def _check_carry(self) -> None:
        """carry_optimizer needs moments that belong to the weights the stage starts from."""
        if not self.carry_optimizer:
            return
        if self.start == "init":
            raise ConfigError("carry_optimizer: a stage that starts from 'init' has no AdamW moments to carry on")
        for name in ("merge", "upscale"):
            if getattr(self, name) is not None:
                raise ConfigError(f"carry_optimizer: the {name}d start's weights are not those its moments "
                                  "belong to; drop one of the two")  # fmt: skip

    def _check_upscale(self) -> None:
        """The ranges' syntax here; against the start's layers in recipe_checks.stage_specs."""
        from orchestration.core.upscale import parse_layers

        if self.upscale is None:
            return
        try:
            parse_layers(self.upscale, 1 << 30)
        except ConfigError as err:
            raise ConfigError(f"upscale: {str(err).removeprefix('layers: ')}") from None

    def _resolve_hold_out(self, kind: StageKind) -> None:
        """data.hold_out left out: the documents [stage.eval] scores are held out of training."""
        documents = kind.loader is mixture_loader  # preference kinds hold back pairs instead
        if self.data.hold_out is None:
            hold_out = self.eval.documents if self.eval is not None and documents else 0
            object.__setattr__(self, "data", replace(self.data, hold_out=hold_out))
        elif self.data.hold_out and not documents:
            raise ConfigError(f"data.hold_out is for kinds that read documents, not {kind.name!r} (its "
                              "[stage.preference] held_out holds back pairs)")  # fmt: skip

    def recomputes_activations(self, preset: str | None) -> bool:
        """activation_checkpointing as the stage trains with it on a run of `preset`: its own
        setting, else the preset's default (the run's preset, None for an init_checkpoint)."""
        from orchestration.core.presets import activation_checkpointing

        if self.activation_checkpointing is not None:
            return self.activation_checkpointing
        return activation_checkpointing(preset)

    @property
    def stage_kind(self) -> StageKind:
        """What `kind` means: the loss, the formats its sources may have, how rows are built."""
        return get_kind(self.kind)

    @property
    def loss(self) -> str:
        """The backend loss: the kind's, or [stage.distill]'s objective."""
        return self.distill.objective if self.distill is not None else self.stage_kind.loss

    @property
    def train_optim(self) -> OptimConfig:
        """[stage.optim] with total_steps = the stage's steps: what the backend trains with and a
        checkpoint's trainer_state.json records."""
        return replace(self.optim, total_steps=self.total_steps)

    @property
    def seq_lens(self) -> list[int]:
        return [self.seq_len, *(s.seq_len for s in self.seq_len_ramp)]

    def shape_at(self, tokens: int) -> tuple[int, int]:
        """(seq_len, rows) of the step that starts after `tokens` tokens of this stage."""
        seq_len = self.seq_len
        for step in self.seq_len_ramp:
            seq_len = step.seq_len if tokens >= step.after_tokens else seq_len
        batch = self.batch_tokens
        for step in self.batch_ramp:
            batch = step.batch_tokens if tokens >= step.after_tokens else batch
        if batch % seq_len:
            raise ConfigError(f"batch_tokens ({batch:,}) must be a multiple of seq_len ({seq_len:,}) "
                              f"at {tokens:,} tokens")  # fmt: skip
        return seq_len, min(batch, self.token_budget - tokens) // seq_len

    def plan(self) -> list[tuple[int, int, int]]:
        """The stage's steps as runs of (steps, seq_len, rows), in order; ConfigError when the
        budget's last step would not be whole rows or a step has fewer rows than micro-batches."""
        points = sorted({s.after_tokens for s in (*self.seq_len_ramp, *self.batch_ramp)})
        runs, tokens = [], 0
        while tokens < self.token_budget:
            seq_len, rows = self.shape_at(tokens)
            step, left = seq_len * rows, self.token_budget - tokens
            last = step >= left or rows == 0
            if last and left % seq_len:
                raise ConfigError(self._uneven(tokens, seq_len))
            if rows < max(1, self.optim.grad_accum_steps) * self.workers:
                raise ConfigError(f"workers: the step at {tokens:,} tokens has {rows} rows: too few for {self.workers} "
                                  f"worker(s) x optim.grad_accum_steps ({self.optim.grad_accum_steps}) "
                                  "micro-batches of at least one row")  # fmt: skip
            if last:
                runs.append((1, seq_len, rows))
                break
            following = min([p for p in points if p > tokens] + [self.token_budget])
            # steps starting before the next ramp point, but only the full ones the budget allows
            n = min(-(-(following - tokens) // step), left // step)
            runs.append((n, seq_len, rows))
            tokens += n * step
        merged: list[tuple[int, int, int]] = []
        for n, seq_len, rows in runs:
            if merged and merged[-1][1:] == (seq_len, rows):
                merged[-1] = (merged[-1][0] + n, seq_len, rows)
            else:
                merged.append((n, seq_len, rows))
        return merged

    def _uneven(self, tokens: int, seq_len: int) -> str:
        left = self.token_budget - tokens
        lower, upper = tokens + left // seq_len * seq_len, tokens + (left // seq_len + 1) * seq_len
        options = " or ".join(f"{x:,}" for x in (lower, upper) if x > 0)
        return (f"token_budget {self.token_budget:,}: the last step starts at {tokens:,} tokens with "
                f"{left:,} left, not a whole number of rows of seq_len {seq_len:,}; "
                f"try token_budget = {options}")  # fmt: skip

    @property
    def total_steps(self) -> int:
        return sum(n for n, _, _ in self.plan())

    # ---- TOML ----

    @classmethod
    def from_dict(cls, data: dict, where: str = "") -> StageConfig:
        """From a `[[stage]]` table. [stage.data]'s split_documents defaults to what the kind's rows
        hold (false for a kind of whole documents, such as sft)."""
        name = data.get("kind", "pretrain") if isinstance(data, dict) else None
        kind = KINDS.get(name) if isinstance(name, str) else None  # else __post_init__ refuses it
        mixture = data.get("data") if kind is not None else None
        if isinstance(mixture, dict) and "split_documents" not in mixture:
            data = {**data, "data": {**mixture, "split_documents": not kind.whole_documents}}
        return build(cls, data, where)

    def to_dict(self) -> dict:
        """The `[[stage]]` table (None fields left out, so optim has no total_steps)."""
        return to_table(self)
