"""The `hanyeong` command: one Typer app with a sub-app per part of the toolkit."""

from __future__ import annotations

import sys

import typer

from orchestration.data.cli import app as data_app
from orchestration.core.cli import app as model_app
from orchestration.pipeline.cli import app as pipeline_app
from tokenizer.cli import app as tokenizer_app
from hanyeong.errors import HanyeongError

app = typer.Typer(
    help="hanyeong (한영): train Korean/English language models the way the EXAONE reports describe.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(tokenizer_app, name="tokenizer")
app.add_typer(model_app, name="model")
app.add_typer(data_app, name="data")
app.add_typer(pipeline_app, name="pipeline")


def main() -> None:
    """Console entry point: a user mistake is one line on stderr and exit code 1, never a traceback."""
    try:
        app()
    except HanyeongError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except OSError as err:  # missing files, permissions, full disk
        print(f"error: {err.strerror or err}: {err.filename or ''}".rstrip(": "), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
