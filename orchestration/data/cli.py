"""`hanyeong data ...`: prepare, decontaminate, inspect, select (orchestration/sampling/select.py).

Commands parse options, load the config, make one library call and print a summary; the pipeline
(and Ray, numpy, pyarrow) is imported inside the command bodies so `hanyeong --help` stays fast.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

app = typer.Typer(
    help="Prepare training data: clean, filter, deduplicate, decontaminate, tokenize into shards.",
    no_args_is_help=True,
)

ConfigOption = typer.Option(
    None,
    "--config",
    "-c",
    help="prepare.toml (see recipes/prepare-shared.toml); default settings without it.",
)
TextFieldOption = typer.Option(
    None,
    "--text-field",
    "--text-column",
    help="Field or column holding text in the INPUTs; dotted paths (a.b) reach nested records, `*` every value. "
    "Repeat for several. Default: text.",
)


def _load(config: Path | None, dry_run: bool):
    from orchestration.data.config import load_config

    loaded = load_config(config)
    if dry_run:
        typer.echo(json.dumps(loaded.to_dict(), ensure_ascii=False, indent=2))
        raise typer.Exit()
    return loaded


def _workers(n: int | None) -> int:
    return max(1, n or os.cpu_count() or 1)


@app.command()
def prepare(
    inputs: list[str] = typer.Argument(
        None,
        help="Files or folders (as `tokenizer train` reads); a folder gives a source per top-level entry.",
    ),
    tokenizer: Path = typer.Option(
        ...,
        "--tokenizer",
        "-t",
        help="A trained tokenizer directory (its [BOS]/[EOS] ids are added).",
    ),
    out: Path = typer.Option(
        ...,
        "--out",
        "-o",
        help="Dataset folder to write: manifest.json and shards/<source>/part-NNNNN.parquet.",
    ),
    config: Path = ConfigOption,
    text_field: list[str] = TextFieldOption,
    num_cpus: int = typer.Option(None, help="CPUs of the local Ray (default: all cores)."),
    address: str = typer.Option(
        None,
        help="Ray cluster to run on (e.g. auto); the output must be on storage all nodes share.",
    ),
    force: bool = typer.Option(
        False, "--force", help="Rebuild even when the dataset is up to date."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config and exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Ingest, clean, filter, deduplicate, decontaminate and tokenize INPUTs into a dataset of shards."""
    from orchestration.data.prepare import prepare as run

    loaded = _load(config, dry_run)
    manifest = run(
        inputs or [],
        tokenizer,
        out,
        loaded,
        text_fields=text_field,
        num_cpus=_workers(num_cpus),
        address=address,
        workers=_workers(num_cpus),
        progress=not quiet,
        force=force,
    )
    steps = {s["step"]: s for s in manifest["steps"]}
    documents = steps["tokenize"]["documents"]
    if manifest.get("up_to_date"):
        typer.echo(
            f"{out} is up to date: {documents:,} documents, {steps['tokenize']['tokens']:,} tokens "
            f"(content hash {manifest['content_hash'][:12]}); --force rebuilds it"
        )
        return
    drops = ", ".join(
        f"{name} {sum(steps[name]['dropped'].values()):,}"
        for name in ("clean", "filter", "dedup", "decontaminate")
    )
    removed = ", ".join(f"{b} {n:,}" for b, n in steps["decontaminate"]["dropped"].items())
    tokenize, ingest = steps["tokenize"], steps["ingest"]
    typer.echo(
        f"wrote {out}: {documents:,} documents of {ingest['documents']:,} read, "
        f"{tokenize['tokens']:,} tokens in {tokenize['shards']} shards over "
        f"{len(manifest['sources'])} sources; dropped: {drops}"
        f"{f' ({removed})' if removed else ''}; {len(ingest['files_skipped'])} files skipped "
        f"(hanyeong data inspect {out})"
    )


@app.command()
def decontaminate(
    inputs: list[str] = typer.Argument(None, help="Files or folders to check."),
    config: Path = typer.Option(
        ..., "--config", "-c", help="A prepare.toml whose [decontaminate] lists the benchmarks."
    ),
    out: Path = typer.Option(
        ...,
        "--out",
        "-o",
        help="Folder for documents/<source>.jsonl, removed.jsonl and report.json.",
    ),
    text_field: list[str] = TextFieldOption,
    workers: int = typer.Option(None, help="Processes reading input files (default: all cores)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Remove documents that share a 50-character normalized window with a benchmark test item."""
    from orchestration.data.decontaminate_corpus import decontaminate_corpus

    loaded = _load(config, False)
    report = decontaminate_corpus(
        inputs or [],
        loaded.decontaminate,
        out,
        loaded.sources,
        text_fields=text_field,
        workers=_workers(workers),
        progress=not quiet,
    )
    docs = report["documents"]
    removed = ", ".join(f"{b} {n:,}" for b, n in docs["removed"].items()) or "none"
    typer.echo(
        f"wrote {out}: kept {docs['kept']:,} of {docs['read']:,} documents; removed {sum(docs['removed'].values()):,} "
        f"({removed}); checked at {report['check_mb_per_s']:.1f} MB/s"
    )


@app.command()
def inspect(
    dataset: Path = typer.Argument(
        ..., help="A dataset folder written by `hanyeong data prepare`."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest's counts as JSON."),
) -> None:
    """Documents, tokens and drops per source, language and rule."""
    from orchestration.data.manifest import read_manifest
    from orchestration.data.summary import print_dataset, summary

    manifest = read_manifest(dataset)
    if as_json:
        typer.echo(json.dumps(summary(manifest), ensure_ascii=False, indent=2))
    else:
        print_dataset(manifest, dataset)


@app.command()
def select(
    data: Path = typer.Argument(..., help="A finished generation job's folder (hanyeong model generate --out)."),
    by: str = typer.Option(..., help="reward:NAME (scores of hanyeong model score) or verifier:NAME "
                           "(numeric: the final number equals the reference's)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for selected.jsonl and manifest.json."),
    second: str | None = typer.Option(None, help="reward:NAME: keep only what this second reward model agrees on."),
    output: str = typer.Option("sft", help="sft: the best answer per prompt; pairs: the best against the worst."),
    min_score: float | None = typer.Option(None, help="Drop a prompt whose best answer scores below this."),
    min_margin: float = typer.Option(0.0, help="pairs: chosen above rejected by at least this, under each model."),
    unfinished: bool = typer.Option(False, "--unfinished", help="Also keep answers cut by max_new_tokens."),
) -> None:
    """Rejection sampling: keep the best answer per prompt (or best/worst pairs) by a reward model or a
    verifier, optionally only where a second reward model agrees."""
    from orchestration.sampling.select import SelectConfig
    from orchestration.sampling.select import select as run

    manifest = run(data, out, SelectConfig(by=by, second=second, output=output, min_score=min_score,
                                           min_margin=min_margin, finished_only=not unfinished))  # fmt: skip
    dropped = ", ".join(f"{n:,} {reason}" for reason, n in sorted(manifest["dropped"].items())) or "none"
    typer.echo(f"wrote {out}/selected.jsonl: kept {manifest['kept']:,} of {manifest['prompts']:,} prompts "
               f"(dropped: {dropped})")
