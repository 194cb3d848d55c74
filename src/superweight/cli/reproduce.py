"""``superweight reproduce``: rerun the super weight ablations of Yu et al. (2024) into a resumable folder."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from rich.markdown import Markdown

from superweight.cli.common import add_model_arguments, console

log = logging.getLogger("superweight.cli")

PAPER_TASKS = "winogrande,arc_challenge,arc_easy,piqa,sciq,hellaswag,lambada_openai"

EXAMPLES = """examples:
  superweight reproduce table1 --limit 100 --output results/table1-smollm2-135m
  superweight reproduce table1 --tasks arc_easy,piqa --perplexity wiki-sample --limit 50
  superweight reproduce sensitivity --factors 0,0.2,0.5,0.8,1,1.5,2,3 --limit 100
  superweight reproduce table1 ./my-model --super-weight 2:3968:7003 --output results/t1 --force
  superweight reproduce weight-quant --block-sizes 65536,1048576,tensor --clip zscore:9 --tasks arc_easy --limit 50
  superweight reproduce activation-quant --perplexity wiki-sample --max-windows 4

Each finished configuration is saved as OUTPUT/runs/<name>.json; rerunning the same
command skips them, so an interrupted run resumes. OUTPUT also contains manifest.json,
results.json (all runs) and table.md.
"""


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "reproduce", help="rerun the paper's experiments (table1, sensitivity, weight-quant, activation-quant)",
        description="Rerun an ablation of 'The Super Weight in Large Language Models' (Yu et al. 2024) on any "
        "model: Table 1 (original, prune SW, prune non-SW outliers, prune SW and restore the super activation) "
        "or the sensitivity to scaling the super weights.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    experiments = parser.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)

    table1 = experiments.add_parser(
        "table1", help="original, prune SW, prune non-SW, prune SW +SA",
        description="Table 1: zero-shot accuracy and perplexity of the original model, with the super weights "
        "pruned, with the top outlier weights pruned but the super weights kept, and with the super weights "
        "pruned but the super activation restored.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(table1, "table1")
    table1.add_argument("--outlier-fraction", type=float, default=1e-6, metavar="FRACTION",
                        help="fraction of |w| pruned per matrix in the 'Prune non-SW' row (default: %(default)g)")
    table1.set_defaults(func=run)

    sensitivity = experiments.add_parser(
        "sensitivity", help="accuracy and perplexity against a super weight scaling factor",
        description="Scale the super weights by each factor and evaluate.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(sensitivity, "sensitivity")
    sensitivity.add_argument("--factors", default="0,0.2,0.5,0.8,1,1.5,2,3", metavar="LIST",
                             help="comma-separated scaling factors (default: %(default)s)")
    sensitivity.set_defaults(func=run)

    weight_quant = experiments.add_parser(
        "weight-quant", help="RTN against super-weight-aware RTN per block size",
        description="Quantize the weights with round-to-nearest per block size, plainly and super-weight-aware "
        "(clip outliers, quantize, write the super weights back in full precision), and evaluate each.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(weight_quant, "weight-quant")
    weight_quant.add_argument("--block-sizes", default="16384,65536,262144,1048576,tensor", metavar="LIST",
                              help="comma-separated block sizes: integers, 'channel' or 'tensor' (default: %(default)s)")
    weight_quant.add_argument("--bits", type=int, default=4, help="bits per weight (default: %(default)s)")
    weight_quant.add_argument("--format", choices=["int", "nf4", "nf3"], default="int", help="default: %(default)s")
    weight_quant.add_argument("--clip", default="zscore:9",
                              help="clipping of the super-weight-aware rows, METHOD:VALUE (default: %(default)s)")
    weight_quant.set_defaults(func=run)

    activation_quant = experiments.add_parser(
        "activation-quant", help="FP, W8A8 RTN, SmoothQuant and super-activation-aware W8A8",
        description="Simulated W8A8 (8-bit per-tensor weights, per-token activations) plain, after SmoothQuant, "
        "and with the super activations held out; perplexity by default, as in the paper's table.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(activation_quant, "activation-quant", default_tasks="")
    activation_quant.add_argument("--smoothquant-alpha", type=float, default=0.85, help="default: %(default)s")
    activation_quant.set_defaults(func=run)


def _add_common(parser: argparse.ArgumentParser, experiment: str, default_tasks: str | None = None) -> None:
    add_model_arguments(parser)
    parser.add_argument("--device-map", choices=["auto"], help="spread a large model over the available devices")
    parser.add_argument("--super-weight", action="append", metavar="L:ROW:COL", default=[],
                        help="super weight coordinates (repeatable); default: the directory entry, else detection")
    parser.add_argument("--tasks", default=PAPER_TASKS if default_tasks is None else default_tasks,
                        help="comma-separated zero-shot tasks; empty for none (default: the seven tasks of Yu et al. 2024)")
    parser.add_argument("--perplexity", default="wiki-sample,c4-sample", metavar="SOURCES",
                        help="comma-separated perplexity text sources; empty for none (default: %(default)s)")
    parser.add_argument("--limit", type=float, metavar="N",
                        help="evaluate only the first N examples per task; a value below 1 is a fraction "
                        "of each task, as in lm_eval")
    parser.add_argument("--batch-size", type=int, default=1, metavar="N",
                        help="batch size for perplexity windows and task requests (default: %(default)s)")
    parser.add_argument("--seqlen", type=int, default=2048, metavar="N",
                        help="perplexity window length in tokens (default: %(default)s)")
    parser.add_argument("--max-windows", type=int, metavar="N", help="evaluate at most N perplexity windows per source")
    parser.add_argument("--seed", type=int, default=1234, help="lm_eval random seeds (default: %(default)s)")
    parser.add_argument("--output", metavar="DIR",
                        help=f"result folder (default: results/{experiment}-<model name>)")
    parser.add_argument("--force", action="store_true",
                        help="delete the runs already in DIR and start over, also when their settings differ")


def _split(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


def _parse_factors(value: str) -> list[float]:
    factors = []
    for item in _split(value):
        try:
            factors.append(float(item))
        except ValueError:
            raise ValueError(f"--factors: {item!r} is not a number; write e.g. 0,0.5,1,2") from None
    if not factors:
        raise ValueError("--factors is empty; write e.g. 0,0.5,1,2")
    return factors


def default_output(experiment: str, model: str) -> Path:
    """Return ``results/<experiment>-<model name>``, the model name taken from its last path part."""
    name = Path(model.rstrip("/")).name.removesuffix(".gguf") or "model"
    return Path("results") / f"{experiment}-{name}"


def run(args: argparse.Namespace) -> int:
    from superweight.coordinates import SuperWeight
    from superweight.experiments import EvaluationSettings, run_sensitivity, run_table1
    from superweight.tasks import resolve_tasks

    tasks = _split(args.tasks)
    if tasks:
        resolve_tasks(tasks)  # fail on an unknown task before anything loads
    limit = args.limit
    if limit is not None and limit >= 1 and float(limit).is_integer():
        limit = int(limit)
    evaluation = EvaluationSettings(
        perplexity=_split(args.perplexity), tasks=tasks, limit=limit, seqlen=args.seqlen,
        max_windows=args.max_windows, batch_size=args.batch_size, seed=args.seed,
    )
    output = Path(args.output) if args.output else default_output(args.experiment, args.model)
    options = {
        "super_weights": [SuperWeight.parse(item) for item in args.super_weight] or None,
        "load_options": {"dtype": args.dtype, "device": args.device, "trust_remote_code": args.trust_remote_code,
                         "device_map": args.device_map},
        "force": args.force,
    }
    log.info("writing %s results to %s", args.experiment, output)
    if args.experiment == "table1":
        run_table1(args.model, output, evaluation=evaluation, outlier_fraction=args.outlier_fraction, **options)
    elif args.experiment == "sensitivity":
        run_sensitivity(args.model, output, factors=_parse_factors(args.factors), evaluation=evaluation, **options)
    elif args.experiment == "weight-quant":
        from superweight.quantization import parse_block_size, parse_clip
        from superweight.quantization.experiments import run_weight_quant

        clip = parse_clip(args.clip)
        if clip.auto:
            raise ValueError("--clip zscore:auto is not supported in weight-quant; pass a fixed z, e.g. zscore:9")
        block_sizes = [parse_block_size(item) for item in _split(args.block_sizes)]
        if not block_sizes:
            raise ValueError("--block-sizes is empty; write e.g. 65536,tensor")
        run_weight_quant(args.model, output, block_sizes=block_sizes, evaluation=evaluation, bits=args.bits,
                         format=args.format, clip=clip.method, clip_value=clip.value, **options)
    else:
        from superweight.quantization.experiments import run_activation_quant

        run_activation_quant(args.model, output, smoothquant_alpha=args.smoothquant_alpha, evaluation=evaluation,
                             **options)
    console.print(Markdown((output / "table.md").read_text(encoding="utf-8")))
    console.print(f"results: {output}/results.json", highlight=False)
    return 0
