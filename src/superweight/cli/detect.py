"""``superweight detect``: find super weights data-free."""

from __future__ import annotations

import argparse

from rich import box
from rich.markup import escape
from rich.table import Table

from superweight.cli.common import add_model_arguments, add_output_arguments, console, emit_json, load_from_args
from superweight.detect import DEFAULT_PROMPT, DetectionConfig, DetectionReport

EXAMPLES = """examples:
  superweight detect                                  # the default catalog model
  superweight detect smollm2-135m --verify            # add the causal test
  superweight detect ./my-model --json --output sw.json
  superweight detect meta-llama/Llama-2-7b-hf --dtype bfloat16
"""


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "detect", help="find super weights from forward passes, no data needed",
        description="Find super weights: hook every MLP down-projection, look for a layer whose output "
        "spikes far above the others, zero what was found and repeat.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="text to feed the model (default: %(default)r)")
    parser.add_argument("--max-iterations", type=int, default=DetectionConfig.max_iterations,
                        help="forward passes; found weights are zeroed between them (default: %(default)s)")
    parser.add_argument("--spike-ratio", type=float, default=DetectionConfig.spike_ratio,
                        help="a layer is a candidate when its max |output| is at least this many times the "
                        "median over layers (default: %(default)s)")
    parser.add_argument("--min-spike", type=float, default=DetectionConfig.min_spike,
                        help="and at least this large (default: %(default)s)")
    parser.add_argument("--verify", action="store_true",
                        help="causal test: perplexity on a built-in English text with each candidate zeroed")
    parser.add_argument("--confirm-ratio", type=float, default=DetectionConfig.confirm_ratio,
                        help="perplexity ratio that confirms a verified candidate (default: %(default)s)")
    add_output_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from superweight.api import detect_loaded

    config = DetectionConfig(
        prompt=args.prompt, max_iterations=args.max_iterations, spike_ratio=args.spike_ratio,
        min_spike=args.min_spike, verify=args.verify, confirm_ratio=args.confirm_ratio,
    )
    loaded = load_from_args(args)
    report = detect_loaded(loaded, config)
    if not args.json:
        print_report(report)
    emit_json(args, report.to_dict())
    return 0


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def print_report(report: DetectionReport) -> None:
    provenance = report.provenance
    console.print(
        f"[bold]{provenance.get('model')}[/] ({report.model_type}, {report.num_layers} layers, "
        f"{provenance.get('dtype')}); prompt: {escape(repr(report.config.prompt))}", highlight=False,
    )
    table = Table(title="Super weight candidates", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), collapse_padding=True)
    # Cells hold literal brackets such as "[507, 1229]"; escape them from rich markup.
    for column in ("layer", escape("[row, col]"), "weight", "SA", "input", "token", "persist"):
        table.add_column(column, justify="right", no_wrap=True, overflow="ellipsis", min_width=len(column))
    if report.config.verify:
        for column in ("ppl ×", "group ×", "status"):
            table.add_column(column, justify="right", no_wrap=True)
    for c in report.candidates:
        cells = [
            str(c.layer), escape(f"[{c.super_weight.row}, {c.super_weight.col}]"), _fmt(c.value),
            _fmt(c.super_activation), _fmt(c.input_activation), escape(f"{c.token_text!r} ({c.token})"),
            "-" if c.persistence is None else f"{c.persistence:.0%}",
        ]
        if report.config.verify:
            style = "green" if c.status == "confirmed" else "red"
            cells += [_fmt(c.perplexity_ratio), _fmt(c.group_perplexity_ratio), f"[{style}]{c.status}[/]"]
        table.add_row(*cells)
    if not report.candidates:
        console.print("No layer's output spikes above the threshold; lower --spike-ratio to see more.")
    else:
        console.print(table)
    console.print(
        "Coordinates are [row, col] = [output channel, input channel] of the layer's "
        "down-projection weight (nn.Linear convention"
        + ("; GPT-2's Conv1D stores weight[col, row]" if report.weight_layout == "conv1d" else "")
        + "). SA = super activation, the down-projection output at [token, row]; input = its input at "
        "[token, col]; persist = share of later layers whose residual stream keeps its largest value in channel row"
        + ("; ppl × = perplexity on a built-in text with the weight zeroed, over the original, alone and with "
           "its group (same layer and row) zeroed." if report.config.verify else "."),
        highlight=False, markup=False,
    )
    if not report.config.verify and report.candidates:
        console.print("Not every spike is a super weight: add --verify for the causal test.")
    if report.directory is not None:
        d = report.directory
        verdict = "agrees" if d["agrees"] else (
            f"differs: matched {len(d['matched'])}, missing {len(d['missing'])}, extra {len(d['extra'])}"
        )
        console.print(f"Directory entry for {d['model']} ({d['source']}): {verdict}.", highlight=False, markup=False)
