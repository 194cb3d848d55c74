"""The ``superweight`` command line: one subcommand per module in this package."""

from __future__ import annotations

import argparse
import logging
import sys

from superweight import __version__


def build_parser() -> argparse.ArgumentParser:
    from superweight.cli import detect, directory, eval, figure, harness, models, quantize, report, reproduce

    parser = argparse.ArgumentParser(
        prog="superweight",
        description="Find, probe and protect the super weights of large language models.",
        epilog="Run `superweight COMMAND --help` for a command's options and examples.",
    )
    parser.add_argument("--version", action="version", version=f"superweight {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (detect, directory, models, eval, quantize, harness, reproduce, figure, report):
        module.add_parser(commands)
    return parser


def _configure_logging(verbose: int, quiet: bool) -> None:
    from rich.logging import RichHandler

    if quiet:
        level = logging.WARNING
    elif verbose >= 2:
        level = logging.DEBUG
    else:
        level = logging.INFO
    handler = RichHandler(show_path=False, show_time=False, markup=False)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[handler])
    logging.getLogger("superweight").setLevel(level)
    if verbose < 2:
        # transformers and datasets are chatty at INFO; keep their warnings.
        for name in ("transformers", "datasets", "lm_eval", "accelerate"):
            logging.getLogger(name).setLevel(logging.WARNING if verbose else logging.ERROR)
        import transformers

        transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose, args.quiet)
    from superweight.cli.common import run_command

    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
