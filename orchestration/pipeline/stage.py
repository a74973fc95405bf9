"""`run_stage(config) -> result`: train one recipe stage, in-process; the Ray runner ships it as a task.

Plain dicts in and out, so Ray can carry them:

    config  recipe      Recipe.to_dict()
            index       which [[stage]]
            stage_dir   the stage's directory: checkpoint/, metrics.jsonl, stage.json
            init_from   checkpoint to start from (the previous stage's), or None: run.preset /
                        run.init_checkpoint for start = 'init', the path for a checkpoint start
            tokenizer   the tokenizer directory
            datasets    {dataset name: prepared dataset directory}
            backend     'torch' or 'mlx' (resolved)
            progress    show a progress bar on stderr
            workers     data-parallel ranks (default 1); with more, this call is one rank of a
                        group the launcher set up (orchestration/cluster/train_group.py, ring_group.py)
            parallel    'ddp' or 'fsdp' when workers > 1 (orchestration/core/parallel.py)
            device      the device the launcher bound this rank to ('cpu', 'cuda:1'), or None: the
                        backend's default (get_backend(backend, device))
    result  checkpoint, tokens, steps, seconds, first_loss, last_loss, resumed_from_step, notes
            (lines for the run's echo: a preference stage's held-back accuracy)

The loop is `backend.train_step` per batch; the rest are callbacks (orchestration/pipeline/stage_callbacks.py):
ramps set each step's shape, the metrics log appends a line per step, the checkpointer writes
STAGE_DIR/checkpoint (weights, AdamW, trainer_state.json whose data_cursor is the loader's cursor).
UP-SCALING: a stage with `upscale` starts from its start checkpoint up-scaled into STAGE_DIR/upscaled
(orchestration/core/upscale.py); with [stage.eval] that model is evaluated before the first step
(eval.jsonl's step-0 line: the loss right after up-scaling, against the last line of the stage before).
RESUME: when STAGE_DIR/checkpoint holds a training state, run_stage continues from it: the same
weights, moments, step and data cursor, so the final weights equal an uninterrupted run's.
ACTIVATION CHECKPOINTING: a stage that recomputes activations (its `activation_checkpointing`, else
its run preset's default) has the backend's train state do so; the weights are the same either way,
so the setting is not part of the stage's identity and a resumed stage may switch it.
DATA PARALLEL: every rank draws the same global batch and trains on its rows
(orchestration/parallel.rank_rows); the backend sums gradients over the ranks, so the update is the
single worker's. Every rank calls the checkpoint save (FSDP gathers); rank 0 alone writes files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestration.core import checkpoint
from hanyeong.errors import CheckpointError, ConfigError, DataError, TrainingError
from orchestration.core.parallel import rank_rows
from orchestration.pipeline.stage_callbacks import Callback, Checkpointer, MetricsLog, ProgressBar, Ramps
from orchestration.pipeline.stage_config import stage_label

CHECKPOINT, METRICS, STAGE_FILE = "checkpoint", "metrics.jsonl", "stage.json"
UPSCALED = "upscaled"  # STAGE_DIR/upscaled: an `upscale` stage's start, before its overrides
MERGED = "merged"  # STAGE_DIR/merged: a [stage.merge] stage's start
STEP_METRICS = ("loss", "grad_norm", "lr", "tokens", "counted_tokens")  # what every train_step returns
KEYS = {"recipe": dict, "index": int, "stage_dir": str, "init_from": (str, type(None)), "tokenizer": str,
        "datasets": dict, "backend": str, "progress": bool, "workers": int, "parallel": (str, type(None)),
        "device": (str, type(None))}  # fmt: skip
OPTIONAL = {"init_from": None, "progress": False, "workers": 1, "parallel": None, "device": None}


@dataclass
class StageRun:
    """What the loop and its callbacks share."""

    name: str
    index: int
    stage: Any  # StageConfig
    backend: Any
    state: Any  # the backend's TrainState: model, optimizer, step, tokens_seen, data_cursor
    loader: Any  # the stage kind's Loader (orchestration/pipeline/kinds.py)
    directory: Path
    records: list[dict] = field(default_factory=list)  # this call's metrics lines
    notes: list[str] = field(default_factory=list)  # lines for the run's echo (result["notes"])
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes metrics, stage.json and the progress bar."""
        return self.rank == 0

    @property
    def checkpoint_dir(self) -> Path:
        return self.directory / CHECKPOINT


