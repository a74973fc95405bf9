"""The checks across a recipe's tables, run when a `Recipe` is built (before anything trains).

Each table checks its own values (orchestration/pipeline/recipe.py, orchestration/pipeline/stage_config.py); these
check what lies between them: stage names, the first stage's start, dataset references and the
formats a stage's kind reads (orchestration/pipeline/kinds.py), the model spec of each stage against
its sequence lengths, and the vocabulary against the tokenizer. Every message names the key path, a
stage's after "stage 1 'name': ".
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


def check_stages(recipe: Recipe) -> None:
    names = [s.name for s in recipe.stage]
    for i, stage in enumerate(recipe.stage):
        label = stage_label(i, stage.name)
        if stage.name in names[:i]:
            raise ConfigError(f"{label}: name is used twice")
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
        else:
            try:
                base = checkpoint.load_spec(stage.start)
            except (CheckpointError, ConfigError) as err:
                raise ConfigError(f"{stage_label(i, stage.name)}: start: {err}") from None
        specs.append(apply_overrides(base, stage, stage_label(i, stage.name)))
    return specs


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
