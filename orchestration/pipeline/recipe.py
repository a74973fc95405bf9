"""A recipe: the run (model, tokenizer, datasets) and its ordered stages, in one TOML file.

    [run]                   RunConfig        orchestration/pipeline/run_config.py: name, seed, backend,
                                             preset | init_checkpoint, vocab_size
    [run.tokenizer]         TokenizerConfig  path, or train_inputs + tokenizer.train.TrainConfig's keys
    [[run.datasets]]        DatasetConfig    name, inputs | path, format, text_fields, config, [chat]
    [[stage]]               StageConfig      orchestration/pipeline/stage_config.py (budget, shapes, ramps)
    [stage.data]            MixtureConfig    `dataset` names a [[run.datasets]] entry
    [stage.optim]           OptimConfig      without total_steps (derived from the budget)

`load_recipe` checks everything that can be checked before a run starts (types, values, names,
references between tables, model shapes against sequence lengths, vocabulary against tokenizer,
start checkpoints); `check_inputs` adds that the input files exist. Every table is built by
orchestration/core/config.py's `build`; a stage's errors start with "stage 1 'name': ". Relative paths are resolved
against the recipe file's folder, so `to_dict()` holds absolute paths and rebuilds anywhere the
same storage is mounted (a Ray worker).
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from hanyeong.errors import ConfigError, DataError
from orchestration.core.spec import ModelSpec
from orchestration.pipeline.run_config import DatasetConfig, RunConfig, TokenizerConfig
from orchestration.pipeline.stage_config import STARTS, StageConfig, stage_label

# [[stage]] keys that say how a stage runs, not what it computes
NOT_IN_IDENTITY = ("checkpoint_every_tokens", "workers", "parallelism", "resources", "eval", "activation_checkpointing")

__all__ = ["DatasetConfig", "Recipe", "RunConfig", "StageConfig", "TokenizerConfig", "load_recipe"]


@dataclass(frozen=True)
class Recipe:
    """A whole recipe file: `[run]` and the `[[stage]]` tables, in order."""

    run: RunConfig
    """`[run]`."""
    stage: tuple[StageConfig, ...]
    """`[[stage]]`, run in order."""

    def __post_init__(self) -> None:
        from orchestration.pipeline.recipe_checks import check_recipe

        check_recipe(self)

    @property
    def stages(self) -> tuple[StageConfig, ...]:
        return self.stage

    def dataset(self, name: str) -> DatasetConfig:
        return next(d for d in self.run.datasets if d.name == name)

    def stage_specs(self) -> list[ModelSpec]:
        """The model spec each stage trains: its start's spec with its rope/max_seq_len overrides."""
        from orchestration.pipeline.recipe_checks import stage_specs

        return stage_specs(self)

    def stage_identities(self) -> list[str]:
        """sha256 per stage of its resolved config and the identity of what it starts from.

        The config: the [[stage]] table (less NOT_IN_IDENTITY: where checkpoints fall and how many
        workers share each step do not change the result, so a stage resumes with another worker
        count), its index, the run seed, the tokenizer settings and the settings of the datasets
        it reads, every path among them by the content it names (tokenizer_identity,
        dataset_identity; checkpoints by their checkpoint.json hash): a repository, its inputs or
        a checkpoint moved elsewhere with the same bytes keeps every identity. Its input: the previous stage's identity ('previous'),
        the sha256 of a start checkpoint's checkpoint.json, or for 'init' the run's preset,
        init_checkpoint (its checkpoint.json hash) and vocab_size. A change anywhere reaches every
        later stage that starts from 'previous'.
        """
        identities: list[str] = []
        for i, stage in enumerate(self.stage):
            table = {k: v for k, v in stage.to_dict().items() if k not in NOT_IN_IDENTITY}
            if not table["data"]["hold_out"]:  # added later: runs made before it keep their identities
                del table["data"]["hold_out"]
            if not table.get("carry_optimizer"):  # likewise
                table.pop("carry_optimizer", None)
            names = sorted({e.dataset for e in (*stage.data.sources, *stage.data.replay)})
            self._paths_by_content(i, table)
            config = {"index": i, "stage": table, "seed": self.run.seed,
                      "tokenizer": tokenizer_identity(self.run.tokenizer),
                      "datasets": {n: dataset_identity(self.dataset(n)) for n in names}}  # fmt: skip
            if stage.distill is not None:  # the teacher is an input too (distill_stage.py)
                config["teacher"] = self._teacher_identity(i, identities)
                for how in ("teacher_run", "tasks"):  # cached or live, any task count: the same result
                    table["distill"].pop(how, None)
            rewards = self.reward_models(i)  # online-dpo, rejection-sft: their reward models are inputs too
            if rewards:
                config["rewards"] = [identities[r] if isinstance(r, int) else checkpoint_hash(r) for r in rewards]
            if stage.start == "previous":
                source = {"previous": identities[i - 1]}
            elif self.start_stage(i) is not None:
                source = {"stage": identities[self.start_stage(i)]}
            elif stage.start == "init":
                init = self.run.init_checkpoint
                source = {"init": {"preset": self.run.preset, "vocab_size": self.run.vocab_size,
                                   "checkpoint": init and checkpoint_hash(init)}}  # fmt: skip
            else:
                source = {"checkpoint": checkpoint_hash(stage.start)}
            text = json.dumps(
                {"config": config, "input": source}, sort_keys=True, ensure_ascii=False
            )
            identities.append(hashlib.sha256(text.encode("utf-8")).hexdigest())
        return identities

    def _paths_by_content(self, index: int, table: dict) -> None:
        """Stage `index`'s table with its checkpoint paths (start, reward models, teacher) replaced
        by a marker: their content is in the identity's input, rewards and teacher."""
        stage, names = self.stage[index], {s.name for s in self.stage[:index]}
        if stage.start not in STARTS and stage.start not in names:
            table["start"] = "checkpoint"
        for key, fields in (("online", ("reward",)), ("rejection", ("reward", "second")), ("distill", ("teacher",))):
            for field in fields if isinstance(table.get(key), dict) else ():
                if isinstance(table[key].get(field), str) and table[key][field] not in names:
                    table[key][field] = "checkpoint"

    def start_stage(self, index: int) -> int | None:
        """The earlier stage whose final checkpoint stage `index` starts from, when its `start`
        names one (SFT on rejection samples starts from the SFT model, not the reward model
        trained after it); None for 'init', 'previous' and a checkpoint directory."""
        names = [s.name for s in self.stage[:index]]
        start = self.stage[index].start
        return names.index(start) if start in names else None

    def reward_models(self, index: int) -> list[int | str]:
        """Stage `index`'s reward models: an earlier stage's index, or a checkpoint directory."""
        stage, names = self.stage[index], [s.name for s in self.stage[:index]]
        settings = stage.online or stage.rejection
        wanted = [] if settings is None else [settings.reward, getattr(settings, "second", None)]
        return [names.index(w) if w in names else w for w in wanted if w is not None]

    def _teacher_identity(self, index: int, identities: list[str]) -> str:
        """An earlier teacher stage's identity, or the hash of a teacher checkpoint."""
        teacher, names = self.stage[index].distill.teacher, [s.name for s in self.stage[:index]]
        return identities[names.index(teacher)] if teacher in names else checkpoint_hash(teacher)

    def check_inputs(self) -> None:
        """DataError naming every input (tokenizer, datasets) that is not there."""
        missing = []
        tokenizer = self.run.tokenizer
        if tokenizer.path and not (Path(tokenizer.path) / "tokenizer.json").is_file():
            missing.append(f"run.tokenizer.path: {tokenizer.path} (no tokenizer.json)")
        missing += [f"run.tokenizer.train_inputs[{i}]: {p}" for i, p in enumerate(tokenizer.train_inputs)
                    if not Path(p).exists()]  # fmt: skip
        for i, d in enumerate(self.run.datasets):
            if d.path and not (Path(d.path) / "manifest.json").is_file():
                missing.append(f"run.datasets[{i}].path: {d.path} (no manifest.json)")
            missing += [
                f"run.datasets[{i}].inputs[{j}]: {p}"
                for j, p in enumerate(d.inputs)
                if not Path(p).exists()
            ]
            if d.format == "text":
                missing += [f"run.datasets[{i}].config [[sources]] {s.name}: {p}" for s in d.prepare_config().sources
                            for p in s.paths if not Path(p).exists()]  # fmt: skip
        if missing:
            raise DataError("missing recipe inputs: " + "; ".join(missing))

    # ---- TOML ----

    @classmethod
    def from_dict(cls, data: dict, base: str | Path | None = None) -> Recipe:
        """From the TOML tables; relative paths are resolved against `base` (default: the cwd)."""
        if not isinstance(data, dict):
            raise ConfigError(f"a recipe must be a table, got {type(data).__name__}")
        unknown = sorted(set(data) - {"run", "stage"})
        if unknown:
            raise ConfigError(
                f"unknown table(s) {', '.join(unknown)}; a recipe has [run] and [[stage]]"
            )
        if "run" not in data or "stage" not in data:
            raise ConfigError("a recipe needs a [run] table and at least one [[stage]]")
        data = _resolve_paths(data, Path(base) if base is not None else Path.cwd())
        run = RunConfig.from_dict(data["run"])
        stages = data["stage"]
        if not isinstance(stages, list) or not stages:
            raise ConfigError("stage: a recipe needs at least one [[stage]] table")
        return cls(run, tuple(build_stage(i, table) for i, table in enumerate(stages)))

    def to_dict(self) -> dict:
        """The TOML tables, paths absolute: `Recipe.from_dict(r.to_dict()) == r`."""
        return {"run": self.run.to_dict(), "stage": [s.to_dict() for s in self.stage]}