def run_stage(config: dict) -> dict:
    """Train stage `config['index']` of `config['recipe']` to its token budget; see the module doc."""
    from orchestration.core.backends import get_backend
    from orchestration.pipeline.recipe import Recipe

    started = time.perf_counter()
    request = read_request(config)
    recipe = Recipe.from_dict(request["recipe"])
    index = request["index"]
    if not 0 <= index < len(recipe.stage):
        raise ConfigError(
            f"run_stage: index {index} is not a stage of the recipe ({len(recipe.stage)} stages)"
        )
    stage, directory = recipe.stage[index], Path(request["stage_dir"])
    directory.mkdir(parents=True, exist_ok=True)
    identity = recipe.stage_identities()[index]
    backend = get_backend(request["backend"], device=request["device"])
    rank, world, parallel = join_group(backend, request["workers"], request["parallel"], index)
    seed = recipe.run.seed + index if stage.data_seed is None else stage.data_seed
    loader = build_loader(stage, request["datasets"], seed=seed)
    run = StageRun(stage.name, index, stage, backend, None, loader, directory, rank=rank, world=world)
    log = MetricsLog(directory / METRICS, write=run.main)
    options = {"parallel": parallel} if parallel else {}  # single-worker backends need not know the key
    if stage.recomputes_activations(recipe.run.preset):  # a training setting: no checkpoint records it
        options["activation_checkpointing"] = True
    resumed = None
    if world == 1:  # a Ray retry of a worker killed inside checkpoint.writing: put its checkpoint back
        checkpoint.recover(run.checkpoint_dir)  # (a group's ranks would race; the driver does it for them)
    if checkpoint.has_training_state(run.checkpoint_dir):
        check_identity(directory, identity)
        run.state = backend.load_train_state(run.checkpoint_dir, **options)
        resumed = resume(run, log)
    else:
        if run.main:
            write_identity(directory, stage.name, index, identity)
        model = start_model(backend, recipe, index, request["init_from"], directory, run.main)
        run.state = backend.init_train_state(model, stage.train_optim, seed=recipe.run.seed + index, **options)
        if stage.carry_optimizer:  # the moments of the checkpoint the weights came from
            backend.carry_optimizer(run.state, request["init_from"] or stage.start)
        log.reset()
    check_vocabulary(run, request["tokenizer"])
    kind_callbacks = []  # what the kind computes up front (reference log-probs) and adds to the loop
    if stage.stage_kind.prepare is not None:
        kind_callbacks = stage.stage_kind.prepare(run, recipe, request["init_from"]) or []
    callbacks = [
        Ramps(),
        log,
        Checkpointer(stage.checkpoint_every_tokens),
        ProgressBar(request["progress"] and run.main),
        *kind_callbacks,
    ]
    if stage.eval is not None:  # [stage.eval]: STAGE_DIR/eval.jsonl (orchestration/pipeline/stage_eval.py)
        from orchestration.pipeline.stage_eval import EVAL_FILE, Evaluator

        evaluator = Evaluator(stage.eval, request["tokenizer"], directory / EVAL_FILE)
        callbacks.append(evaluator)
        if stage.upscale is not None and run.state.step == 0:
            evaluate_upscaled(run, evaluator)
    if hasattr(run.loader, "rows_of"):  # a MixtureLoader reads only this rank's rows (issue #20)
        run.loader.rows_of = (run.rank, run.world)  # set here: a kind's wrapper (distill) keeps all
    train(run, callbacks)
    lines = log.read()
    return {"checkpoint": str(run.checkpoint_dir), "tokens": int(run.state.tokens_seen),
            "steps": int(run.state.step), "seconds": round(time.perf_counter() - started, 3),
            "first_loss": lines[0]["loss"] if lines else None, "last_loss": lines[-1]["loss"] if lines else None,
            "resumed_from_step": resumed, "notes": run.notes}  # fmt: skip


