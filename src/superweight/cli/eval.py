"""``superweight eval``: perplexity and zero-shot accuracy of a model with its super weights edited."""

from __future__ import annotations

import argparse
import logging
import math

from rich.markup import escape
from rich.table import Table

from superweight.cli.common import add_model_arguments, add_output_arguments, console, emit_json, load_from_args

log = logging.getLogger("superweight.cli")

EXAMPLES = """examples:
  superweight eval --perplexity wiki-sample                       # the original default model
  superweight eval --scale-super-weights 0 --perplexity wiki-sample,c4-sample
  superweight eval --restore-super-activation --tasks arc_easy,piqa --limit 100
  superweight eval --prune-outliers 1e-6 --keep-super-weights --tasks arc_easy --limit 100
  superweight eval ./my-model --super-weight 2:3968:7003 --scale-super-weights 0 --json --output eval.json

Without --super-weight, coordinates come from the directory of known super weights, else
from `superweight detect --verify`; the ones used are logged and saved in the JSON.
Paper tasks: winogrande, arc_challenge, arc_easy, piqa, sciq, hellaswag, lambada_openai.
"""


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "eval", help="evaluate perplexity and zero-shot accuracy, optionally with super weights edited",
        description="Evaluate a model, optionally edited: scale or prune its super weights, restore the super "
        "activation, or prune the other weight outliers. Zero-shot tasks run through lm-evaluation-harness.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    parser.add_argument("--device-map", choices=["auto"], help="spread a large model over the available devices")
    parser.add_argument("--super-weight", action="append", metavar="L:ROW:COL", default=[],
                        help="super weight coordinates (repeatable); default: the directory entry, else detection")
    edit = parser.add_argument_group("edits (composed in this order: outliers, scaling, super activation)")
    edit.add_argument("--prune-outliers", type=float, metavar="FRACTION",
                      help="zero the top FRACTION of |w| in every linear weight matrix of every decoder layer, "
                      "e.g. 1e-6")
    edit.add_argument("--keep-super-weights", action="store_true",
                      help="with --prune-outliers: put the super weights back (the 'Prune non-SW' ablation)")
    edit.add_argument("--scale-super-weights", type=float, metavar="FACTOR",
                      help="multiply the super weights by FACTOR (0 prunes them)")
    edit.add_argument("--restore-super-activation", action="store_true",
                      help="prune the super weights but write their original super activation back")
    measure = parser.add_argument_group("measurements")
    measure.add_argument("--perplexity", metavar="SOURCES",
                         help="comma-separated text sources: wiki-sample, c4-sample (offline), wikitext2, c4, "
                         "or a .txt/.jsonl path")
    measure.add_argument("--tasks", metavar="TASKS", help="comma-separated zero-shot tasks (paper task names)")
    measure.add_argument("--limit", type=float, metavar="N",
                         help="evaluate only the first N examples per task; a value below 1 is a fraction "
                         "of each task, as in lm_eval")
    measure.add_argument("--batch-size", type=int, default=1, metavar="N",
                         help="batch size for perplexity windows and task requests (default: %(default)s)")
    measure.add_argument("--seqlen", type=int, default=2048, metavar="N",
                         help="perplexity window length in tokens (default: %(default)s)")
    measure.add_argument("--max-windows", type=int, metavar="N", help="evaluate at most N perplexity windows per source")
    measure.add_argument("--seed", type=int, default=1234, help="lm_eval random seeds (default: %(default)s)")
    add_output_arguments(parser)
    parser.set_defaults(func=run)


def _limit(value: float | None) -> int | float | None:
    if value is None:
        return None
    return int(value) if value >= 1 and float(value).is_integer() else value


def run(args: argparse.Namespace) -> int:
    from superweight.api import resolve_super_weights
    from superweight.coordinates import SuperWeight
    from superweight.evaluation import InterventionSpec, evaluate

    if not args.perplexity and not args.tasks:
        raise ValueError("nothing to evaluate; pass --perplexity SOURCES and/or --tasks TASKS")
    spec = InterventionSpec(
        scale_factor=args.scale_super_weights,
        restore_super_activation=args.restore_super_activation,
        prune_outliers=args.prune_outliers,
        keep_super_weights=args.keep_super_weights,
    )
    explicit = [SuperWeight.parse(item) for item in args.super_weight]
    if args.tasks:
        from superweight.tasks import resolve_tasks

        resolve_tasks(args.tasks.split(","))  # fail on an unknown task before loading the model
    loaded = load_from_args(args, device_map=args.device_map)
    if spec.needs_super_weights or explicit:
        super_weights, source = resolve_super_weights(loaded, explicit)
        log.info("super weights (%s): %s", source, ", ".join(sw.to_spec() for sw in super_weights))
    else:
        super_weights, source = [], None
    result = evaluate(
        loaded, spec, super_weights, perplexity=args.perplexity or (), tasks=args.tasks or (),
        limit=_limit(args.limit), batch_size=args.batch_size, seqlen=args.seqlen, max_windows=args.max_windows,
        seed=args.seed, super_weights_source=source,
    )
    if not args.json:
        print_result(result)
    emit_json(args, result)
    return 0


def _fmt(value) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"


def print_result(result: dict) -> None:
    from superweight.experiments import ordered_tasks

    provenance = result["provenance"]
    sws = ", ".join(provenance["super_weights"]) or "none"
    console.print(
        f"[bold]{escape(str(provenance['model']))}[/] ({provenance['dtype']}): {escape(result['interventions']['description'])}"
        f"; super weights {escape(sws)}" + (f" ({escape(provenance['super_weights_source'])})"
                                            if provenance.get("super_weights_source") else ""),
        highlight=False,
    )
    if result["interventions"].get("outliers"):
        outliers = result["interventions"]["outliers"]
        console.print(f"outlier weights zeroed: {outliers['total_zeroed']} in {len(outliers['zeroed_per_matrix'])} "
                      "matrices", highlight=False)
    if result["perplexity"]:
        table = Table(title="Perplexity", title_justify="left")
        for column in ("source", "perplexity", "tokens", "windows", "seqlen"):
            table.add_column(column, justify="right" if column != "source" else "left")
        for source, values in result["perplexity"].items():
            table.add_row(escape(source), _fmt(values["perplexity"]), f"{values['num_tokens']:,}",
                          str(values["num_windows"]), str(values["seqlen"]))
        console.print(table)
    if result["tasks"]:
        table = Table(title="Zero-shot accuracy (%)", title_justify="left")
        for column in ("task", "acc", "± stderr", "acc_norm", "examples"):
            table.add_column(column, justify="right" if column != "task" else "left")
        for task in ordered_tasks(list(result["tasks"])):
            metrics = result["tasks"][task]

            def percent(key: str) -> str:
                value = metrics.get(key)
                return "-" if value is None else f"{100 * value:.2f}"

            table.add_row(task, percent("acc"), percent("acc_stderr"), percent("acc_norm"),
                          str(metrics.get("num_samples", "-")))
        if result["average_accuracy"] is not None:
            table.add_row("[bold]average[/]", f"[bold]{100 * result['average_accuracy']:.2f}[/]", "", "", "")
        console.print(table)
        limit = provenance.get("limit")
        if limit is not None:
            console.print(f"--limit {limit:g}: only the first {limit:g} examples per task were evaluated.",
                          highlight=False)
        for task, note in result.get("split_notes", {}).items():
            console.print(f"{task}: {escape(note)}", highlight=False, style="dim")
