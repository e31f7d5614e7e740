"""The ``emokern`` command line (console script ``emokern``, also ``python -m emokern``).

Subcommands live in :data:`COMMANDS`. To add one, decorate a function ``run(args) -> int`` with :func:`command`,
giving its name, one-line help and a function that adds its arguments to its subparser::

    @command("find", help="find emotion vectors", arguments=_find_arguments)
    def _find(args) -> int:
        ...

Each command imports what it needs inside ``run`` so that ``emokern --help`` and light commands stay fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Callable, Sequence

__all__ = ["COMMANDS", "Command", "build_parser", "command", "main"]


@dataclasses.dataclass(frozen=True)
class Command:
    """A subcommand: ``name`` on the command line, ``help`` in the listing, ``arguments(parser)`` adds its options,
    ``run(args)`` does the work and returns the exit status."""

    name: str
    help: str
    run: Callable[[argparse.Namespace], int]
    arguments: Callable[[argparse.ArgumentParser], None] | None = None


COMMANDS: dict[str, Command] = {}


def command(name: str, *, help: str, arguments: Callable[[argparse.ArgumentParser], None] | None = None):
    """Decorator registering ``run(args) -> int`` as subcommand ``name`` in :data:`COMMANDS`."""

    def register(run: Callable[[argparse.Namespace], int]):
        if name in COMMANDS:
            raise ValueError(f"command: name {name!r} is already registered")
        COMMANDS[name] = Command(name=name, help=help, run=run, arguments=arguments)
        return run

    return register


def _human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _models_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", default=None,
                        help="cache root to inspect (default: $EMOKERN_CACHE, else ~/.cache/emokern/models)")
    parser.add_argument("--json", action="store_true", help="print list_models() as JSON instead of a table")


@command("models", help="list the embedded offline models: installed, cached, sizes, licences",
         arguments=_models_arguments)
def _models(args: argparse.Namespace) -> int:
    from emokern.models import cache_root, list_models

    rows = list_models(cache_dir=args.cache_dir)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ["NAME", "DEFAULT", "INSTALLED", "GGUF", "CACHED", "CACHE", "LICENCE"]
    table = [header] + [
        [r["name"], "*" if r["default"] else "", "yes" if r["installed"] else "no", _human_bytes(r["gguf_bytes"]),
         "yes" if r["cached"] else "no", _human_bytes(r["cache_bytes"]), r["licence"]]
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    print(f"\ncache root: {cache_root(args.cache_dir)}")
    for r in rows:
        if not r["installed"] and not r["cached"]:
            print(f"install {r['name']}: {r['install']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per entry of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(prog="emokern", description="Find, read and steer emotion vectors in LMs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        if cmd.arguments is not None:
            cmd.arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    No subcommand prints the help to stderr and returns 2, like an argparse usage error.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return COMMANDS[args.command].run(args)


def _register_report() -> None:
    from emokern.report import add_report_arguments, report_command

    command("report", help="validation report for a bank: accuracy, geometry, logit lens, external text (JSON, PNG, HTML)",
            arguments=add_report_arguments)(report_command)


_register_report()
