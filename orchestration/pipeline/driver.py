"""`run_pipeline(recipe, run_dir)`: a recipe from tokenizer to its last stage, resumable.

1) the tokenizer: the recipe's `path`, or trained into RUN_DIR/tokenizer (once);
2) the datasets: prepared into RUN_DIR/datasets/<name> (a no-op when up to date);
3) the stages, each a Ray task (orchestration/pipeline/runner.py), skipping those done under the same
   identity; the manifest (orchestration/pipeline/run_manifest.py) is rewritten at every change;
4) RUN_DIR/loss.png, RUN_DIR/report.md and, for stages with [stage.eval], RUN_DIR/eval.png.

One Ray session serves the data preparation and the stages; it starts only when there is work for
it, so rerunning a finished recipe starts no Ray at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from contextlib import ExitStack
from pathlib import Path

from orchestration.pipeline import run_manifest as rm
from orchestration.pipeline.run_lock import run_lock
from hanyeong.errors import HanyeongError

TOKENIZER_SETTINGS = "hanyeong-settings.json"  # beside the trained tokenizer: what it was trained from


def _noop(_: str) -> None:
    pass


def run_pipeline(recipe_path: str | Path, run_dir: str | Path, address: str | None = None,
                 num_cpus: int | None = None, progress: bool = False, echo=_noop) -> dict:  # fmt: skip
    """Run (or resume) the recipe in `run_dir`; returns {"ran", "skipped", "timings", "manifest"}.

    Raises StageFailed (one line naming the stage) when a stage raises or its worker keeps dying;
    the manifest then marks it failed and earlier stages keep their checkpoints.
    """
    from orchestration.pipeline.recipe import load_recipe

    started = time.perf_counter()
    recipe_path, run_dir = Path(recipe_path), Path(run_dir).resolve()
    recipe = load_recipe(recipe_path)
    recipe.check_inputs()
    old = rm.load_manifest(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = rm.RunManifest({"path": str(recipe_path.resolve()), "sha256": _sha256(recipe_path.read_bytes())},
                              recipe.run.name, backend=old.backend if old else "", stages=old.stages if old else [],
                              timings=old.timings if old else {})  # fmt: skip
    timings: dict[str, float] = {}
    with run_lock(run_dir):
        ran, skipped = prepare_and_run(recipe, old, manifest, run_dir, address, num_cpus, progress, echo, timings)
        if ran or not (run_dir / "loss.png").is_file():
            clock = time.perf_counter()
            from orchestration.pipeline.run_report import plot_evals, plot_losses, write_report

            plot_losses(run_dir, manifest)
            plot_evals(run_dir, manifest)
            write_report(run_dir, manifest)
            timings["report"] = time.perf_counter() - clock
        timings["total"] = time.perf_counter() - started
        if ran or not manifest.timings:  # a rerun with nothing to do keeps the last real run's figures
            manifest.timings = {k: round(v, 3) for k, v in timings.items()}
        manifest.save(run_dir)
    return {"ran": ran, "skipped": skipped, "timings": manifest.timings, "manifest": manifest}


def prepare_and_run(recipe, old, manifest: rm.RunManifest, run_dir: Path, address: str | None,
                    num_cpus: int | None, progress: bool, echo, timings: dict) -> tuple[list[str], list[str]]:  # fmt: skip
    """Tokenizer, datasets, then the stages not done yet, in one Ray session; (ran, skipped)."""
    with ExitStack() as stack:
        ray_holder = RayHolder(stack, num_cpus, address, timings)
        if address is not None:
            ray_holder.get()  # a cluster that cannot be joined fails now, not after the tokenizer
        clock = time.perf_counter()
        manifest.tokenizer = prepare_tokenizer(recipe, run_dir, num_cpus, progress, echo)
        manifest.save(run_dir)
        timings["tokenizer"] = time.perf_counter() - clock
        clock, ray_before = time.perf_counter(), timings.get("ray_start", 0.0)
        if any(d.path is None and not (run_dir / "datasets" / d.name / "manifest.json").is_file()
               for d in recipe.run.datasets):  # fmt: skip
            ray_holder.get()  # a dataset to build: the same Ray then runs the stages
        manifest.datasets = prepare_datasets(recipe, run_dir, manifest.tokenizer["path"], num_cpus, address, progress, echo)
        timings["datasets"] = time.perf_counter() - clock - (timings.get("ray_start", 0.0) - ray_before)
        records, first = rm.plan_stages(old, wanted_stages(recipe, manifest))
        manifest.stages = records
        skipped, ran = [r.name for r in records[:first]], []
        if first < len(records):
            for name in skipped:
                echo(f"skip {name}: done with the same identity")
            from orchestration.pipeline.runner import run_stages

            run_stages(recipe, manifest, run_dir, first, ray_holder.get(), progress, echo, ran, timings)
    return ran, skipped


class RayHolder:
    """Starts the Ray session on first use (and times it); the ExitStack shuts it down."""

    def __init__(self, stack: ExitStack, num_cpus: int | None, address: str | None, timings: dict):
        self.stack, self.num_cpus, self.address, self.timings, self.ray = stack, num_cpus, address, timings, None

    def get(self):
        if self.ray is None:
            from orchestration.pipeline.runner import local_resources, ray_session

            clock = time.perf_counter()
            self.stack.callback(self._timed_shutdown_end)
            self.ray = self.stack.enter_context(ray_session(self.num_cpus, self.address, local_resources()))
            self.stack.callback(self._timed_shutdown_start)
            self.timings["ray_start"] = time.perf_counter() - clock
        return self.ray

    def _timed_shutdown_start(self) -> None:
        self._shutdown_clock = time.perf_counter()

    def _timed_shutdown_end(self) -> None:
        self.timings["ray_shutdown"] = time.perf_counter() - self._shutdown_clock


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def prepare_tokenizer(recipe, run_dir: Path, num_cpus: int | None, progress: bool, echo) -> dict:
    """{"path", "sha256", "trained"}: the recipe's tokenizer, or one trained into RUN_DIR/tokenizer
    (kept while the recipe's [run.tokenizer] is unchanged; delete the folder to retrain)."""
    from hanyeong.files import write_atomic
    from tokenizer.bbpe import TOKENIZER_FILE
    from tokenizer.train import default_cache_dir, train_tokenizer

    config = recipe.run.tokenizer
    if config.path is not None:
        return {"path": config.path, "sha256": _sha256((Path(config.path) / TOKENIZER_FILE).read_bytes()), "trained": False}
    out = run_dir / "tokenizer"
    from orchestration.pipeline.recipe import tokenizer_identity

    # by content, not paths: a moved repository (or inputs) with the same bytes keeps the tokenizer
    settings = json.dumps(tokenizer_identity(config), sort_keys=True, ensure_ascii=False)
    marker = out / TOKENIZER_SETTINGS
    if not ((out / TOKENIZER_FILE).is_file() and marker.is_file() and marker.read_text(encoding="utf-8") == settings):
        echo(f"training the tokenizer ({config.train.vocab_size:,} ids) into {out}")
        tmp = run_dir / ".tokenizer.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        train_tokenizer(list(config.train_inputs), tmp, config.train, workers=max(1, num_cpus or os.cpu_count() or 1),
                        progress=progress, cache_dir=default_cache_dir())  # fmt: skip
        write_atomic(tmp / TOKENIZER_SETTINGS, settings)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return {"path": str(out), "sha256": _sha256((out / TOKENIZER_FILE).read_bytes()), "trained": True}