def build_stage(index: int, table: object) -> StageConfig:
    """The `[[stage]]` table at `index`; its errors start with "stage 1 'name': "."""
    try:
        return StageConfig.from_dict(table)
    except ConfigError as err:
        name = table.get("name") if isinstance(table, dict) else None
        raise ConfigError(f"{stage_label(index, name)}: {err}") from None


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file; any problem is one ConfigError naming the file and key."""
    from orchestration.core.config import read_toml

    path = Path(path)
    data = read_toml(path, "recipe")
    try:
        return Recipe.from_dict(data, base=path.resolve().parent)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def tokenizer_identity(config: TokenizerConfig) -> dict:
    """[run.tokenizer] by content: the tokenizer's files, or the training inputs' bytes and the
    training settings; where they lie is left out, so a moved repository retrains nothing."""
    from orchestration.data.manifest import path_digest

    table = config.to_dict()
    if config.path:
        table["path"] = path_digest(config.path)
    else:
        table["train_inputs"] = [path_digest(p) for p in config.train_inputs]
    return table


def dataset_identity(dataset: DatasetConfig) -> dict:
    """A [[run.datasets]] entry by content: a prepared dataset's content hash, or the inputs'
    bytes, the settings and, for text, the prepare config's sources and benchmarks by content."""
    from orchestration.data.decontaminate import benchmark_files
    from orchestration.data.manifest import path_digest, read_manifest

    table = dataset.settings()
    table.pop("config", None)  # its content is prepare_config
    if dataset.path is not None:  # its shards' hashes; a manifest without them: every file's bytes
        table["path"] = read_manifest(dataset.path).get("content_hash") or path_digest(dataset.path)
    table["inputs"] = [path_digest(p) for p in dataset.inputs]
    if "prepare_config" in table:
        prepare = dataset.prepare_config()
        table["prepare_config"] = prepare.settings()
        table["prepare_inputs"] = {s.name: [path_digest(p) for p in s.paths] for s in prepare.sources}
        table["benchmarks"] = {b.name: sorted(path_digest(f) for f in benchmark_files(b, prepare.decontaminate.root))
                               for b in prepare.decontaminate.benchmarks}  # fmt: skip
    return table


