"""Time the model figures on the default model and print the measurements.

Three measurements, each against its target:
1. ``detection`` and ``activations`` as a user runs them: ``superweight figure NAME``
   in a fresh process with a warm model cache (start-up, model load, measurement, PNG),
   median of ``--repeats`` runs; target < 15 s each;
2. the same figures inside one process with the model already loaded (measurement and
   drawing only), to show where the time goes;
3. ``stopwords`` with ``--num-prompts`` LAMBADA prompts (default 500) inside one
   process; target < 300 s.

Wall-clock and CPU seconds (of the child process for the fresh-process rows) are both
printed, with the load average before and after. On a machine shared with other jobs
the wall-clock time grows with their load, while CPU seconds stay closer to the work
done.

Run: .venv/bin/python benchmarks/figures.py [--model smollm2-135m] [--repeats 3] [--num-prompts 500]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from superweight import figures
from superweight.models import DEFAULT_MODEL, load_model

TARGETS = {"detection": 15.0, "activations": 15.0, "stopwords": 300.0}


def _timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def _cli_seconds(name: str, model: str, output: str) -> tuple[float, float]:
    """Run ``superweight figure NAME`` in a new process; return its wall-clock and CPU seconds."""
    # The console script installed next to this interpreter, as a user would call it.
    script = os.path.join(os.path.dirname(sys.executable), "superweight")
    command = [script, "-q", "figure", name, model, "--output", output]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall, cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="catalog name, hub id, folder or .gguf file")
    parser.add_argument("--repeats", type=int, default=3, help="runs per fast figure; the median is printed")
    parser.add_argument("--num-prompts", type=int, default=500, help="LAMBADA prompts of the stopwords figure")
    parser.add_argument("--skip-stopwords", action="store_true", help="time only detection and activations")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    print(f"model {args.model}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f}")
    rows = []
    with tempfile.TemporaryDirectory() as output:
        # 1. Fresh processes, as a user runs the command; the first run warms the caches.
        for name in ("detection", "activations"):
            _cli_seconds(name, args.model, output)
            runs = [_cli_seconds(name, args.model, output) for _ in range(args.repeats)]
            rows.append((f"superweight figure {name} (fresh process)", statistics.median(r[0] for r in runs),
                         statistics.median(r[1] for r in runs), TARGETS[name]))

        # 2. and 3. In one process with the model loaded.
        loaded = load_model(args.model)
        for name in ("detection", "activations"):
            _timed(lambda: figures.draw_model_figure(name, loaded).save(output))
            runs = [_timed(lambda: figures.draw_model_figure(name, loaded).save(output)) for _ in range(args.repeats)]
            rows.append((f"{name} (model loaded)", statistics.median(r[0] for r in runs),
                         statistics.median(r[1] for r in runs), None))
        if not args.skip_stopwords:
            options = figures.FigureOptions(num_prompts=args.num_prompts)
            wall, cpu = _timed(lambda: figures.draw_model_figure("stopwords", loaded, options).save(output))
            rows.append((f"stopwords, {args.num_prompts} prompts (model loaded)", wall, cpu, TARGETS["stopwords"]))

    print(f"load average after: {os.getloadavg()[0]:.1f}")
    print(f"{'measurement':<48} {'wall s':>8} {'CPU s':>8} {'target s':>9}  verdict")
    for label, wall, cpu, target in rows:
        verdict = ""
        if target is not None:
            verdict = "ok" if wall < target else "over"
        cpu_text = "-" if cpu is None else f"{cpu:.1f}"
        target_text = "-" if target is None else f"< {target:g}"
        print(f"{label:<48} {wall:>8.1f} {cpu_text:>8} {target_text:>9}  {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
