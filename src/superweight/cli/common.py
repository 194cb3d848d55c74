"""Options and plumbing shared by the subcommands."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.text import Text

from superweight.models import CATALOG, DEFAULT_MODEL, DTYPES, LoadedModel, ModelLoadError

log = logging.getLogger("superweight.cli")

# Tables go to stdout; logs and progress to stderr, so `--json` output stays clean.
# Written to a file or a pipe, rich fits tables into 80 columns and cuts numbers and
# model ids. A wide fixed width keeps them whole.
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, soft_wrap=True)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", nargs="?", default=DEFAULT_MODEL,
        help=f"catalog name ({', '.join(CATALOG)}), Hugging Face hub id, local folder with "
        f"safetensors, or .gguf file (default: {DEFAULT_MODEL})",
    )
    parser.add_argument("--dtype", choices=list(DTYPES), help="weights and activations dtype (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--device", help="torch device, e.g. cpu or cuda:0 (default: cuda if available, else cpu)")
    parser.add_argument(
        "--trust-remote-code", action="store_true",
        help="run Python code shipped with a hub model; off by default, enable only for repositories you trust",
    )


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON to stdout instead of tables")
    parser.add_argument("--output", metavar="FILE", help="also write the JSON result to FILE (written atomically)")


def load_from_args(args: argparse.Namespace, **kwargs: Any) -> LoadedModel:
    from superweight.models import load_model

    with err_console.status(f"loading {args.model}"):
        return load_model(
            args.model, dtype=args.dtype, device=args.device,
            trust_remote_code=args.trust_remote_code, **kwargs,
        )


def emit_json(args: argparse.Namespace, data: dict[str, Any]) -> None:
    from superweight.provenance import write_json_atomic

    if getattr(args, "output", None):
        write_json_atomic(args.output, data)
        log.info("wrote %s", args.output)
    if getattr(args, "json", False):
        json.dump(data, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")


def run_command(func: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run a subcommand, turning expected errors into one clear line and exit status 2."""
    from superweight.detect import NumericalOverflowError

    try:
        return func(args) or 0
    except (ModelLoadError, ValueError, NumericalOverflowError, FileNotFoundError, PermissionError) as error:
        if os.environ.get("SUPERWEIGHT_TRACEBACK"):
            raise
        err_console.print(Text.assemble(("error: ", "bold red"), str(error)), highlight=False)
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
