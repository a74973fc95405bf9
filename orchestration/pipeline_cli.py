"""`hanyeong pipeline ...`: run a recipe on Ray, and show a run's stages.

Commands parse options, make one library call and print a summary; Ray, the frameworks and
matplotlib are imported inside the command bodies so `hanyeong --help` stays fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

app = typer.Typer(help="Run a recipe's stages (tokenizer, data, pretraining, SFT) on Ray, resumably.",
                  no_args_is_help=True)  # fmt: skip

RunDirOption = typer.Option(..., "--run-dir", "-r", help="Run directory: manifest.json, tokenizer/, datasets/, stages/, loss.png.")


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="Recipe TOML (see recipes/quickstart.toml)."),
    run_dir: Path = RunDirOption,
    address: str = typer.Option(None, help="Join this Ray cluster (e.g. auto, or HEAD:6379) instead of starting a local Ray; "
                                "the run directory must be on storage every node shares."),
    num_cpus: int = typer.Option(None, help="CPUs of the local Ray (default: all cores)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved recipe and the stage identities, and exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Run RECIPE in RUN_DIR: finished stages are skipped, an interrupted one resumes from its checkpoint."""
    from orchestration.pipeline import run_pipeline

    if dry_run:
        from orchestration.recipe import load_recipe

        loaded = load_recipe(recipe)
        typer.echo(json.dumps({**loaded.to_dict(), "stage_identities": loaded.stage_identities()},
                              ensure_ascii=False, indent=2))  # fmt: skip
        return
    try:
        summary = run_pipeline(recipe, run_dir, address=address, num_cpus=num_cpus, progress=not quiet,
                               echo=lambda line: typer.echo(line, err=True))  # fmt: skip
    except KeyboardInterrupt:
        typer.echo(f"interrupted: rerun the same command to resume from the last checkpoint", err=True)
        raise typer.Exit(130) from None
    t = summary["timings"]
    if summary["ran"]:
        typer.echo(f"{run_dir}: ran {', '.join(summary['ran'])}" +
                   (f" (skipped {', '.join(summary['skipped'])})" if summary["skipped"] else "") +
                   f" in {t['total']:.1f} s; loss curve {run_dir / 'loss.png'} (hanyeong pipeline status --run-dir {run_dir})")  # fmt: skip
    else:
        typer.echo(f"{run_dir}: up to date, no stage ran ({len(summary['skipped'])} done)")


@app.command()
def status(
    run_dir: Path = RunDirOption,
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """A table of the run's stages: status, tokens against budget, last loss, wall time, checkpoint."""
    from orchestration.run_manifest import require_manifest
    from orchestration.run_report import COLUMNS, status_rows

    manifest = require_manifest(run_dir)
    if as_json:
        typer.echo(json.dumps(manifest.to_dict(), ensure_ascii=False, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{manifest.name} ({manifest.backend or 'backend not chosen yet'}): {manifest.recipe['path']}")
    for column in COLUMNS:
        table.add_column(column, justify="right" if column in ("tokens / budget", "last loss", "wall", "attempts") else "left",
                         no_wrap=column != "status", overflow="fold")  # fmt: skip
    for row in status_rows(manifest, run_dir):
        table.add_row(*row)
    console = Console(file=sys.stdout)
    if not console.is_terminal:  # a pipe or a log: the whole row on one line
        console = Console(file=sys.stdout, width=200)
    console.print(table)
    t = manifest.timings
    if t:
        parts = ", ".join(f"{k.replace('_', ' ')} {t[k]:.1f} s" for k in ("ray_start", "tokenizer", "datasets", "stages") if k in t)
        typer.echo(f"last `pipeline run`: {t['total']:.1f} s ({parts}); loss curve {Path(run_dir) / 'loss.png'}")