def evaluate_upscaled(run: StageRun, evaluator) -> None:
    """[stage.eval] at step 0 of an `upscale` stage: the loss right after up-scaling, before any
    step (once: a stage started over keeps its line), and a note for the run's echo."""
    from orchestration.pipeline.stage_eval import read_evals

    evaluator.start(run)
    if not any(line.get("step") == 0 for line in read_evals(evaluator.path)):
        evaluator.evaluate(run)
    start = next((line for line in read_evals(evaluator.path) if line.get("step") == 0), None)
    if start and start.get("val_loss"):
        losses = ", ".join(f"{k} {v:.3f}" for k, v in start["val_loss"].items())
        run.notes.append(f"up-scaled to {run.state.model.spec.n_layers} layers ({run.stage.upscale}): "
                         f"validation loss before any step {losses}")  # fmt: skip


def train(run: StageRun, callbacks: list[Callback]) -> None:
    """Steps until the budget is spent exactly; a NaN or infinite loss is a TrainingError."""
    budget = run.stage.token_budget
    while run.state.tokens_seen < budget:
        for callback in callbacks:
            callback.before_step(run)
        start = time.perf_counter()
        batch = run.loader.next_batch()  # the global batch, or this rank's rows of it (rows_of)
        local = getattr(run.loader, "rows_of", None) is not None
        metrics = run.backend.train_step(run.state, batch if local else rank_rows(batch, run.rank, run.world),
                                         loss=run.stage.loss)  # fmt: skip
        seconds = time.perf_counter() - start
        if not math.isfinite(metrics["loss"]):
            raise TrainingError(diverged(run, metrics["loss"]))
        B, T = run.loader.batch_rows if local else batch.rows, batch.inputs.shape[1]  # the global batch's
        record = {"stage": run.name, "step": int(run.state.step), "tokens": int(run.state.tokens_seen),
                  "loss": float(metrics["loss"]), "lr": float(metrics["lr"]),
                  "grad_norm": float(metrics["grad_norm"]), "tokens_per_s": round(B * T / seconds, 1),
                  "seq_len": T, "batch_rows": B, "counted_tokens": int(metrics.get("counted_tokens", B * T)),
                  "step_seconds": round(seconds, 4), "time": round(time.time(), 3)}  # fmt: skip
        # the loss's own metrics (preference: rewards, margins, accuracies, log-probs, lengths)
        record |= {k: round(float(v), 6) for k, v in metrics.items() if k not in STEP_METRICS}
        # and the loader's about the rows it drew (grpo: the rewards of the sampled answers)
        record |= {k: round(float(v), 6) for k, v in getattr(run.loader, "metrics", dict)().items()}
        for callback in callbacks:
            callback.after_step(run, record)
    for callback in callbacks:
        callback.at_end(run)


def diverged(run: StageRun, loss: float) -> str:
    """The one-line story of a NaN or infinite loss: stage, step, and what is left to resume from."""
    saved = "no checkpoint was written yet"
    if checkpoint.has_training_state(run.checkpoint_dir):
        step = checkpoint.read_trainer_state(run.checkpoint_dir)["step"]
        saved = f"the checkpoint of step {step} in {run.checkpoint_dir} is intact"
    return (f"{stage_label(run.index, run.name)}: loss is {loss} at step {run.state.step} "
            f"({run.state.tokens_seen:,} tokens); {saved}; lower [stage.optim] lr or check the data")  # fmt: skip


# ---- setting up ---------------------------------------------------------------------------------


def join_group(backend, workers: int, parallel: str | None, index: int) -> tuple[int, int, str | None]:
    """(rank, world, parallel) of this call: (0, 1, None) alone; with workers > 1 the group the
    launcher initialised, which must have exactly `workers` ranks."""
    if workers < 1:
        raise ConfigError(f"run_stage: workers must be >= 1, got {workers}")
    if workers == 1:
        return 0, 1, None
    runs = backend.capabilities.parallelisms
    if parallel not in runs:
        raise ConfigError(f"run_stage: parallel must be one of {', '.join(runs)} on backend {backend.name} "
                          f"with {workers} workers, got {parallel!r}")  # fmt: skip
    rank, world = backend.world()
    if world != workers:
        raise ConfigError(f"{stage_label(index)}: {workers} workers asked, but this process is in a {backend.name} "
                          f"group of {world}; launch it through the runner (orchestration/cluster/)")  # fmt: skip
    return rank, world, parallel


