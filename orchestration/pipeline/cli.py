"""`hanyeong pipeline ...`: run a recipe on Ray here (`run`) or as a job on a cluster (`submit`,
then `status|logs|stop --address`), and show a run's stages.

Commands parse options, make one library call and print a summary; Ray, the frameworks and
matplotlib are imported inside the command bodies so `hanyeong --help` stays fast.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import typer

from hanyeong.errors import ConfigError

app = typer.Typer(help="Run a recipe's stages (tokenizer, data, pretraining, SFT) on Ray, resumably.",
                  no_args_is_help=True)  # fmt: skip

RunDirOption = typer.Option(..., "--run-dir", "-r", help="Run directory: manifest.json, tokenizer/, datasets/, stages/, loss.png.")
AddressOption = typer.Option(None, "--address", help="The cluster's Ray dashboard, e.g. http://HEAD:8265 (the Jobs API).")


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="Recipe TOML (see recipes/quickstart.toml)."),
    run_dir: Path = RunDirOption,
    address: str = typer.Option(None, help="Join this Ray cluster (e.g. auto, or HEAD:6379) instead of starting a local Ray; "
                                "the run directory must be on storage every node shares."),
    num_cpus: int = typer.Option(None, help="CPUs of the local Ray (default: all cores)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved recipe and the stage identities, and exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    in_job: bool = typer.Option(False, "--in-job", hidden=True, help="Set by `pipeline submit`: run from a copy of the "
                                "job's working directory in RUN_DIR/.job (orchestration/cluster/jobs.py copy_working_dir)."),
) -> None:
    """Run RECIPE in RUN_DIR: finished stages are skipped, an interrupted one resumes from its checkpoint."""
    from hanyeong.console import note
    from orchestration.pipeline.driver import run_pipeline

    if in_job:
        from orchestration.cluster.jobs import copy_working_dir

        recipe = copy_working_dir(recipe, run_dir)
    if dry_run:
        from orchestration.pipeline.recipe import load_recipe

        loaded = load_recipe(recipe)
        typer.echo(json.dumps({**loaded.to_dict(), "stage_identities": loaded.stage_identities()},
                              ensure_ascii=False, indent=2))  # fmt: skip
        return
    try:
        summary = run_pipeline(recipe, run_dir, address=address, num_cpus=num_cpus, progress=not quiet,
                               echo=note)  # fmt: skip
    except KeyboardInterrupt:
        typer.echo("interrupted: rerun the same command to resume from the last checkpoint", err=True)
        raise typer.Exit(130) from None
    t = summary["timings"]
    if summary["ran"]:
        typer.echo(f"{run_dir}: ran {', '.join(summary['ran'])}" +
                   (f" (skipped {', '.join(summary['skipped'])})" if summary["skipped"] else "") +
                   f" in {t['total']:.1f} s; loss curve {run_dir / 'loss.png'} (hanyeong pipeline status --run-dir {run_dir})")  # fmt: skip
    else:
        typer.echo(f"{run_dir}: up to date, no stage ran (all {len(summary['skipped'])} done; "
                   f"hanyeong pipeline status --run-dir {run_dir})")  # fmt: skip


@app.command()
def status(
    job: str = typer.Argument(None, help="With --address: the job id `pipeline submit` printed (none: list the jobs)."),
    run_dir: Path = typer.Option(None, "--run-dir", "-r", help="Run directory: manifest.json, tokenizer/, datasets/, stages/, loss.png. "
                                 "With --address: where the job's run directory is mounted here, if not at the same path."),
    address: str = AddressOption,
    as_json: bool = typer.Option(False, "--json", help="Print the manifest (with --address: the job and the manifest) as JSON."),
) -> None:
    """A table of the run's stages: status, tokens against budget, last loss, wall time, checkpoint.

    With --address ADDR JOB: the job's state, and the same table when its run directory is readable here."""
    if address is None:
        if job is not None:
            raise ConfigError(f"pipeline status {job}: a job id needs --address http://HEAD:8265")
        if run_dir is None:
            raise ConfigError("pipeline status: give --run-dir DIR, or --address http://HEAD:8265 [JOB]")
        _print_run(run_dir, as_json)
        return
    from orchestration.cluster import job_client
    from orchestration.cluster import jobs

    if job is None:
        _print_jobs(address, job_client.list_jobs(address))
        return
    info = job_client.job_info(address, job)
    local = jobs.local_run_dir(info, run_dir)
    if as_json:
        from orchestration.pipeline.run_manifest import load_manifest

        manifest = load_manifest(local[0]) if local[0] else None
        typer.echo(json.dumps({"job": _jsonable(info), "manifest": manifest.to_dict() if manifest else None},
                              ensure_ascii=False, indent=2))  # fmt: skip
        return
    for line in _describe_job(address, info):
        typer.echo(line)
    if local[0] is not None:
        _print_run(local[0], False)
    else:
        typer.echo(local[1])


