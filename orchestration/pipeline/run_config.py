"""`[run]` of a recipe: the model, the tokenizer and the datasets every stage shares.

[run]             RunConfig        name, seed, backend, preset | init_checkpoint, vocab_size, imports
[run.tokenizer]   TokenizerConfig  path, or train_inputs + tokenizer.train.TrainConfig's keys
[[run.datasets]]  DatasetConfig    name, inputs | path, format, text_fields, config, [chat]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hanyeong.errors import CheckpointError, ConfigError
from orchestration.core.backends import BACKENDS
from orchestration.core.config import at, build, plain, to_table
from orchestration.core.spec import ModelSpec
from orchestration.data.chat import ChatConfig
from orchestration.data.manifest import DATASET_FORMATS
from orchestration.pipeline.stage_config import NAME
from tokenizer.train import TrainConfig


@dataclass(frozen=True)
class TokenizerConfig:
    """`[run.tokenizer]`: an existing tokenizer (`path`), or one the runner trains into
    RUN_DIR/tokenizer from `train_inputs`. Every other key of the table is a field of
    tokenizer.train.TrainConfig (vocab_size, engine, morphemes, digits, min_frequency,
    special_block, text_fields, and the [run.tokenizer.sample] table)."""

    path: str | None = None
    """Directory of a trained tokenizer (tokenizer.json)."""
    train_inputs: tuple[str, ...] = ()
    """Files or folders to train one on."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The training settings: the table's other keys."""

    def __post_init__(self) -> None:
        if (self.path is None) == (not self.train_inputs):
            raise ConfigError(
                "path: give either path (an existing tokenizer) or train_inputs (to train one)"
            )

    @classmethod
    def from_dict(cls, data: dict, where: str = "run.tokenizer") -> TokenizerConfig:
        """From the `[run.tokenizer]` table, whose keys other than path and train_inputs are
        TrainConfig's (not a `train` sub-table)."""
        if not isinstance(data, dict):
            raise ConfigError(f"{where} must be a table, got {type(data).__name__}")
        own = {k: v for k, v in data.items() if k in ("path", "train_inputs")}
        rest = {k: v for k, v in data.items() if k not in own}
        if "path" in own and rest:
            listed = ", ".join(sorted(rest))
            raise ConfigError(at(where, f"{listed} only apply with train_inputs, not path"))
        return build(cls, {**own, "train": build(TrainConfig, rest, where)}, where)

    def to_dict(self) -> dict:
        own = {"path": self.path} if self.path else {"train_inputs": list(self.train_inputs)}
        return {**own, **({} if self.path else to_table(self.train))}