def read_request(config: dict) -> dict:
    """The run_stage input, its keys and types checked."""
    if not isinstance(config, dict):
        raise ConfigError(f"run_stage takes a dict, got {type(config).__name__}")
    unknown = sorted(set(config) - set(KEYS))
    missing = sorted(set(KEYS) - set(config) - set(OPTIONAL))
    if unknown or missing:
        raise ConfigError(f"run_stage: unknown key(s) {unknown}, missing key(s) {missing}")
    request = {**OPTIONAL, **config}
    for key, kind in KEYS.items():
        if not isinstance(request[key], kind) or (kind is int and isinstance(request[key], bool)):
            raise ConfigError(
                f"run_stage: {key} has the wrong type ({type(request[key]).__name__})"
            )
    return request


def build_loader(stage, directories: dict, seed: int):
    """The stage's loader, as its kind builds it (orchestration/pipeline/kinds.py), dataset names
    mapped to their prepared directories."""

    def located(entry):
        if entry.dataset not in directories:
            raise ConfigError(f"run_stage: datasets has no directory for {entry.dataset!r} "
                              f"(given: {', '.join(directories) or 'none'})")  # fmt: skip
        return dataclasses.replace(entry, dataset=str(directories[entry.dataset]))

    mixture = stage.data
    mixture = dataclasses.replace(mixture, sources=tuple(map(located, mixture.sources)),
                                  replay=tuple(map(located, mixture.replay)))  # fmt: skip
    seq_len, rows = stage.shape_at(0)
    return stage.stage_kind.loader(mixture, seq_len, rows, seed)


def start_model(backend, recipe, index: int, init_from: str | None, directory: Path, main: bool = True):
    """The weights stage `index` starts from, with its rope_theta / max_seq_len overrides."""
    from orchestration.pipeline.recipe_checks import apply_overrides

    stage = recipe.stage[index]
    where = stage_label(index, stage.name)
    source = init_from or (None if stage.start in ("init", "previous") else stage.start)
    if source is None and stage.start == "previous":
        raise ConfigError(
            f"{where} starts from the previous stage: run_stage needs init_from (its checkpoint)"
        )
    source = source or recipe.run.init_checkpoint
    if source is None:
        return backend.init(
            apply_overrides(recipe.run.model_spec(), stage, where), seed=recipe.run.seed
        )
    if stage.merge is not None:  # WARP as a recipe step: the start is the merge of earlier stages
        source = merged_start(recipe, index, source, directory / MERGED, main)
    if stage.upscale is not None:  # SOLAR: the start's layers stacked anew, then trained on
        source = upscaled_start(source, stage.upscale, directory / UPSCALED, main)
    saved = checkpoint.load_spec(source)
    spec = apply_overrides(saved, stage, where)
    if spec != saved:
        out = directory / "start"
        if main:  # one writer; the others wait for it (the same content, so any rank may read it)
            respec(source, spec, out, seed=recipe.run.seed + index)
        else:
            wait_for(out / checkpoint.INDEX_FILE)
        source = out
    return backend.load(source)


def merged_start(recipe, index: int, base: str | Path, out: Path, main: bool = True) -> Path:
    """[stage.merge]'s checkpoint in `out`: the named stages' final checkpoints merged (slerp and
    warp: with the stage's start as the base). Rank 0 writes it, the other ranks wait for it."""
    from orchestration.core.merge import average
    from orchestration.pipeline.run_manifest import stage_dir_name

    settings, names = recipe.stage[index].merge, [s.name for s in recipe.stage]
    run_dir = out.parent.parent.parent  # RUN_DIR/stages/NN-name/merged
    policies = [run_dir / stage_dir_name(names.index(n), n) / CHECKPOINT for n in settings.stages]
    if main:
        with_base = settings.method in ("slerp", "warp")
        return average(policies, out, method=settings.method, weights=settings.weights, t=settings.t,
                       eta=settings.eta, base=base if with_base else None)  # fmt: skip
    wait_for(out / checkpoint.INDEX_FILE)
    return out


