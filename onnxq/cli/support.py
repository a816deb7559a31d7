"""What every `onnxq` subcommand shares: one-line errors and their exit codes.

`OneLineCommand` and `OneLineGroup` (the `onnxq` group itself: an unknown subcommand, a bad
group option) make click's own usage errors one line as well.
`reports_errors` wraps a command body: an `OnnxqError` becomes `onnxq: error: <message>` on
stderr with the error's exit code (2 bad input, 3 failed verification); any other exception
is an internal error (exit 1), still one line unless ONNXQ_DEBUG is set.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import TypeVar

import click

from onnxq.errors import OnnxqError

F = TypeVar("F", bound=Callable)


def fail(message: str, code: int) -> None:
    click.echo(f"onnxq: error: {message}", err=True)
    sys.exit(code)


def _fail_usage(error: click.UsageError, info_name: str | None) -> None:
    """Click's usage error as `onnxq: error: <message> (see '<command> --help')`, its exit code (2).

    A bare group or command that shows its help when called without arguments
    (`NoArgsIsHelpError`, click >= 8.2) is not an error to rewrite: it is re-raised.
    """
    if isinstance(error, getattr(click.exceptions, "NoArgsIsHelpError", ())):
        raise error
    command = error.ctx.command_path if error.ctx else " ".join(filter(None, ("onnxq", info_name)))
    fail(f"{error.format_message()} (see '{command} --help')", error.exit_code)


class OneLineCommand(click.Command):
    """Click's usage errors (a bad option, a missing argument) as one `onnxq: error:` line too."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: object) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as error:
            _fail_usage(error, info_name)


class OneLineGroup(click.Group):
    """The group's usage errors (a bad group option, an unknown subcommand) as one line too.

    Its subcommands are `OneLineCommand`s and report their own usage errors.
    """

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: object) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as error:
            _fail_usage(error, info_name)

    def resolve_command(self, ctx: click.Context,
                        args: list[str]) -> tuple[str | None, click.Command | None, list[str]]:
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as error:
            _fail_usage(error, ctx.info_name)


def reports_errors(function: F) -> F:
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except OnnxqError as error:
            fail(str(error), error.exit_code)
        except Exception as error:  # a bug: still one line, with the trace when asked for
            if os.environ.get("ONNXQ_DEBUG"):
                raise
            fail(f"internal error ({type(error).__name__}: {error}); set ONNXQ_DEBUG=1 for the "
                 f"traceback", 1)

    return wrapper  # type: ignore[return-value]
