"""The `hanyeong` command: one Typer app with a sub-app per part of the toolkit."""

from __future__ import annotations

import sys

import typer
from typer.core import TyperGroup

from orchestration.data.cli import app as data_app
from orchestration.eval.cli import chat_command, eval_command
from orchestration.core.cli import app as model_app
from orchestration.pipeline.cli import app as pipeline_app
from tokenizer.cli import app as tokenizer_app
from hanyeong.errors import HanyeongError

# How `--help` names values: Typer 0.2x prints `{ckpt}` and `<path>` / `<bool>`; we print the
# README's words: CKPT OUT in the usage line, PATH / INTEGER / TEXT beside an option, nothing beside
# a flag. Older Typer versions print it so already and never call these hooks.
TYPE_WORDS = {"path": "PATH", "int": "INTEGER", "float": "FLOAT", "str": "TEXT", "text": "TEXT"}


def _argument_hooks(base: type) -> dict:
    """An argument shown by its upper-case name (`CKPT`, `[INPUTS]...`), no type beside it."""

    def get_usage_pieces(self, ctx) -> list[str]:
        name = self.metavar or self.name.upper()
        return [(name if self.required else f"[{name}]") + ("..." if self.nargs != 1 else "")]

    return {"get_usage_pieces": get_usage_pieces, "display_type_rich": lambda self, ctx: None}


def _option_hooks(base: type) -> dict:
    """An option shown with a word for its value (`--out PATH`), a flag with none."""

    def display_type_rich(self, ctx) -> str | None:
        if self.metavar is not None:
            return self.metavar
        if getattr(self, "is_flag", False) or getattr(self, "count", False):
            return None
        label = base.display_type_rich(self, ctx) or ""
        for part in ("<", ">", "..."):
            label = label.replace(part, "")
        if label[:5].lower() == "list[":
            label = label[5:-1]
        return TYPE_WORDS.get(label.lower(), label.upper())

    return {"display_type_rich": display_type_rich} if hasattr(base, "display_type_rich") else {}


def _command_hooks(base: type) -> dict:
    """A command whose parameters (its --help and those Typer adds late included) show plainly."""

    def get_params(self, ctx) -> list:
        return [plain(param) for param in base.get_params(self, ctx)]

    return {"get_params": get_params}


HOOKS = {"argument": _argument_hooks, "option": _option_hooks}
_PLAIN_CLASSES: dict[type, type] = {}


def plain(obj):
    """`obj` (a click parameter or command, and what it holds) re-classed to show --help the
    README's way: a subclass of its own class with the hooks above."""
    kind = getattr(obj, "param_type_name", None)
    if kind == "argument":
        obj.metavar = obj.metavar or obj.name.upper()  # error hints name it so: "Missing argument 'CKPT'"
    base = type(obj)
    if not getattr(base, "_plain", False):
        if base not in _PLAIN_CLASSES:
            hooks = HOOKS.get(kind, _command_hooks)(base)
            _PLAIN_CLASSES[base] = type(f"Plain{base.__name__}", (base,), {**hooks, "_plain": True})
        obj.__class__ = _PLAIN_CLASSES[base]
    for command in getattr(obj, "commands", {}).values():
        plain(command)
    return obj


class HelpGroup(TyperGroup):
    """The root group: it and every command under it show --help the README's way (`plain`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        plain(self)


app = typer.Typer(
    cls=HelpGroup,
    help="hanyeong (한영): train Korean/English language models the way the EXAONE reports describe.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(tokenizer_app, name="tokenizer")
app.add_typer(model_app, name="model")
app.add_typer(data_app, name="data")
app.add_typer(pipeline_app, name="pipeline")
app.command("eval")(eval_command)
app.command("chat")(chat_command)


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
