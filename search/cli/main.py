"""Command line: ``python cli.py search|pareto ...``. The only code that owns the console.

Each subcommand is a module looked up in :data:`COMMANDS`: its ``HELP``, its
``add_arguments(parser)`` and its ``run(args, console)``. A user mistake is a one-line
``error:`` and exit status 2; Ctrl-C leaves the study resumable and exits 130.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Protocol

import sqlalchemy.exc
from rich.console import Console
from rich.text import Text

from search.cli import bench, dashboard, export, models, pareto, search, serve, show, space, target
from search.cli.options import EXIT_INTERRUPTED, EXIT_USAGE
from search.errors import UsageError
from search.study.urls import without_password

__all__ = ["COMMANDS", "Command", "build_parser", "main"]


class Command(Protocol):
    """What a command module defines."""

    HELP: str
    """The one line ``cli.py --help`` shows for it."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace, console: Console) -> int: ...


COMMANDS: dict[str, Command] = {
    "search": search,
    "pareto": pareto,
    "show": show,
    "dashboard": dashboard,
    "export": export,
    "bench": bench,
    "models": models,
    "space": space,
    "target": target,
    "serve": serve,
}
"""Each command's name and its module, in the order ``--help`` lists them."""


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command: one subparser per entry of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="cli.py", description="Search structured-pruning policies for a CNN under a measured CPU latency budget."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        # No abbreviations: --workers passes the command line on to its workers without itself, which an
        # abbreviation (--worker 2) would slip past, each worker launching workers again.
        command.add_arguments(sub.add_parser(name, help=command.HELP, allow_abbrev=False))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.raw_argv = list(sys.argv[1:] if argv is None else argv)  # what --workers passes on to each worker
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    console = Console(highlight=False)
    if not console.is_terminal:  # logs and pipes: wide enough for the tables, no wrapping of lines
        console = Console(highlight=False, width=200)
    err = Console(stderr=True, highlight=False, width=None if console.is_terminal else 1000)
    try:
        return COMMANDS[args.command].run(args, console)
    except UsageError as exc:
        err.print(Text.assemble(("error: ", "bold red"), str(exc)), soft_wrap=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        err.print("[yellow]Interrupted.[/] Nothing was lost: run the same command again to resume the study.")
        return EXIT_INTERRUPTED
    except sqlalchemy.exc.OperationalError as exc:  # the study's database mid-run: full, gone away, locked
        reason = str(exc.orig if exc.orig is not None else exc).splitlines()[0]
        storage = getattr(args, "storage", None)
        reason = without_password(reason, storage) if storage else reason
        message = (
            f"the study's database failed ({type(exc.orig or exc).__name__}: {reason}); what was recorded stays: "
            "fix it (disk space, the server) and run the same command again"
        )
        err.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True)
        return EXIT_USAGE
    except OSError as exc:  # a path given on the command line that cannot be made, read or written
        where = f" {exc.filename}" if exc.filename else ""
        reason = exc.strerror or str(exc)
        message = f"cannot use{where}: {reason}; check the paths given (--studies-dir, --storage, --out, --plot)"
        err.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
