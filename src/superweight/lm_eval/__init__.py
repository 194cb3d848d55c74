"""Run lm-evaluation-harness's own command line with the superweight models registered.

``python -m superweight.lm_eval ARGS`` and ``superweight lm-eval ARGS`` take exactly the
arguments of ``lm-eval`` (lm_eval 0.4.13), for example the research code's::

    superweight lm-eval --model hf-outlier \\
        --model_args pretrained=smollm2-135m,outlier_method=manual_scaling_SO_0.0,dtype=float32 \\
        --tasks winogrande,arc_challenge --device cpu --batch_size 16 --limit 5 --output_path outputs/x

Importing this package registers the ``superweight`` and ``hf-outlier`` models (see
:mod:`superweight.lm_eval_models`). When the hub is offline (see
:func:`superweight.tasks.is_offline`), the seven paper tasks are swapped for their offline
copies (``arc_easy`` becomes ``superweight_arc_easy``) and ``--include_path`` points at
their generated configs.

The package is named after the harness but does not shadow it, because every ``import
lm_eval`` in this project is absolute and reaches the top-level harness package.
NOTE: a Python process started inside ``src/superweight`` has that folder on ``sys.path``
and would import this package as ``lm_eval``; run from anywhere else.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import superweight.lm_eval_models  # noqa: F401  (registers the models)

log = logging.getLogger(__name__)

_SUBCOMMANDS = ("run", "ls", "validate")
_TASK_OPTIONS = ("--tasks", "-t")


def harness_argv(argv: Sequence[str], offline: bool | None = None) -> list[str]:
    """Return ``argv`` for the harness CLI, with the seven paper tasks mapped to their offline copies when offline.

    Only a ``run`` command (explicit or implied, as ``lm-eval`` implies it) is changed.
    Offline, each paper task name in ``--tasks`` becomes its ``superweight_<task>`` name
    and ``--include_path`` is added for their configs. Raises ValueError when the
    offline tasks are needed but ``--include_path`` is already set, since the harness CLI
    accepts a single include path.
    """
    from superweight import tasks

    argv = list(argv)
    if not argv or (argv[0] in _SUBCOMMANDS and argv[0] != "run") or any(a in ("-h", "--help") for a in argv):
        return argv
    if not tasks.is_offline(offline):
        return argv

    mapped: dict[str, str] = {}
    unknown: list[str] = []

    def rewrite(value: str) -> str:
        names = []
        for name in value.split(","):
            plain = name.strip()
            if plain in tasks.OFFLINE_TASKS:
                mapped[plain] = tasks.offline_task_name(plain)
                names.append(mapped[plain])
            else:
                if plain and not plain.startswith(tasks.OFFLINE_TASK_PREFIX) and plain != tasks.OFFLINE_TAG:
                    unknown.append(plain)
                elif plain:
                    mapped[plain] = plain
                names.append(name)
        return ",".join(names)

    result: list[str] = []
    in_tasks = False
    for arg in argv:
        if in_tasks and not arg.startswith("-"):
            result.append(rewrite(arg))
            continue
        in_tasks = arg in _TASK_OPTIONS
        if arg.startswith("--tasks="):
            arg = "--tasks=" + rewrite(arg.removeprefix("--tasks="))
        result.append(arg)

    if not mapped:
        return result
    if any(arg == "--include_path" or arg.startswith("--include_path=") for arg in result):
        # NOTE: lm_eval's CLI takes one --include_path; TaskManager accepts a list, but only
        # through the Python API.
        raise ValueError(
            "the offline paper tasks need --include_path for their configs, but --include_path is already "
            "set; drop it, or run the harness through the Python API (lm_eval.simple_evaluate with "
            "superweight.tasks.task_manager())"
        )
    changed = {name: offline for name, offline in mapped.items() if name != offline}
    if changed:
        log.info(
            "the hub is offline, so these tasks run on offline data: %s",
            ", ".join(f"{name} -> {offline}" for name, offline in changed.items()),
        )
        for name in changed:
            note = tasks.split_notes(name)
            if note:
                log.warning("%s", note)
    if unknown:
        log.warning(
            "tasks %s have no offline copy here; lm_eval loads them from the local Hugging Face cache or fails",
            ", ".join(unknown),
        )
    return [*result, "--include_path", str(tasks.prepare_offline_tasks())]


def run_harness(argv: Sequence[str], offline: bool | None = None) -> int:
    """Run the ``lm-eval`` command line in this process with ``argv`` (without the program name).

    Returns 0 on success. The harness's own errors propagate, and argparse errors exit
    through SystemExit as with ``lm-eval`` itself.
    """
    from lm_eval.__main__ import cli_evaluate

    argv = harness_argv(argv, offline)
    log.debug("lm-eval %s", " ".join(argv))
    # cli_evaluate, the `lm-eval` console script, reads its arguments from sys.argv.
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m superweight.lm_eval``: the harness CLI with one-line errors (exit 2)."""
    from superweight.cli.common import run_command

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("superweight").setLevel(logging.INFO)
    arguments = list(sys.argv[1:] if argv is None else argv)
    return run_command(lambda _: run_harness(arguments), None)
