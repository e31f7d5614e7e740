"""Command-line helpers shared by the experiments' ``add_arguments``: :func:`add_list_argument`."""

from __future__ import annotations

import argparse

__all__ = ["add_list_argument"]



class _FlattenLists(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [x for chunk in values for x in chunk])


def add_list_argument(parser: argparse.ArgumentParser, flag: str, *, dest: str, item: type = str,
                      metavar: str = "X", help: str = "") -> None:
    """A flag taking one or more values, space- or comma-separated (``--emotions desperate calm`` or
    ``--emotions desperate,calm``; two-word emotions need quotes: ``--emotions "at ease"``). Negative numbers work
    space-separated (``--strengths -0.1 0.1``) or after ``=`` (``--strengths=-0.1,0.1``). Default None."""

    def parse(text: str) -> list:
        parts = [x.strip() for x in text.split(",") if x.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"{flag}: expected a value; got {text!r}")
        try:
            return [item(x) for x in parts]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag}: expected {item.__name__} values; got {text!r}") from None

    parser.add_argument(flag, dest=dest, nargs="+", type=parse, action=_FlattenLists, default=None, metavar=metavar,
                        help=help + " (space- or comma-separated)")