def upscaled_start(source: str | Path, layers: str, out: Path, main: bool = True) -> Path:
    """The start checkpoint up-scaled (orchestration/core/upscale.py) into `out`: rank 0 writes it,
    the other ranks wait for it."""
    from orchestration.core.upscale import upscale

    if main:
        return upscale(source, layers, out)
    wait_for(out / checkpoint.INDEX_FILE)
    return out


def wait_for(path: Path, seconds: float = 300.0) -> None:
    """Block until rank 0 has written `path` (a file renamed into place whole)."""
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            raise CheckpointError(f"{path}: rank 0 did not write it within {seconds:.0f} s")
        time.sleep(0.05)


def respec(source: str | Path, spec, out: Path, seed: int = 0) -> Path:
    """A checkpoint at `out` with `source`'s weights (hard-linked, or copied) and a new spec.json:
    rope_theta and max_seq_len change no tensor, so no framework is needed. A language model made a
    reward model (spec.head 'score') loses its LM head and gets a score head drawn from `seed`."""
    if spec.head != checkpoint.load_spec(source).head:
        return checkpoint.with_score_head(source, spec, out, seed)
    with checkpoint.writing(out, spec) as tmp:
        weights = checkpoint.weights_file(source)
        try:
            os.link(weights, tmp / checkpoint.MODEL_FILE)
        except OSError:
            shutil.copyfile(weights, tmp / checkpoint.MODEL_FILE)
    return out


def resume(run: StageRun, log: MetricsLog) -> int:
    """Continue from STAGE_DIR/checkpoint: its optimizer settings must be the stage's; the loader
    goes back to the saved cursor and the metrics log to the saved step."""
    state, stage = run.state, run.stage
    if state.optim != stage.train_optim:
        raise CheckpointError(f"{run.checkpoint_dir}: written with other [stage.optim] settings or budget "
                              f"({state.optim.to_dict()}); remove {run.directory} to start the stage over")  # fmt: skip
    if state.tokens_seen > stage.token_budget or state.data_cursor is None:
        raise CheckpointError(f"{run.checkpoint_dir}: {state.tokens_seen:,} tokens seen, budget "
                              f"{stage.token_budget:,}, cursor {'set' if state.data_cursor else 'missing'}")  # fmt: skip
    run.loader.load_state(state.data_cursor)
    if run.main:
        log.truncate(state.step)
    return int(state.step)


def check_vocabulary(run: StageRun, tokenizer: str) -> None:
    """The model, the tokenizer and the datasets' token ids must agree."""
    from tokenizer.bbpe import BBPETokenizer

    vocab = run.state.model.spec.vocab_size
    size = BBPETokenizer.load(tokenizer).vocab_size
    if size != vocab:
        raise ConfigError(f"{stage_label(run.index, run.name)}: the model has vocab_size {vocab:,} but the tokenizer at "
                          f"{tokenizer} has {size:,}; set run.vocab_size = {size}")  # fmt: skip
    for source in run.loader.sources:
        if len(source.tokens) and int(source.tokens.max()) >= vocab:
            raise DataError(f"{source.key}: token ids up to {int(source.tokens.max())}, beyond the model's "
                            f"vocabulary ({vocab:,}); was it prepared with another tokenizer?")  # fmt: skip


def write_identity(directory: Path, name: str, index: int, identity: str) -> None:
    from hanyeong.files import write_atomic

    body = {"name": name, "index": index, "identity": identity}
    write_atomic(directory / STAGE_FILE, json.dumps(body, indent=2) + "\n")


def check_identity(directory: Path, identity: str) -> None:
    """A checkpoint is resumed only by the stage config (and input) that wrote it."""
    try:
        saved = json.loads((directory / STAGE_FILE).read_text(encoding="utf-8")).get("identity")
    except (OSError, json.JSONDecodeError, AttributeError):
        saved = None
    if saved != identity:
        raise CheckpointError(f"{directory}: its checkpoint was written by another version of this stage "
                              f"(identity {str(saved)[:12]}, now {identity[:12]}); remove the directory "
                              "to train the stage again")  # fmt: skip
