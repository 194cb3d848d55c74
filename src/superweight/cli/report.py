"""``superweight report``: one self-contained HTML file with detection, figures and results."""

from __future__ import annotations

import argparse

from rich.markup import escape

from superweight.cli.common import add_model_arguments, console, err_console, load_from_args
from superweight.coordinates import SuperWeight
from superweight.detect import DEFAULT_PROMPT

EXAMPLES = """examples:
  superweight report --output report.html                          # the default catalog model
  superweight report smollm2-135m --output report.html --results runs/table1 runs/sensitivity
  superweight report --output quick.html --num-prompts 50 --figures detection,activations
"""


def add_parser(commands) -> None:
    from superweight.figures import MODEL_FIGURES

    parser = commands.add_parser(
        "report", help="write a one-file HTML report (detection, figures, results)",
        description="Detect the super weights, draw the figures and tabulate result folders of "
        "`superweight reproduce` into one HTML file with embedded images, readable offline.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    parser.add_argument("-o", "--output", required=True, metavar="FILE", help="HTML file to write, e.g. report.html")
    parser.add_argument("--results", nargs="+", default=[], metavar="DIR",
                        help="result folders written by `superweight reproduce` (any experiments)")
    parser.add_argument("--figures", default=",".join(MODEL_FIGURES), metavar="NAMES",
                        help="comma-separated model figures to include (default: %(default)s)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="text fed to the model (default: %(default)r)")
    parser.add_argument("--verify", action="store_true",
                        help="test each candidate causally (zero it, measure perplexity); the figures then use "
                        "the confirmed super weights")
    parser.add_argument("--super-weight", type=SuperWeight.parse, action="append", metavar="LAYER:ROW:COL",
                        help="super weight the figures use (repeatable); default: the directory entry, else detection")
    parser.add_argument("--num-prompts", type=int, default=500, help="stopwords: LAMBADA prompts to average (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="stopwords: prompts per forward pass (default: %(default)s)")
    parser.add_argument("--log", action="store_true", help="logarithmic y axis on line and bar plots")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from superweight.figures import FigureOptions, check_output_dir, figure_spec
    from superweight.report import ReportConfig, build_report, write_report

    names = tuple(figure_spec(name.strip()).name for name in args.figures.split(",") if name.strip())
    config = ReportConfig(
        figures=names,
        options=FigureOptions(log_scale=args.log, prompt=args.prompt, num_prompts=args.num_prompts,
                              batch_size=args.batch_size, verify=args.verify),
    )
    output = Path(args.output).expanduser()
    if output.is_dir():
        raise ValueError(f"--output {args.output!r} is a folder; pass a file name such as report.html")
    # Fail before the model runs when the report cannot be written.
    check_output_dir(output.parent)

    loaded = load_from_args(args)
    # One line per step; the stop-word step adds its own progress bar.
    html = build_report(loaded, results=args.results, config=config, super_weights=args.super_weight,
                        on_step=lambda message: err_console.print(f"[dim]report:[/] {escape(message)}", highlight=False))
    path = write_report(output, html)
    console.print(f"wrote {escape(str(path))} ({len(html.encode()) / 1e6:.1f} MB)", highlight=False)
    return 0