@app.command()
def submit(
    recipe: Path = typer.Argument(..., help="Recipe TOML, inside the working directory (see recipes/quickstart.toml)."),
    address: str = typer.Option(..., "--address", help="The cluster's Ray dashboard, e.g. http://HEAD:8265 (the Jobs API)."),
    run_dir: str = typer.Option(None, "--run-dir", "-r", help="Run directory on the cluster: a path (a relative one is taken "
                                "from here) or file:///path; default ~/hanyeong-runs/<run name>, ~ expanded there. With several "
                                "nodes it must be on storage they all mount. The same directory again resumes the run."),
    working_dir: Path = typer.Option(None, "--working-dir", help="Folder copied to the job (default: the current one); holds "
                                     "the recipe and its data. .git, runs/, virtualenvs, caches and the run dir are left out."),
    submission_id: str = typer.Option(None, "--submission-id", help="The job's id (default: one Ray makes up)."),
    pip: list[str] = typer.Option(None, "--pip", help="Extra pip requirement installed in the job's env (repeatable); "
                                  "torch, ray and the other dependencies must already be in the cluster's python."),
    env: list[str] = typer.Option(None, "--env", help="KEY=VALUE set for the job and its stages (repeatable)."),
    wait: bool = typer.Option(False, "--wait", help="Follow the job's output until it ends; exit 0 only if it succeeded."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the entrypoint, runtime env and upload sizes, and exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the job id."),
) -> None:
    """Run RECIPE as a job on a Ray cluster (Jobs API), with this machine's code and working directory.

    The stages run on the cluster's nodes; their Python needs hanyeong's dependencies (torch, ray,
    tokenizers, kiwipiepy, pyarrow, ...), not hanyeong itself: its packages travel with the job."""
    from orchestration.cluster import job_client
    from orchestration.cluster import jobs

    spec = jobs.build_job(recipe, working_dir, run_dir, submission_id, tuple(pip or ()), _env_pairs(env or []),
                          echo=lambda line: typer.echo(line, err=True))  # fmt: skip
    if dry_run:
        typer.echo(json.dumps({"entrypoint": spec.entrypoint, "runtime_env": spec.runtime_env, "metadata": spec.metadata,
                               "upload_bytes": jobs.upload_sizes(spec)}, ensure_ascii=False, indent=2))  # fmt: skip
        return
    job = job_client.submit(address, spec)
    if quiet:
        typer.echo(job)
    else:
        typer.echo(f"submitted {job}: {spec.metadata['recipe']} -> {spec.metadata['run_dir']} (on the cluster)")
        typer.echo(f"  dashboard: {jobs.job_link(address, job)}")
        for command in (f"logs --address {address} {job} --follow", f"status --address {address} {job}",
                        f"stop --address {address} {job}"):  # fmt: skip
            typer.echo(f"  {command.split()[0] + ':':<10} hanyeong pipeline {command}")
    if wait:
        _follow_to_the_end(address, job)


@app.command()
def logs(
    job: str = typer.Argument(..., help="The job id `pipeline submit` printed."),
    address: str = AddressOption,
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing until the job ends; exit 0 only if it succeeded."),
) -> None:
    """The job's output (its driver: tokenizer, data and stage progress, errors)."""
    from orchestration.cluster import job_client

    _require(address, "logs")
    if follow:
        _follow_to_the_end(address, job)
    else:
        typer.echo(job_client.job_logs(address, job), nl=False)


@app.command()
def stop(
    job: str = typer.Argument(..., help="The job id `pipeline submit` printed."),
    address: str = AddressOption,
) -> None:
    """Stop the job; `pipeline submit` with the same --run-dir resumes it from its last checkpoints.

    SIGTERM, then SIGKILL 3 s later; finished stages and checkpoints stay in the run directory."""
    from orchestration.cluster import job_client

    _require(address, "stop")
    if not job_client.stop_job(address, job):
        typer.echo(f"{job} had already ended: {job_client.job_info(address, job)['status']}")
        return
    info = job_client.wait_job(address, job, timeout_s=30)
    if info["status"] not in job_client.TERMINAL:
        typer.echo(f"{job}: still {info['status']} 30 s after the stop request (hanyeong pipeline status --address {address} {job})")
        return
    run_dir = info["metadata"].get("run_dir", "its --run-dir")
    typer.echo(f"{job}: {info['status']}; submit again with --run-dir {run_dir} to resume from the last checkpoints")


# ---- helpers ---------------------------------------------------------------------------------------


def _print_run(run_dir: Path, as_json: bool) -> None:
    """The manifest of RUN_DIR as a table (or JSON)."""
    import dataclasses

    from orchestration.pipeline.run_lock import read_driver
    from orchestration.pipeline.run_manifest import require_manifest
    from orchestration.pipeline.run_report import COLUMNS, interrupted_line, status_rows

    manifest = require_manifest(run_dir)
    driver = read_driver(run_dir)  # None: no `pipeline run` holds the directory
    if as_json:
        out = {**manifest.to_dict(), "driver": dataclasses.asdict(driver) if driver else None}
        typer.echo(json.dumps(out, ensure_ascii=False, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{manifest.name} ({manifest.backend or 'backend not chosen yet'}): {manifest.recipe['path']}")
    for column in COLUMNS:
        table.add_column(column, justify="right" if column in ("tokens / budget", "last loss", "wall", "attempts") else "left",
                         no_wrap=column not in ("status", "checkpoint", "last eval"), overflow="fold")  # fmt: skip
    alive = driver is not None and driver.alive
    for row in status_rows(manifest, run_dir, driver_alive=alive):
        table.add_row(*row)
    console = Console(file=sys.stdout)
    if not console.is_terminal:  # a pipe or a log: the whole row on one line
        console = Console(file=sys.stdout, width=200)
    console.print(table)
    if alive:
        typer.echo(f"running: `hanyeong pipeline run` {driver.describe()}, heard from {driver.heartbeat_age:.0f} s ago")
    elif driver is not None or any(s.status == "running" for s in manifest.stages):
        typer.echo(interrupted_line(manifest, run_dir, driver.describe() if driver else None))
    t = manifest.timings
    if t:
        parts = ", ".join(f"{k.replace('_', ' ')} {t[k]:.1f} s" for k in ("ray_start", "tokenizer", "datasets", "stages") if k in t)
        typer.echo(f"last `pipeline run`: {t['total']:.1f} s ({parts}); loss curve {Path(run_dir) / 'loss.png'}")


def _describe_job(address: str, info: dict) -> list[str]:
    """A few lines on a job: status and how it ended, times, recipe and run dir, entrypoint, link."""
    from orchestration.cluster.job_client import job_reason
    from orchestration.cluster.jobs import job_link

    meta, reason = info["metadata"], job_reason(info)
    lines = [f"job {info['job_id']}: {info['status']}" + (f" ({reason})" if reason else "")]
    start, end = info.get("start_time"), info.get("end_time")
    if start:
        took = f", {((end or time.time() * 1000) - start) / 1000:.0f} s" + ("" if end else " so far")
        lines.append(f"  started {_when(start)}" + (f", ended {_when(end)}" if end else "") + took)
    if meta.get("recipe"):
        lines.append(f"  recipe {meta['recipe']} (from {meta.get('working_dir', '?')}), run dir {meta.get('run_dir', '?')}")
    lines.append(f"  entrypoint: {info.get('entrypoint', '?')}")
    lines.append(f"  dashboard: {job_link(address, info['job_id'])}")
    return lines


def _when(epoch_ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch_ms / 1000)) if epoch_ms else "-"


def _print_jobs(address: str, found: list[dict]) -> None:
    if not found:
        typer.echo(f"no hanyeong jobs on the Ray cluster at {address}")
    for info in found:
        meta = info["metadata"]
        typer.echo(f"{info['job_id']}  {info['status']:<9}  {_when(info.get('start_time'))}  "
                   f"{meta.get('recipe', '?')} -> {meta.get('run_dir', '?')}")  # fmt: skip


def _follow_to_the_end(address: str, job: str) -> None:
    """Stream the job's output to stdout until it ends; exit 1 unless it succeeded."""
    from orchestration.cluster import job_client

    try:
        info = job_client.follow_logs(address, job, lambda chunk: typer.echo(chunk, nl=False))
    except KeyboardInterrupt:
        typer.echo(f"stopped following; {job} goes on (hanyeong pipeline stop --address {address} {job})", err=True)
        raise typer.Exit(130) from None
    reason = job_client.job_reason(info)
    typer.echo(f"{job}: {info['status']}" + (f" ({reason})" if reason else ""), err=True)
    if info["status"] != "SUCCEEDED":
        raise typer.Exit(1)


def _require(address: str | None, command: str) -> None:
    if not address:
        raise ConfigError(f"pipeline {command}: needs --address http://HEAD:8265 (the cluster's Ray dashboard)")


def _env_pairs(items: list[str]) -> dict:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--env {item!r}: expected KEY=VALUE")
        pairs[key] = value
    return pairs


def _jsonable(info: dict) -> dict:
    return json.loads(json.dumps(info, default=str))
