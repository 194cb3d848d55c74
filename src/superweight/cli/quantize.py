"""``superweight quantize``: super-weight-aware weight quantization and simulated W8A8."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import tempfile
from pathlib import Path

from rich.markup import escape

from superweight.cli.common import add_model_arguments, add_output_arguments, console, emit_json, load_from_args

log = logging.getLogger("superweight.cli")

EXAMPLES = """examples:
  superweight quantize --bits 4 --block-size 65536 --perplexity wiki-sample                  # plain RTN
  superweight quantize --block-size 1048576 --clip zscore:9 --keep-super-weights --perplexity wiki-sample
  superweight quantize --clip zscore:auto --keep-super-weights --tasks arc_easy --limit 100
  superweight quantize --format nf4 --block-size channel --save ./smollm2-nf4
  superweight quantize --no-weights --activations int8 --keep-super-activations --perplexity wiki-sample
  superweight quantize --no-weights --activations int8 --smoothquant 0.85 --perplexity wiki-sample

Weights are fake-quantized: quantized, then dequantized in place, as in Yu et al. (2024).
Clipping methods: zscore:Z (mean + Z std of |w| per block), zscore:auto (Z chosen by layer
output error on wiki-sample), block_top:F, tensor_top:F (largest fraction F), iqr:K, none.
"""


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "quantize", help="quantize weights (block-wise RTN) and/or activations (W8A8), then measure",
        description="Round-to-nearest quantization that can keep the super weights and super activations "
        "in full precision.", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    weights = parser.add_argument_group("weights")
    weights.add_argument("--no-weights", action="store_true", help="leave the weights unquantized (activations only)")
    weights.add_argument("--bits", type=int, help="bits per weight, 2-8 (default: 4 for int and nf4, 3 for nf3)")
    weights.add_argument("--format", choices=["int", "nf4", "nf3"], default="int",
                         help="int: asymmetric min-max levels; nf4/nf3: normal-float levels (default: %(default)s)")
    weights.add_argument("--block-size", default="65536",
                         help="elements per block of the flattened matrix, 'channel' or 'tensor' (default: %(default)s)")
    weights.add_argument("--clip", default="none", help="outlier clipping before quantization (default: %(default)s)")
    weights.add_argument("--scale-shift", action="store_true", help="int only: dequantize to bin centers")
    weights.add_argument("--keep-super-weights", action="store_true",
                         help="write the super weights' original values back after quantization")
    weights.add_argument("--restore-factor", type=float, default=1.0,
                         help="multiply restored super weights by this factor (default: %(default)s)")
    weights.add_argument("--super-weight", action="append", metavar="L:ROW:COL", default=[],
                         help="super weight coordinates (repeatable); default: the directory entry, else detection")
    weights.add_argument("--save", metavar="DIR", help="write the fake-quantized model as a safetensors folder")
    weights.add_argument("--save-packed", metavar="DIR",
                         help="write packed low-bit codes plus per-block scales and a super weight side table")
    activations = parser.add_argument_group("activations")
    activations.add_argument("--activations", choices=["int8"], help="simulate W8A8: 8-bit per-tensor weights "
                             "and per-token activations on every linear input and the attention matmuls")
    variant = activations.add_mutually_exclusive_group()
    variant.add_argument("--keep-super-activations", action="store_true",
                         help="hold the super activations out of activation quantization")
    variant.add_argument("--smoothquant", type=float, metavar="ALPHA", help="apply SmoothQuant first, e.g. 0.85")
    measure = parser.add_argument_group("measurements (as in superweight eval)")
    measure.add_argument("--perplexity", metavar="SOURCES", help="comma-separated text sources, e.g. wiki-sample,c4-sample")
    measure.add_argument("--tasks", metavar="TASKS", help="comma-separated zero-shot tasks (paper task names)")
    measure.add_argument("--limit", type=int, metavar="N", help="evaluate only the first N examples per task")
    measure.add_argument("--batch-size", type=int, default=1, metavar="N", help="default: %(default)s")
    measure.add_argument("--seqlen", type=int, default=2048, metavar="N", help="perplexity window (default: %(default)s)")
    measure.add_argument("--max-windows", type=int, metavar="N", help="at most N perplexity windows per source")
    add_output_arguments(parser)
    parser.set_defaults(func=run)


def _weight_config(args: argparse.Namespace):
    from superweight.quantization import WeightQuantConfig, parse_block_size, parse_clip

    clip = parse_clip(args.clip)
    config = WeightQuantConfig(
        bits=args.bits, format=args.format, block_size=parse_block_size(args.block_size),
        clip=clip.method, clip_value=clip.value, scale_shift=args.scale_shift,
        keep_super_weights=args.keep_super_weights, restore_factor=args.restore_factor,
    )
    return config, clip.auto


def _check_new_folder(path: str | None, option: str) -> None:
    if path and Path(path).exists() and any(Path(path).iterdir()):
        raise ValueError(f"{option} {path!r} exists and is not empty; pass a new folder so no model file is overwritten")


def run(args: argparse.Namespace) -> int:
    from superweight.api import resolve_super_weights
    from superweight.coordinates import SuperWeight
    from superweight.evaluation import measure
    from superweight.provenance import provenance
    from superweight.quantization import (
        ActivationQuantConfig, quantize_activations_, quantize_weights_, save_quantized, search_zscore,
    )

    if args.no_weights and not args.activations:
        raise ValueError("--no-weights leaves nothing to quantize; add --activations int8 or drop --no-weights")
    if (args.keep_super_activations or args.smoothquant is not None) and not args.activations:
        raise ValueError("--keep-super-activations and --smoothquant need --activations int8")
    if args.no_weights and (args.save or args.save_packed):
        raise ValueError("--save and --save-packed write quantized weights; drop --no-weights")
    config, auto_z = (None, False) if args.no_weights else _weight_config(args)
    activation_config = None
    if args.activations:
        activation_config = ActivationQuantConfig(
            keep_super_activations=args.keep_super_activations, smoothquant_alpha=args.smoothquant,
        )
    _check_new_folder(args.save, "--save")
    _check_new_folder(args.save_packed, "--save-packed")
    explicit = [SuperWeight.parse(item) for item in args.super_weight]
    if args.tasks:
        from superweight.tasks import resolve_tasks

        resolve_tasks(args.tasks.split(","))  # fail on an unknown task before loading the model

    loaded = load_from_args(args)
    needs_super_weights = (config is not None and config.keep_super_weights) or args.keep_super_activations
    super_weights, source = resolve_super_weights(loaded, explicit) if needs_super_weights else ([], None)
    result: dict = {"super_weights": [sw.to_dict() for sw in super_weights], "super_weights_source": source}

    if config is not None:
        if auto_z:
            search = search_zscore(loaded.model, loaded.tokenizer, config, super_weights=super_weights)
            log.info("zscore:auto chose z = %g (layer output error %.4g; plain RTN %.4g)",
                     search.best_z, search.errors[search.best_z], search.rtn_error)
            config = search.config
            result["zscore_search"] = search.to_dict()
        if args.save_packed:
            result["packed"] = _save_packed(loaded.model, config, args.save_packed, super_weights, save_quantized)
        result["weights"] = quantize_weights_(loaded.model, config, super_weights).to_dict()
        if args.save:
            _save_model(loaded, args.save)
            result["saved"] = args.save
    if activation_config is not None:
        handle = quantize_activations_(loaded.model, activation_config, super_weights, tokenizer=loaded.tokenizer)
        result["activations"] = handle.report.to_dict()

    if args.perplexity or args.tasks:
        result.update(measure(
            loaded, perplexity=args.perplexity or (), tasks=args.tasks or (), limit=args.limit,
            batch_size=args.batch_size, seqlen=args.seqlen, max_windows=args.max_windows,
        ))
    result["provenance"] = provenance(
        **loaded.provenance(),
        weight_config=None if config is None else config.to_dict(),
        activation_config=None if activation_config is None else activation_config.to_dict(),
    )
    if not args.json:
        print_result(result, config)
    emit_json(args, result)
    return 0


def _save_packed(model, config, directory, super_weights, save_quantized) -> dict:
    report = save_quantized(model, config, directory, super_weights)
    log.info("packed weights: %s, %.2f bits per weight", directory, report.bits_per_weight)
    return report.to_dict() if hasattr(report, "to_dict") else dataclasses.asdict(report)


def _save_model(loaded, directory: str) -> None:
    """Save through a temporary folder so an interrupted save leaves no partial model."""
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        loaded.model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        if target.exists():
            target.rmdir()  # empty, checked before quantizing
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("saved the fake-quantized model to %s", target)


def print_result(result: dict, config) -> None:
    model = result["provenance"]["model"]
    if config is not None:
        weights = result["weights"]
        console.print(
            f"{escape(str(model))}: weights {escape(config.describe())}; {weights['num_matrices']} matrices, "
            f"{weights['clipped']:,} weights clipped, {weights['restored']} super weights restored",
            highlight=False,
        )
    if "activations" in result:
        console.print(f"activations: W8A8 {result['activations']['variant']}", highlight=False)
    for source, values in result.get("perplexity", {}).items():
        console.print(f"perplexity {escape(source)}: {values['perplexity']:.4g} "
                      f"({values['num_tokens']:,} tokens, {values['num_windows']} windows)", highlight=False)
    for task, metrics in result.get("tasks", {}).items():
        console.print(f"{task}: acc {100 * metrics['acc']:.2f}", highlight=False)
    if result.get("average_accuracy") is not None:
        console.print(f"average accuracy: {100 * result['average_accuracy']:.2f}", highlight=False)
