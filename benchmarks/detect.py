"""Measure what detection costs on the default model, in one run.

Prints three ratios against their targets:
1. detection time / time of the plain forward passes it needs (target <= 1.5),
2. wall time of a warm `superweight detect` in a fresh process, start-up included (< 10 s),
3. peak memory during detection / model size in its dtype (target <= 1.5; the short
   prompt's activations are a few MB),
4. a warm model load from the dequantized safetensors cache.

Run: .venv/bin/python benchmarks/detect.py [--model smollm2-135m] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import threading
import time

import psutil
import torch


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class PeakRss:
    """Sample this process's resident set size every millisecond in a thread."""

    def __init__(self):
        self.process = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from superweight.detect import DetectionConfig, detect_super_weights
    from superweight.models import load_model

    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    loaded = load_model(args.model, device="cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    config = DetectionConfig()
    report = detect_super_weights(model, tokenizer, config)
    passes = len(report.steps)
    input_ids = tokenizer(config.prompt, return_tensors="pt").input_ids

    def plain_passes():
        with torch.inference_mode():
            for _ in range(passes):
                model(input_ids=input_ids, use_cache=False)

    plain = _median_time(plain_passes, args.repeats)
    detect = _median_time(lambda: detect_super_weights(model, tokenizer, config), args.repeats)
    print(f"\n1. detection: {detect * 1e3:.1f} ms for {passes} passes; plain forward passes: {plain * 1e3:.1f} ms")
    print(f"   ratio {detect / plain:.2f} (target <= 1.5)")

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    command = [os.path.join(os.path.dirname(sys.executable), "superweight"), "-q", "detect", args.model, "--json"]
    subprocess.run(command, env=env, check=True, capture_output=True)  # make sure the cache is warm
    walls = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run(command, env=env, check=True, capture_output=True)
        walls.append(time.perf_counter() - start)
    print(f"\n2. warm `{' '.join(command[1:])}`: median {statistics.median(walls):.2f} s over 3 runs (target < 10 s)")

    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with PeakRss() as rss:
        baseline = rss.peak
        detect_super_weights(model, tokenizer, config)
    extra = rss.peak - baseline
    print(f"\n3. model size {model_bytes / 2**20:.0f} MiB ({loaded.dtype}); extra resident memory during detection "
          f"{extra / 2**20:.1f} MiB")
    print(f"   peak / model size {(model_bytes + extra) / model_bytes:.3f} (target <= 1.5)")

    loads = []
    for _ in range(3):
        start = time.perf_counter()
        load_model(args.model, device="cpu")
        loads.append(time.perf_counter() - start)
    print(f"\n4. warm load_model({args.model!r}) from the safetensors cache, imports done: "
          f"median {statistics.median(loads):.2f} s over 3 loads (the first, from GGUF, takes about 20 s)")


if __name__ == "__main__":
    main()