@dataclass(frozen=True)
class DatasetConfig:
    """`[[run.datasets]]`: a dataset the stages read, prepared by the runner into
    RUN_DIR/datasets/<name> (or an existing one at `path`)."""

    name: str
    """What `[stage.data]` tables call it; its folder name."""
    inputs: tuple[str, ...] = ()
    """Files or folders to prepare it from; sources are named after them (a file by its stem, a
    folder by each entry under it), as `hanyeong data prepare` names them."""
    path: str | None = None
    """Or: the directory of an already prepared dataset (manifest.json)."""
    format: str = "text"
    """One of DATASET_FORMATS (orchestration/data/manifest.py): 'text' (documents: clean, filter,
    dedup, decontaminate, tokenize) or 'chat' (conversations: chat template, input_ids + loss_mask;
    orchestration/data/chat.py)."""
    text_fields: tuple[str, ...] | None = None
    """text: record fields holding the text (default: 'text'); dotted paths as --text-field."""
    config: str | None = None
    """text: a prepare.toml (PrepareConfig; its [[sources]] may replace inputs); preference: one whose
    [decontaminate] drops pairs that share a window with a benchmark."""
    chat: ChatConfig | None = None
    """chat: `[run.datasets.chat]`, the record fields of a conversation (defaults: ChatConfig)."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not NAME.match(self.name):
            raise ConfigError(f"name must be letters, digits, '.', '_' or '-', got {self.name!r}")
        if self.format not in DATASET_FORMATS:
            known = ", ".join(DATASET_FORMATS)
            raise ConfigError(f"format must be one of {known}, got {self.format!r}")
        if self.path is not None and (self.inputs or self.config or self.chat):
            raise ConfigError("path names a prepared dataset: leave out inputs, config and chat")
        if self.format == "chat" and (self.config is not None or self.text_fields is not None):
            raise ConfigError(
                "format: config and text_fields are for format 'text'; a chat dataset takes [chat]"
            )
        if self.format == "text" and self.chat is not None:
            raise ConfigError("chat: [chat] is for format 'chat'")
        if self.format == "preference" and (self.chat is not None or self.text_fields is not None):
            raise ConfigError("format: a preference dataset takes neither [chat] nor text_fields (its config: "
                              "a prepare.toml whose [decontaminate] applies)")  # fmt: skip
        if self.path is None and not self.inputs and self.config is None:
            raise ConfigError(
                "inputs: give inputs, a path, or a config whose [[sources]] name the inputs"
            )

    def prepare_config(self):
        """The PrepareConfig of a text dataset (its `config` file, or the defaults)."""
        from orchestration.data.config import PrepareConfig, load_config

        return load_config(self.config) if self.config else PrepareConfig()

    def prepare(self, tokenizer: str | Path, out: str | Path, progress: bool = False,
                num_cpus: int | None = None, address: str | None = None, force: bool = False) -> dict:  # fmt: skip
        """Build the dataset into `out` with `tokenizer` (a no-op when up to date); its manifest."""
        if self.format == "preference":  # a config's [decontaminate] applies to its pairs
            from orchestration.data.preference import prepare_preference

            decontaminate = self.prepare_config().decontaminate if self.config else None
            return prepare_preference(list(self.inputs), tokenizer, out, force=force,
                                      decontaminate=decontaminate)  # fmt: skip
        if self.format == "chat":
            from orchestration.data.chat_dataset import prepare_chat

            return prepare_chat(
                list(self.inputs), tokenizer, out, self.chat or ChatConfig(), force=force
            )
        from orchestration.data.prepare import prepare

        return prepare(list(self.inputs), tokenizer, out, self.prepare_config(),
                       text_fields=list(self.text_fields) if self.text_fields else None,
                       num_cpus=num_cpus, address=address, progress=progress, force=force)  # fmt: skip

    def settings(self) -> dict:
        """What decides the dataset's content, for stage identities (the config file's content too)."""
        extra = (
            {"prepare_config": plain(self.prepare_config().to_dict())}
            if self.format == "text" or (self.format == "preference" and self.config)
            else {}
        )
        return {**self.to_dict(), **extra}

    def to_dict(self) -> dict:
        return to_table(self)


@dataclass(frozen=True)
class RunConfig:
    """`[run]`: the model, tokenizer and datasets every stage shares."""

    name: str
    """Names the run (and its directory, by the runner's convention)."""
    tokenizer: TokenizerConfig
    """`[run.tokenizer]`."""
    datasets: tuple[DatasetConfig, ...] = ()
    """`[[run.datasets]]`."""
    seed: int = 0
    """Seeds the initial weights; stage i's data order is seeded with seed + i (or its data_seed)."""
    backend: str = "auto"
    """'auto' (MLX on Apple silicon, else PyTorch), 'torch' or 'mlx'."""
    preset: str | None = None
    """Model preset of stages that start from 'init' (orchestration/core/presets.py)."""
    init_checkpoint: str | None = None
    """Or: a checkpoint whose weights 'init' stages start from."""
    vocab_size: int | None = None
    """Override the preset's vocab_size; must equal the tokenizer's."""
    imports: tuple[str, ...] = ()
    """Python modules imported before the stages are read: the place for a project's own stage
    kinds and losses (`register_kind`, `register_loss`), so they exist in the driver and in every
    Ray worker that rebuilds the recipe. Each must be importable there (on a cluster: shipped in the
    job's working directory)."""

    def __post_init__(self) -> None:
        from orchestration.core.presets import get_preset

        for i, module in enumerate(self.imports):
            import_module(module, f"imports[{i}]")

        if not isinstance(self.name, str) or not NAME.match(self.name):
            raise ConfigError(f"name must be letters, digits, '.', '_' or '-', got {self.name!r}")
        if self.backend not in ("auto", *BACKENDS):
            raise ConfigError(
                f"backend must be one of auto, {', '.join(BACKENDS)}, got {self.backend!r}"
            )
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        if self.preset is not None and self.init_checkpoint is not None:
            raise ConfigError("init_checkpoint: give preset or init_checkpoint, not both")
        if self.preset is not None:
            try:
                get_preset(self.preset)
            except ConfigError as err:
                raise ConfigError(f"preset: {err}") from None
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ConfigError(f"vocab_size must be positive, got {self.vocab_size}")
        names = [d.name for d in self.datasets]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ConfigError(f"datasets[{i}].name {name!r} is used twice")

    def model_spec(self) -> ModelSpec | None:
        """The spec 'init' stages start from: the preset (vocab_size applied) or init_checkpoint's."""
        from orchestration.core import checkpoint
        from orchestration.core.presets import get_preset

        if self.preset is not None:
            spec = get_preset(self.preset)
            return spec if self.vocab_size is None else spec.replace(vocab_size=self.vocab_size)
        if self.init_checkpoint is None:
            return None
        try:
            spec = checkpoint.load_spec(self.init_checkpoint)
        except (CheckpointError, ConfigError) as err:
            raise ConfigError(f"run.init_checkpoint: {err}") from None
        if self.vocab_size not in (None, spec.vocab_size):
            raise ConfigError(f"run.vocab_size ({self.vocab_size:,}) differs from init_checkpoint's "
                              f"({spec.vocab_size:,}); a checkpoint's vocabulary cannot be overridden")  # fmt: skip
        return spec

    @classmethod
    def from_dict(cls, data: dict, where: str = "run") -> RunConfig:
        """From the `[run]` table with its [run.tokenizer] and [[run.datasets]]."""
        return build(cls, data, where)

    def to_dict(self) -> dict:
        out = to_table(self)
        out["tokenizer"] = self.tokenizer.to_dict()
        return out


def import_module(name: str, where: str) -> None:
    """Import `name` for what it registers; a module that cannot be imported is a ConfigError."""
    import importlib

    try:
        importlib.import_module(name)
    except ImportError as err:
        raise ConfigError(f"{where}: cannot import {name!r} ({err})") from None
