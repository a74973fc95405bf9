"""What a distillation stage (kind `distill`) adds to run_stage: its `[stage.distill]` settings, the
teacher, and a loader that gives every batch the teacher's top-k.

    [stage.distill]
    teacher = "teacher"         # an earlier stage's name, or a checkpoint directory
    objective = "soft"          # 'afm' (AFM) or 'soft' (Gemma 2)
    temperature = 2.0           # soft only
    top_k = 32                  # soft only
    mix = 0.1                   # the ordinary next-token loss's share

OBJECTIVES (cuda_model/losses.py, mlx_model/losses.py). `afm`: cross-entropy against
w · one-hot(the teacher's top-1) + (1 − w) · one-hot(the true next token), w = `weight` (0.9, as
Apple's AFM pre-trained its on-device model). `soft`: cross-entropy to the teacher's next-token
distribution at a temperature (Gemma 2 trains its small models on the teacher's probabilities),
kept to its top_k ids with the rest of its mass renormalised away, times the temperature squared.
Either is mixed with the ordinary loss: (1 − mix) · distillation + mix · cross-entropy. The rows
are the pretraining ones (packed documents, segment ids, loss mask); the teacher sees the same rows
with the same segment ids.

THE TEACHER: any checkpoint of the same tokenizer (vocab_size), any shape. `teacher_run = "cached"`
(default): its top-k is computed once for every batch the stage will draw and stored under
STAGE_DIR/teacher/ (orchestration/pipeline/teacher_cache.py: exact, keyed by the teacher and the
data, computed again when either changed), then read back per batch; no teacher sits in memory
while the student trains. `"live"`: the teacher stays loaded beside the student and runs on each
global batch as it is drawn (twice the weights' memory, no storage). Both give the same losses.

RESUME. STAGE_DIR/distill.json records the teacher a stage started with; a stage resumed with
another teacher (its stage re-run, its checkpoint replaced) is refused rather than trained on two.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hanyeong.errors import CheckpointError, ConfigError
from orchestration.core.batch import Batch
from orchestration.core.config import positive_int

OBJECTIVES = ("afm", "soft")
TEACHER_RUNS = ("cached", "live")
AFM_WEIGHT, TEMPERATURE, TOP_K = 0.9, 1.0, 32  # the defaults of weight, temperature, top_k
TEACHER_FILE = "distill.json"
CACHE_WAIT_S = 6 * 3600.0  # how long the other ranks wait for rank 0's teacher cache


@dataclass(frozen=True)
class DistillSettings:
    """`[stage.distill]`: the teacher and the objective of a distillation stage (kind distill)."""

    teacher: str
    """An earlier stage's name (its final checkpoint), or a checkpoint directory: any preset of the
    same vocabulary."""
    objective: str = "afm"
    """'afm' (w · teacher top-1 + (1 − w) · true token, one-hot targets) or 'soft' (the
    teacher's distribution at a temperature)."""
    weight: float | None = None
    """afm: w, the teacher's top-1 share of the target; None: 0.9 (AFM). Not for soft."""
    temperature: float | None = None
    """soft: the temperature of the teacher's and the student's distributions; None: 1.0. Not
    for afm."""
    top_k: int | None = None
    """soft: the teacher's ids kept per position (the rest of its mass renormalised away); None: 32.
    afm reads the top-1 alone (1 is stored). Not for afm."""
    mix: float = 0.0
    """The ordinary next-token loss's share: (1 − mix) · distillation + mix · cross-entropy, in
    [0, 1)."""
    teacher_run: str = "cached"
    """'cached': the teacher's top-k computed once for the stage's batches and stored (Ray tasks on
    a CPU cluster); 'live': the teacher loaded beside the student, run on each batch."""
    tasks: int = 4
    """Ray tasks that compute the cache when the stage runs on a CPU Ray worker."""

    def __post_init__(self) -> None:
        if not isinstance(self.teacher, str) or not self.teacher:
            raise ConfigError(f"teacher must be a stage name or a checkpoint, got {self.teacher!r}")
        for name, known in (("objective", OBJECTIVES), ("teacher_run", TEACHER_RUNS)):
            if getattr(self, name) not in known:
                raise ConfigError(f"{name} must be one of {', '.join(known)}, got {getattr(self, name)!r}")
        if not 0.0 <= self.mix < 1.0:
            raise ConfigError(f"mix must be in [0, 1), got {self.mix!r}")
        positive_int(self.tasks, "tasks")
        mine = ("weight",) if self.objective == "afm" else ("temperature", "top_k")
        for name in ("weight", "temperature", "top_k"):
            if getattr(self, name) is not None and name not in mine:
                raise ConfigError(f"{name} is not a setting of objective {self.objective!r} "
                                  f"(it takes {', '.join(mine)})")  # fmt: skip
        if self.weight is not None and not 0.0 <= self.weight <= 1.0:
            raise ConfigError(f"weight must be in [0, 1], got {self.weight!r}")
        if self.temperature is not None and not 0.0 < self.temperature < math.inf:
            raise ConfigError(f"temperature must be > 0, got {self.temperature!r}")
        if self.top_k is not None:
            positive_int(self.top_k, "top_k")

    @property
    def k(self) -> int:
        """The teacher ids stored per position: top_k for soft, 1 for afm."""
        return 1 if self.objective == "afm" else self.top_k or TOP_K

    def per_row(self) -> dict[str, float]:
        """The values each batch row carries for its loss (cuda_model/losses.py's layout)."""
        if self.objective == "afm":
            out = {"afm_weight": AFM_WEIGHT if self.weight is None else self.weight}
        else:
            out = {"temperature": TEMPERATURE if self.temperature is None else self.temperature}
        return out | ({"mix": self.mix} if self.mix else {})


# ---- the loader -------------------------------------------------------------------------------


class DistillLoader:
    """The Loader protocol (orchestration/pipeline/kinds.py) over the stage's MixtureLoader: the
    same batches, each with the teacher's top-k (`teacher(batch) -> (ids, logprobs)`) and the
    per-row settings as extras. Shapes, sources and the cursor are the inner loader's."""

    def __init__(self, inner, teacher, settings: dict[str, float]):
        self.inner, self.teacher, self.settings = inner, teacher, settings

    @property
    def seq_len(self) -> int:
        return self.inner.seq_len

    @seq_len.setter
    def seq_len(self, value: int) -> None:  # the Ramps callback sets each step's shape
        self.inner.seq_len = value

    @property
    def batch_rows(self) -> int:
        return self.inner.batch_rows

    @batch_rows.setter
    def batch_rows(self, value: int) -> None:
        self.inner.batch_rows = value

    @property
    def sources(self) -> list:
        return self.inner.sources

    def next_batch(self) -> Batch:
        batch = self.inner.next_batch()
        ids, logprobs = self.teacher(batch)
        B = batch.rows
        extras = {**batch.extras, "teacher_ids": ids, "teacher_logprobs": logprobs}
        extras |= {k: np.full(B, v, np.float32) for k, v in self.settings.items()}
        return Batch(batch.inputs, batch.targets, batch.loss_mask, batch.segment_ids, extras)

    def state(self) -> dict:
        return self.inner.state()

    def load_state(self, state: dict) -> None:
        self.inner.load_state(state)


class LiveTeacher:
    """The teacher model itself, run on each batch (teacher_cache.teacher_topk)."""

    def __init__(self, backend, model, k: int):
        self.backend, self.model, self.k = backend, model, k

    def __call__(self, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        from orchestration.pipeline.teacher_cache import teacher_topk

        return teacher_topk(self.backend, self.model, batch, self.k)


# ---- the stage --------------------------------------------------------------------------------


def teacher_path(recipe, index: int, stage_dir: Path) -> Path:
    """The teacher's checkpoint: an earlier stage's (beside this stage's folder, as the runner lays
    them out), or the directory `teacher` names."""
    from orchestration.core import checkpoint
    from orchestration.pipeline.run_manifest import stage_dir_name
    from orchestration.pipeline.stage import CHECKPOINT
    from orchestration.pipeline.stage_config import stage_label

    teacher = recipe.stage[index].distill.teacher
    names = [s.name for s in recipe.stage[:index]]
    if teacher not in names:
        return Path(teacher)
    j = names.index(teacher)
    path = Path(stage_dir).parent / Path(stage_dir_name(j, teacher)).name / CHECKPOINT
    if not (path / checkpoint.INDEX_FILE).is_file():
        raise CheckpointError(f"{stage_label(index, recipe.stage[index].name)}: its teacher, "
                              f"{stage_label(j, teacher)}, has no checkpoint at {path}; run that stage first")  # fmt: skip
    return path


def check_teacher(run, key: str) -> None:
    """Record the teacher at step 0; refuse to resume with another (STAGE_DIR/distill.json)."""
    from hanyeong.files import write_atomic

    path = run.directory / TEACHER_FILE
    if run.state.step == 0:
        if run.main:
            write_atomic(path, json.dumps({"teacher": key}) + "\n")
        return
    try:
        saved = json.loads(path.read_text(encoding="utf-8")).get("teacher")
    except (OSError, ValueError, AttributeError):
        saved = None
    if saved != key:
        raise CheckpointError(f"{run.directory}: this stage started with another teacher "
                              f"({str(saved)[:12]}, now {key[:12]}); remove the directory to "
                              "distill from the new one")  # fmt: skip


def prepare_distill(run, recipe, init_from: str | None) -> list:
    """Wrap the stage's loader in a DistillLoader whose teacher is the cache (computed here when it
    is missing) or the live model. Returns no callbacks."""
    from orchestration.pipeline.teacher_cache import teacher_hash

    settings = run.stage.distill
    path = teacher_path(recipe, run.index, run.directory)
    check_vocabulary(run, path)
    key = teacher_hash(path)
    check_teacher(run, key)
    if settings.teacher_run == "live":
        teacher = LiveTeacher(run.backend, run.backend.load(path), settings.k)
    else:
        teacher = cached_teacher(run, path, key, settings)
    run.loader = DistillLoader(run.loader, teacher, settings.per_row())
    return []


def check_vocabulary(run, path: Path) -> None:
    from orchestration.core import checkpoint
    from orchestration.pipeline.stage_config import stage_label

    spec, vocab = checkpoint.load_spec(path), run.state.model.spec.vocab_size
    if spec.vocab_size != vocab or spec.head != "lm":
        raise ConfigError(f"{stage_label(run.index, run.name)}: distill.teacher at {path} is a "
                          f"{spec.head!r} model of vocab_size {spec.vocab_size:,}; the student is "
                          f"a language model of {vocab:,}")  # fmt: skip


def cached_teacher(run, path: Path, teacher_key: str, settings: DistillSettings):
    """The stage's TeacherCache: read from STAGE_DIR/teacher/<key>/, or computed (rank 0; the other
    ranks wait for its index)."""
    from orchestration.pipeline.stage import wait_for
    from orchestration.pipeline import teacher_cache as tc

    stage, inner = run.stage, run.loader
    steps = [(seq_len, rows) for n, seq_len, rows in stage.plan() for _ in range(n)]
    key = tc.cache_key(teacher_key, inner.mixture, inner.seed, steps, settings.k, run.backend.name)
    directory = run.directory / tc.CACHE_DIR
    index = directory / key[:32] / tc.INDEX
    if not index.is_file() and not run.main:  # rank 0 computes it; the others read what it wrote
        wait_for(index, CACHE_WAIT_S)
    if index.is_file():
        return tc.TeacherCache(index.parent)
    # Ray tasks on a CPU worker; a GPU or an MLX device computes it in this process
    use_ray = tc.ray_can_run_it() and not run.backend.capabilities.device_required
    common = {"teacher": str(path), "mixture": inner.mixture, "seed": inner.seed, "k": settings.k,
              "backend": run.backend.name, "device": "cpu" if use_ray else None}  # fmt: skip
    if not use_ray:  # the teacher loaded once, on the stage's device
        common |= {"backend_object": run.backend, "model": run.backend.load(path)}
    jobs = tc.shard_jobs(inner.mixture, inner.seed, steps, settings.tasks if use_ray else 1, common)
    return tc.TeacherCache(tc.build_cache(directory, key, jobs, use_ray))
