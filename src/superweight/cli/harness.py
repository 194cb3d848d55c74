"""``superweight lm-eval``: lm-evaluation-harness's own command line with the superweight models."""

from __future__ import annotations

import argparse

EXAMPLES = """examples:
  superweight lm-eval --model hf-outlier \\
      --model_args pretrained=smollm2-135m,outlier_method=manual_scaling_SO_0.0,dtype=float32 \\
      --tasks winogrande,arc_challenge --device cpu --batch_size 16 --limit 5 --output_path outputs/x
  superweight lm-eval --model hf-outlier \\
      --model_args pretrained=smollm2-135m,outlier_method=search_percentage_1e-6_0-32_all,restore_and_scale_GO=1.0 \\
      --tasks arc_easy --device cpu --limit 20
  superweight lm-eval --model superweight --model_args pretrained=smollm2-135m,scale=0.0 --tasks piqa --limit 20
  superweight lm-eval --help                       # the harness's own options

Every argument goes to lm-eval (lm_eval 0.4.13) unchanged, except that with the hub
offline the seven paper tasks run on their offline copies (superweight_<task>) and
--include_path points at their configs. Models: hf-outlier takes the research code's
outlier_method and restore_and_scale_GO; superweight takes super_weights, scale,
restore_super_activation, prune_outliers and keep_super_weights.
"""


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "lm-eval", help="run lm-evaluation-harness with the hf-outlier and superweight models",
        description="Run the lm-eval command line with the superweight models registered.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False,
        # No option prefix: every argument, "--model" included, is passed through to lm-eval.
        prefix_chars="\0",
    )
    parser.add_argument("harness_args", nargs=argparse.REMAINDER, metavar="LM_EVAL_ARGS",
                        help="arguments for lm-eval, e.g. --model hf-outlier --model_args ... --tasks ...")
    parser.set_defaults(func=run, print_help=parser.print_help)


def run(args: argparse.Namespace) -> int:
    from superweight.lm_eval import run_harness

    harness_args = list(args.harness_args)
    if not harness_args or harness_args[0] in ("-h", "--help"):
        args.print_help()
        if not harness_args:
            return 2
        print()
    return run_harness(harness_args)