def checkpoint_hash(path: str | Path) -> str:
    """sha256 of a checkpoint's checkpoint.json (which holds the sha256 of each of its files)."""
    from orchestration.core.checkpoint import INDEX_FILE, verify

    verify(path)
    return hashlib.sha256((Path(path) / INDEX_FILE).read_bytes()).hexdigest()


def _resolve_paths(data: dict, base: Path) -> dict:
    """A copy of the tables with every path key made absolute against `base` (non-strings left for
    the type checks to refuse)."""

    def path(value):
        return str((base / value).resolve()) if isinstance(value, str) and value else value

    def paths(value):
        return [path(v) for v in value] if isinstance(value, list) else value

    data = copy.deepcopy(data)
    run = data.get("run")
    if isinstance(run, dict):
        if "init_checkpoint" in run:
            run["init_checkpoint"] = path(run["init_checkpoint"])
        tokenizer = run.get("tokenizer")
        if isinstance(tokenizer, dict):
            for key, fix in (("path", path), ("train_inputs", paths)):
                if key in tokenizer:
                    tokenizer[key] = fix(tokenizer[key])
        for dataset in run.get("datasets", []) if isinstance(run.get("datasets"), list) else []:
            if isinstance(dataset, dict):
                for key, fix in (("path", path), ("inputs", paths), ("config", path)):
                    if key in dataset:
                        dataset[key] = fix(dataset[key])
    stages = data.get("stage", []) if isinstance(data.get("stage"), list) else []
    names = {stage["name"] for stage in stages if isinstance(stage, dict) and isinstance(stage.get("name"), str)}
    for stage in stages:
        if (
            isinstance(stage, dict)
            and isinstance(stage.get("start"), str)
            and stage["start"] not in STARTS
            and stage["start"] not in names  # an earlier stage's name, not a checkpoint
        ):
            stage["start"] = path(stage["start"])
        for table, keys in (("online", ("reward",)), ("rejection", ("reward", "second"))):
            settings = stage.get(table) if isinstance(stage, dict) else None
            for key in keys if isinstance(settings, dict) else ():
                if isinstance(settings.get(key), str) and settings[key] not in names:
                    settings[key] = path(settings[key])  # a reward model's checkpoint, not a stage's name
        distill = stage.get("distill") if isinstance(stage, dict) else None
        if isinstance(distill, dict) and isinstance(distill.get("teacher"), str) and distill["teacher"] not in names:
            distill["teacher"] = path(distill["teacher"])  # a checkpoint, not a stage's name
    return data
