"""RUN_DIR/manifest.json: what a pipeline run has done, stage by stage.

    RUN_DIR/manifest.json                  this record, replaced atomically after every change
    RUN_DIR/tokenizer/                     the tokenizer, when the recipe trains one
    RUN_DIR/datasets/<name>/               prepared datasets (orchestration/data/prepare.py)
    RUN_DIR/stages/<NN>-<name>/            a stage: checkpoint/, metrics.jsonl, attempts.jsonl
    RUN_DIR/stages/<NN>-<name>.stale/      the previous version of a stage whose definition changed
    RUN_DIR/loss.png                       loss against cumulative tokens, one colour per stage

A stage is skipped when it is done under the same identity as the recipe's and no earlier stage
runs; every later stage of one that runs is run again, from scratch when its identity changed.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from hanyeong.errors import ConfigError

FORMAT, VERSION = "hanyeong-run", 1
MANIFEST_FILE = "manifest.json"
STATUSES = ("pending", "running", "done", "failed")
RUN_ENTRIES = {MANIFEST_FILE, "tokenizer", "datasets", "stages", "loss.png"}


@dataclass
class StageRecord:
    """One stage of the run, as the manifest keeps it."""

    name: str
    kind: str
    identity: str
    """Recipe.stage_identities() entry, plus the tokenizer and data the stage reads."""
    dir: str
    """Stage folder, relative to the run directory (stages/<NN>-<name>)."""
    token_budget: int = 0
    status: str = "pending"
    """pending | running | done | failed."""
    tokens: int = 0
    """Tokens trained on when the stage last reported (all of them once done)."""
    steps: int = 0
    checkpoint: str | None = None
    """Final checkpoint directory once done, relative to the run directory."""
    seconds: float = 0.0
    """Wall time of the stage's task(s), seen by the driver, summed over runs of the pipeline."""
    run_seconds: float = 0.0
    """run_stage's own wall time (its last attempt): setup, steps and checkpoints."""
    attempts: int = 0
    """Times a worker started the stage (Ray retries a killed worker; a rerun resumes)."""
    first_loss: float | None = None
    last_loss: float | None = None
    resumed_from_step: int | None = None
    error: str | None = None


@dataclass
class RunManifest:
    recipe: dict
    """{"path": the recipe file, "sha256": its bytes' hash}."""
    name: str
    backend: str = ""
    stages: list[StageRecord] = field(default_factory=list)
    tokenizer: dict = field(default_factory=dict)
    """{"path", "sha256", "trained": bool}."""
    datasets: dict = field(default_factory=dict)
    """name -> {"path", "content_hash"}."""
    timings: dict = field(default_factory=dict)
    """Seconds of the last `pipeline run`: ray_start, tokenizer, datasets, stages, report, total."""

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, **asdict(self)}

    def save(self, run_dir: Path) -> None:
        """Replace RUN_DIR/manifest.json in one rename, so a crash never leaves half of it."""
        from hanyeong.files import write_atomic

        write_atomic(Path(run_dir) / MANIFEST_FILE, json.dumps(self.to_dict(), ensure_ascii=False, indent=2) + "\n")


def load_manifest(run_dir: str | Path) -> RunManifest | None:
    """The run's manifest, or None for a new (missing or empty) run directory."""
    run_dir = Path(run_dir)
    file = run_dir / MANIFEST_FILE
    if not file.is_file():
        if run_dir.is_dir() and any(p.name not in RUN_ENTRIES and not p.name.startswith(".") for p in run_dir.iterdir()):
            raise ConfigError(f"{run_dir}: not a hanyeong run directory (no {MANIFEST_FILE}, other files in it)")
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{file}: damaged ({err})") from None
    if data.pop("format", None) != FORMAT or data.pop("version", None) != VERSION:
        raise ConfigError(f"{file}: not a {FORMAT} v{VERSION} manifest")
    known = {f.name for f in fields(StageRecord)}
    data["stages"] = [StageRecord(**{k: v for k, v in s.items() if k in known}) for s in data.get("stages", [])]
    return RunManifest(**data)


def require_manifest(run_dir: str | Path) -> RunManifest:
    manifest = load_manifest(run_dir)
    if manifest is None:
        raise ConfigError(f"{run_dir}: no {MANIFEST_FILE}; start the run with `hanyeong pipeline run RECIPE --run-dir {run_dir}`")
    return manifest


def run_tokenizer(checkpoint: str | Path) -> Path | None:
    """The tokenizer a checkpoint was trained with, when it lies in a run directory
    (RUN_DIR/stages/NN-name/checkpoint): the one the run's manifest names, else RUN_DIR/tokenizer
    (a run directory that moved); None for a checkpoint outside a run."""
    from tokenizer.bbpe import TOKENIZER_FILE

    checkpoint = Path(checkpoint).resolve()
    for run_dir in checkpoint.parents[:3]:
        if not (run_dir / MANIFEST_FILE).is_file():
            continue
        try:
            manifest = load_manifest(run_dir)
        except ConfigError:  # not a run's manifest (a dataset's, say): look further up
            continue
        named = manifest.tokenizer.get("path") if manifest else None
        for candidate in ([Path(named)] if named else []) + [run_dir / "tokenizer"]:
            if (candidate / TOKENIZER_FILE).is_file():
                return candidate
    return None


def stage_dir_name(index: int, name: str) -> str:
    return f"stages/{index + 1:02d}-{name}"


def plan_stages(old: RunManifest | None, wanted: list[StageRecord]) -> tuple[list[StageRecord], int]:
    """Merge the recipe's stages with what the old manifest recorded.

    Returns the records to keep (old ones where the identity is unchanged) and the index of the
    first stage to run (len(wanted) when every stage is done).
    """
    previous = {(s.dir, s.identity): s for s in old.stages} if old else {}
    records, first = [], len(wanted)
    for i, want in enumerate(wanted):
        have = previous.get((want.dir, want.identity))
        record = have if have is not None else want
        record.token_budget = want.token_budget
        if first == len(wanted) and record.status != "done":
            first = i
        records.append(record)
    return records, first


def reset_stage(run_dir: Path, record: StageRecord, keep: bool) -> str | None:
    """Before a stage runs: with `keep` (same identity) its folder stays and the stage resumes from
    its checkpoint; otherwise the folder moves to <dir>.stale (replacing an older one) so nothing
    stale is resumed. Returns the folder it was moved to, if any."""
    folder = run_dir / record.dir
    moved = None
    if not keep and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()  # a stage that never started: nothing to keep, nothing to announce
    if not keep and folder.exists():
        stale = folder.with_name(folder.name + ".stale")
        shutil.rmtree(stale, ignore_errors=True)
        folder.rename(stale)
        moved = str(stale)
    if not keep:
        fresh = StageRecord(record.name, record.kind, record.identity, record.dir, record.token_budget)
        for f in fields(StageRecord):
            setattr(record, f.name, getattr(fresh, f.name))
    folder.mkdir(parents=True, exist_ok=True)
    return moved
