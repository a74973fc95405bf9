"""Every command's --help reads like the README's table: CKPT OUT in the usage line, no `{ckpt}`,
`<bool>`, `<path>` placeholders."""

from __future__ import annotations

import re

import pytest
import typer.main
from typer.testing import CliRunner

from orchestration.cli import app

PLACEHOLDER = re.compile(r"[{}]|<(bool|path|int|str|float|list)\b", re.IGNORECASE)


def command_paths(command, path=()):
    yield path
    for name, sub in getattr(command, "commands", {}).items():
        yield from command_paths(sub, (*path, name))


def help_text(path) -> str:
    result = CliRunner().invoke(app, [*path, "--help"], prog_name="hanyeong", env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("path", list(command_paths(typer.main.get_command(app))), ids=lambda p: " ".join(p) or "hanyeong")
def test_help_has_no_placeholders(path):
    text = help_text(path)
    assert "Usage: hanyeong" in text
    assert not [line for line in text.splitlines() if PLACEHOLDER.search(line)], text


def test_usage_names_arguments_in_capitals():
    def usage(*path: str) -> str:
        return help_text(path).split("\n\n")[0]

    assert "hanyeong model export-hf [OPTIONS] CKPT OUT" in usage("model", "export-hf")
    assert "hanyeong pipeline run [OPTIONS] RECIPE" in usage("pipeline", "run")
    assert "hanyeong tokenizer train [OPTIONS] CORPUS..." in usage("tokenizer", "train")
    assert "hanyeong data prepare [OPTIONS] [INPUTS]..." in usage("data", "prepare")


def test_a_missing_argument_is_named_in_capitals():
    result = CliRunner().invoke(app, ["model", "export-hf"], env={"COLUMNS": "100"})
    assert result.exit_code == 2 and "Missing argument 'CKPT'" in result.output