def prepare_datasets(recipe, run_dir: Path, tokenizer: str, num_cpus: int | None, address: str | None,
                     progress: bool, echo) -> dict:  # fmt: skip
    """name -> {"path", "content_hash"}: each dataset prepared (or checked up to date)."""
    from orchestration.data.manifest import read_manifest

    out = {}
    for dataset in recipe.run.datasets:
        if dataset.path is not None:
            manifest = read_manifest(dataset.path)
            out[dataset.name] = {"path": dataset.path, "content_hash": manifest["content_hash"]}
            continue
        folder = run_dir / "datasets" / dataset.name
        try:
            manifest = dataset.prepare(tokenizer, folder, progress=progress, num_cpus=num_cpus, address=address)
        except HanyeongError as err:
            raise type(err)(f"dataset {dataset.name!r}: {err}") from None
        if not manifest.get("up_to_date"):
            echo(f"prepared dataset {dataset.name}: {_tokens(manifest):,} tokens in {folder}")
        out[dataset.name] = {"path": str(folder), "content_hash": manifest["content_hash"]}
    return out


def _tokens(manifest: dict) -> int:
    return sum(s.get("tokens", 0) for s in manifest.get("sources", {}).values())


def wanted_stages(recipe, manifest: rm.RunManifest) -> list[rm.StageRecord]:
    """The recipe's stages as fresh records. Identity: Recipe.stage_identities() (config and what
    the stage starts from) plus the tokenizer's and the stage's datasets' content hashes, so a
    retrained tokenizer or rebuilt data reruns the stages that read it."""
    records = []
    for i, (stage, identity) in enumerate(zip(recipe.stages, recipe.stage_identities())):
        names = sorted({e.dataset for e in (*stage.data.sources, *stage.data.replay)})
        inputs = {"recipe": identity, "tokenizer": manifest.tokenizer["sha256"],
                  "datasets": {n: manifest.datasets[n]["content_hash"] for n in names}}  # fmt: skip
        full = _sha256(json.dumps(inputs, sort_keys=True).encode("utf-8"))
        records.append(rm.StageRecord(stage.name, stage.kind, full, rm.stage_dir_name(i, stage.name), stage.token_budget))
    return records
