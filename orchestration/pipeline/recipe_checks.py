"""The checks across a recipe's tables, run when a `Recipe` is built (before anything trains).

Each table checks its own values (orchestration/pipeline/recipe.py, orchestration/pipeline/stage_config.py); these
check what lies between them: stage names, the first stage's start, dataset references and the
formats a stage's kind reads (orchestration/pipeline/kinds.py), the model spec of each stage against
its sequence lengths (after an up-scaling), the vocabulary against the tokenizer, and a distill
stage's teacher against its student. Every message names the key path, a stage's after
"stage 1 'name': ".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hanyeong.errors import CheckpointError, ConfigError
from orchestration.core.spec import ModelSpec
from orchestration.pipeline.stage_config import stage_label

if TYPE_CHECKING:
    from orchestration.pipeline.recipe import Recipe


def check_recipe(recipe: Recipe) -> None:
    """ConfigError naming the key of the first cross-table problem."""
    check_stages(recipe)
    check_datasets(recipe)
    specs = stage_specs(recipe)
    check_vocabulary(recipe, specs)
    check_teachers(recipe, specs)


def check_stages(recipe: Recipe) -> None:
    names = [s.name for s in recipe.stage]
    for i, stage in enumerate(recipe.stage):
        label = stage_label(i, stage.name)
        if stage.name in names[:i]:
            raise ConfigError(f"{label}: name is used twice")
        if stage.start in names[i:]:
            raise ConfigError(f"{label}: start: stage {stage.start!r} is not an earlier stage; a stage starts "
                              "from 'init', 'previous', an earlier stage's name or a checkpoint")  # fmt: skip
        for reward in recipe.reward_models(i):
            if isinstance(reward, str) and reward in names[i:]:
                raise ConfigError(f"{label}: reward: stage {reward!r} is not an earlier stage")
        for merged in stage.merge.stages if stage.merge is not None else ():
            if merged not in names[:i]:
                raise ConfigError(f"{label}: merge.stages: {merged!r} is not an earlier stage")
        if stage.merge is not None and stage.start == "init" and stage.merge.method != "linear":
            raise ConfigError(f"{label}: merge: {stage.merge.method} needs the policies' start as its base; start "
                              "from it (an earlier stage's name, 'previous' or a checkpoint)")  # fmt: skip
        if stage.start == "previous" and i == 0:
            raise ConfigError(
                f"{label}: start: the first stage has no previous stage; use 'init' or a checkpoint"
            )
        if (
            stage.start == "init"
            and recipe.run.preset is None
            and recipe.run.init_checkpoint is None
        ):
            raise ConfigError(f"{label}: start = 'init' needs run.preset or run.init_checkpoint")
        if stage.upscale is not None and stage.start == "init" and recipe.run.init_checkpoint is None:
            raise ConfigError(f"{label}: upscale: a fresh init has nothing to up-scale; start from 'previous' "
                              "or a checkpoint")  # fmt: skip
        if recipe.run.backend != "auto":  # 'auto' is resolved on the cluster: runner.resolve_backend
            check_backend_can_run(recipe.run.backend, stage, label)


def check_backend_can_run(backend: str, stage, where: str) -> None:
    """The stage's parallelism and resources.gpus are ones `backend` declares it supports."""
    from orchestration.core.backends import capabilities
    from orchestration.core.parallel import check_parallelism

    caps = capabilities(backend)
    check_parallelism(stage.parallelism, caps, where)
    if stage.resources.gpus and not caps.takes_gpus:
        raise ConfigError(f"{where}: resources.gpus: backend {backend!r} takes no GPUs (each worker asks "
                          f"for one {caps.device_resource})")  # fmt: skip


def check_datasets(recipe: Recipe) -> None:
    formats = {d.name: d.format for d in recipe.run.datasets}
    for i, dataset in enumerate(recipe.run.datasets):
        if dataset.format == "text":
            try:
                config = dataset.prepare_config()
            except ConfigError as err:
                raise ConfigError(f"run.datasets[{i}].config: {err}") from None
            if dataset.path is None and not dataset.inputs and not config.sources:
                raise ConfigError(
                    f"run.datasets[{i}]: no inputs and no [[sources]] in {dataset.config}"
                )
    for i, stage in enumerate(recipe.stage):
        kind = stage.stage_kind
        entries = [("sources", j, e) for j, e in enumerate(stage.data.sources)]
        entries += [("replay", j, e) for j, e in enumerate(stage.data.replay)]
        for table, j, entry in entries:
            where = f"{stage_label(i, stage.name)}: data.{table}[{j}].dataset"
            if entry.dataset not in formats:
                known = ", ".join(formats) or "none"
                raise ConfigError(
                    f"{where}: no [[run.datasets]] named {entry.dataset!r}; known: {known}"
                )
            if table == "sources" and formats[entry.dataset] not in kind.formats:
                wanted = " or ".join(repr(f) for f in kind.formats)
                raise ConfigError(f"{where}: {entry.dataset!r} is a {formats[entry.dataset]} dataset; "
                                  f"the sources of a {kind.name!r} stage have format {wanted}")  # fmt: skip


