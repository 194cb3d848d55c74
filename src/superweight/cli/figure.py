"""``superweight figure``: draw a figure of the super weight paper (Yu et al. 2024) for a model or a result folder."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from rich.markup import escape

from superweight.cli.common import console, load_from_args
from superweight.coordinates import SuperWeight
from superweight.detect import DEFAULT_PROMPT
from superweight.models import CATALOG, DEFAULT_MODEL, DTYPES

log = logging.getLogger(__name__)

EXAMPLES = """figures:
  detection     per layer, max |down_proj input| and |output|, super weights marked (paper Fig. 3)
  residual      per layer, max |residual stream| with super weights or outliers removed (Fig. 4)
  activations   heat map of |down_proj output| over tokens and channels at a super weight's layer
  stopwords     next-token probabilities with and without the super weights, LAMBADA (Fig. 5)
  sensitivity   accuracy and perplexity against the super weight scaling factor (Fig. 6);
                reads a folder of `superweight reproduce sensitivity`
  weight-quant  accuracy and perplexity against the quantization block size (Fig. 7);
                reads a folder of `superweight reproduce weight-quant`
  all           every figure that runs a model (the first four)

examples:
  superweight figure detection --output figures/              # the default catalog model
  superweight figure residual smollm2-135m --output figures/ --log --format png,pdf
  superweight figure stopwords --num-prompts 100 --output figures/
  superweight figure sensitivity runs/sensitivity/ --output figures/
"""


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "figure", help="draw one of the paper's figures",
        description="Draw one of the figures of the super weight paper. Figures of a model run it; "
        "sensitivity and weight-quant read the result folder written by `superweight reproduce`.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", metavar="NAME", help="figure to draw (listed below), or 'all' for every model figure")
    parser.add_argument(
        "model", nargs="?", metavar="MODEL | RESULT_DIR",
        help=f"for model figures: catalog name ({', '.join(CATALOG)}), hub id, folder or .gguf file "
        f"(default: {DEFAULT_MODEL}); for sensitivity and weight-quant: the result folder",
    )
    parser.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for the image files (created if missing)")
    parser.add_argument("--format", default="png", metavar="FORMATS",
                        help="comma-separated image formats: png, pdf, svg (default: %(default)s)")
    parser.add_argument("--dpi", type=int, default=150, help="resolution of PNG images in dots per inch (default: %(default)s)")
    parser.add_argument("--log", action="store_true", help="logarithmic y axis on line and bar plots")
    parser.add_argument("--save-data", action="store_true", help="also write NAME.json with the plotted numbers")

    group = parser.add_argument_group("model figures")
    group.add_argument("--prompt", default=DEFAULT_PROMPT, help="text fed to the model (default: %(default)r)")
    group.add_argument("--verify", action="store_true",
                       help="detection: test each candidate causally (zero it, measure perplexity)")
    group.add_argument("--super-weight", type=SuperWeight.parse, action="append", metavar="LAYER:ROW:COL",
                       help="super weight to use (repeatable); default: the directory entry, else detection with --verify")
    group.add_argument("--num-prompts", type=int, default=500, help="stopwords: LAMBADA prompts to average (default: %(default)s)")
    group.add_argument("--batch-size", type=int, default=16, help="stopwords: prompts per forward pass (default: %(default)s)")
    group.add_argument("--top-k", type=int, default=10, help="stopwords: top tokens shown per condition (default: %(default)s)")
    group.add_argument("--layer", type=int, help="activations: layer to show (default: the first super weight's layer)")

    group.add_argument("--dtype", choices=list(DTYPES), help="weights and activations dtype (default: float32 on CPU, bfloat16 on CUDA)")
    group.add_argument("--device", help="torch device, e.g. cpu or cuda:0 (default: cuda if available, else cpu)")
    group.add_argument("--trust-remote-code", action="store_true",
                       help="run Python code shipped with a hub model; enable only for repositories you trust")
    parser.set_defaults(func=run)


def _result_folder_experiment(path: str) -> str | None:
    """Return the experiment of a result folder, or ``None`` when ``path`` is not one."""
    import json

    manifest = Path(path).expanduser() / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        return str(json.loads(manifest.read_text(encoding="utf-8")).get("experiment"))
    except (json.JSONDecodeError, OSError):
        return "unreadable"


def run(args: argparse.Namespace) -> int:
    from superweight import figures

    if args.name != "all" and args.name not in figures.FIGURES:
        raise ValueError(
            f"unknown figure {args.name!r}; choose one of {', '.join(figures.FIGURES)}, or all for every "
            "model figure (`superweight figure --help` describes each)"
        )
    names = list(figures.MODEL_FIGURES) if args.name == "all" else [args.name]
    formats = figures.check_formats(args.format)
    output = figures.check_output_dir(args.output)

    spec = figures.FIGURES[names[0]]
    if spec.experiment is not None:
        if args.model is None:
            raise ValueError(
                f"figure {spec.name!r} reads a result folder; pass the folder written by "
                f"`{figures.reproduce_command(spec.experiment)}`"
            )
        results = [figures.draw_results_figure(spec.name, args.model)]
    else:
        target = args.model or DEFAULT_MODEL
        experiment = _result_folder_experiment(target)
        if experiment is not None:
            raise ValueError(
                f"{target!r} is a result folder of the {experiment!r} experiment, but figure {args.name!r} runs a "
                "model; pass a model (catalog name, hub id, folder with safetensors or .gguf file), or draw "
                "sensitivity or weight-quant from a matching result folder"
            )
        options = figures.FigureOptions(
            log_scale=args.log, prompt=args.prompt, num_prompts=args.num_prompts, batch_size=args.batch_size,
            top_k=args.top_k, layer=args.layer, verify=args.verify,
        )
        args.model = target
        loaded = load_from_args(args)
        # A generator: each figure is saved before the next one is measured, so a late failure keeps earlier files.
        results = (figures.draw_model_figure(name, loaded, options, super_weights=args.super_weight) for name in names)

    for result in results:
        paths = result.save(output, formats, dpi=args.dpi)
        if args.save_data:
            from superweight.provenance import write_json_atomic

            data_path = output / f"{result.name}.json"
            write_json_atomic(data_path, {"figure": result.name, "caption": result.caption, "data": result.data})
            paths.append(data_path)
        console.print(f"[bold]{escape(result.name)}[/]: {escape(', '.join(str(p) for p in paths))}", highlight=False)
        console.print(escape(result.caption), highlight=False)
    return 0
