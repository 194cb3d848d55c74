"""``superweight directory``: known super weights."""

from __future__ import annotations

import argparse

from rich.markup import escape
from rich.table import Table

from superweight.cli.common import add_output_arguments, console, emit_json
from superweight.directory import load_directory, lookup


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "directory", help="print known super weights",
        description="Print the directory of known super weights (exact model id, case-insensitive).",
    )
    parser.add_argument("model", nargs="?", help="model id; all models when omitted")
    add_output_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.model:
        entry = lookup(args.model)
        if entry is None:
            known = ", ".join(e.model for e in load_directory().values())
            raise ValueError(
                f"{args.model!r} is not in the directory (ids match exactly, ignoring case); known: {known}. "
                f"Find its super weights with `superweight detect {args.model} --verify`"
            )
        entries = [entry]
    else:
        entries = list(load_directory().values())
    if not args.json:
        table = Table(title=escape("Known super weights: layer [row, col] (nn.Linear convention)"), title_justify="left")
        table.add_column("model")
        table.add_column("super weights")
        table.add_column("source / note")
        for e in entries:
            notes = e.source + (f"\n{e.note}" if e.note else "")
            table.add_row(escape(e.model), escape("\n".join(str(sw) for sw in e.super_weights)), escape(notes))
        console.print(table)
    emit_json(args, {"models": [e.to_dict() for e in entries]})
    return 0