def stage_specs(recipe: Recipe) -> list[ModelSpec]:
    """The spec each stage trains: its start's spec, then its rope_theta / max_seq_len overrides."""
    from orchestration.core import checkpoint

    specs: list[ModelSpec] = []
    for i, stage in enumerate(recipe.stage):
        if stage.start == "init":
            base = recipe.run.model_spec()
        elif stage.start == "previous":
            base = specs[i - 1]
        elif recipe.start_stage(i) is not None:
            base = specs[recipe.start_stage(i)]
        else:
            try:
                base = checkpoint.load_spec(stage.start)
            except (CheckpointError, ConfigError) as err:
                raise ConfigError(f"{stage_label(i, stage.name)}: start: {err}") from None
        earlier = [s.name for s in recipe.stage[:i]]
        if stage.merge is not None and set(stage.merge.stages) <= set(earlier):  # else check_stages says so
            merged = [specs[earlier.index(n)] for n in stage.merge.stages]  # a merge keeps their spec
            if any(m != merged[0] for m in merged + ([base] if stage.merge.method != "linear" else [])):
                raise ConfigError(f"{stage_label(i, stage.name)}: merge: the stages merged (and the start) "
                                  "have different model specs")  # fmt: skip
            base = merged[0]
        if stage.upscale is not None:
            base = upscaled(base, stage.upscale, stage_label(i, stage.name))
        specs.append(apply_overrides(base, stage, stage_label(i, stage.name)))
    return specs


def upscaled(spec: ModelSpec, layers: str, label: str) -> ModelSpec:
    """The start's spec after the stage's up-scaling: n_layers = the ranges' total."""
    from orchestration.core.upscale import upscaled_spec

    try:
        return upscaled_spec(spec, layers)
    except ConfigError as err:
        raise ConfigError(f"{label}: upscale: {str(err).removeprefix('layers: ')}") from None


def teacher_spec(recipe: Recipe, index: int, specs: list[ModelSpec]) -> ModelSpec:
    """The spec of stage `index`'s distillation teacher: an earlier stage's, or its checkpoint's."""
    from orchestration.core import checkpoint

    stage, names = recipe.stage[index], [s.name for s in recipe.stage]
    label, teacher = stage_label(index, stage.name), stage.distill.teacher
    if teacher in names[:index]:
        return specs[names.index(teacher)]
    if teacher in names:
        raise ConfigError(f"{label}: distill.teacher: stage {teacher!r} comes after this one; a teacher "
                          "is an earlier stage or a checkpoint")  # fmt: skip
    try:
        return checkpoint.load_spec(teacher)
    except (CheckpointError, ConfigError) as err:
        raise ConfigError(f"{label}: distill.teacher: not an earlier stage's name, and {err}") from None


def check_teachers(recipe: Recipe, specs: list[ModelSpec]) -> None:
    """A teacher is a language model of the student's vocabulary, with at least top_k ids."""
    for i, stage in enumerate(recipe.stage):
        if stage.distill is None:
            continue
        label, teacher = stage_label(i, stage.name), teacher_spec(recipe, i, specs)
        if teacher.head != "lm" or teacher.vocab_size != specs[i].vocab_size:
            raise ConfigError(f"{label}: distill.teacher is a {teacher.head!r} model of vocab_size "
                              f"{teacher.vocab_size:,}; the student is a language model of {specs[i].vocab_size:,} "
                              "(the same tokenizer)")  # fmt: skip
        if stage.distill.k > teacher.vocab_size:
            raise ConfigError(f"{label}: distill.top_k ({stage.distill.k:,}) exceeds the vocabulary "
                              f"({teacher.vocab_size:,})")  # fmt: skip


def apply_overrides(spec: ModelSpec, stage, label: str) -> ModelSpec:
    """`spec` with the stage's rope_theta and max_seq_len, and its kind's head (a reward stage's
    model is a reward model); its sequence lengths must fit. Errors start with `label` ("stage 1
    'name'")."""
    changes = {
        k: getattr(stage, k) for k in ("rope_theta", "max_seq_len") if getattr(stage, k) is not None
    }
    if spec.head != stage.stage_kind.head:
        if spec.head == "score":  # its LM head is gone (orchestration/pipeline/reward_stage.py)
            raise ConfigError(f"{label}: starts from a reward model (a score head, no LM head); a "
                              f"{stage.kind!r} stage trains a language model: start it from one")  # fmt: skip
        changes["head"] = stage.stage_kind.head
    try:
        spec = spec.replace(**changes) if changes else spec
    except ConfigError as err:
        raise ConfigError(f"{label}: {err}") from None
    for k, seq_len in enumerate(stage.seq_lens):
        if seq_len > spec.max_seq_len:
            key = "seq_len" if k == 0 else f"seq_len_ramp[{k - 1}].seq_len"
            raise ConfigError(f"{label}: {key} ({seq_len:,}) exceeds the model's max_seq_len "
                              f"({spec.max_seq_len:,}); raise the stage's max_seq_len")  # fmt: skip
    return spec


def check_vocabulary(recipe: Recipe, specs: list[ModelSpec]) -> None:
    """A tokenizer trained by the run must have exactly the model's vocabulary."""
    tokenizer = recipe.run.tokenizer
    if tokenizer.path is not None:
        return  # checked by run_stage against the tokenizer file
    for i, (stage, spec) in enumerate(zip(recipe.stage, specs)):
        if spec.vocab_size != tokenizer.train.vocab_size:
            source = (
                "run.vocab_size"
                if recipe.run.vocab_size is not None
                else f"the model of {stage_label(i, stage.name)}"
            )
            raise ConfigError(f"{source} has vocab_size {spec.vocab_size:,} but run.tokenizer.vocab_size is "
                              f"{tokenizer.train.vocab_size:,}; set run.vocab_size = {tokenizer.train.vocab_size}")  # fmt: skip
