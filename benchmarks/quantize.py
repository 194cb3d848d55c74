"""Benchmark block-wise weight quantization against tensor.clone() and a forward pass.

Part 1 quantizes one 4096 x 11008 float32 tensor (a Llama-7B MLP matrix) with every
format and clipping method at B = 65536, and prints for each variant

- wall time and CPU time (user + system of this process) relative to one
  ``tensor.clone()`` of the same tensor, each the best of ``--repeats`` runs;
- peak extra memory relative to the tensor's size, measured in a fresh subprocess per
  variant: the rise of the process's maximum resident set size (``ru_maxrss``) during
  one call, over the resident size just before it. The tensor is created in place
  (``torch.empty().normal_()``), so no earlier transient hides the peak.

Part 2 times quantizing every linear layer of the default model (SmolLM2-135M) against
one forward pass over 2048 tokens of wiki-sample.

Run: python benchmarks/quantize.py [--repeats 5] [--skip-model]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from superweight.quantization import WeightQuantConfig, quantize_tensor, quantized_weights

SHAPE = (4096, 11008)
BLOCK_SIZE = 65536
CLIPS = [("none", None), ("zscore", 9.0), ("block_top", 1e-4), ("tensor_top", 1e-6), ("iqr", 1.5)]
FORMATS = ["int", "nf4", "nf3"]


def variant_configs() -> list[WeightQuantConfig]:
    return [
        WeightQuantConfig(format=fmt, block_size=BLOCK_SIZE, clip=clip, clip_value=value)
        for fmt in FORMATS
        for clip, value in CLIPS
    ]


def best_times(function, repeats: int) -> tuple[float, float]:
    """Return the best wall time and the best CPU time (seconds) of ``repeats`` calls."""
    wall = cpu = float("inf")
    for _ in range(repeats):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        function()
        wall = min(wall, time.perf_counter() - start_wall)
        cpu = min(cpu, time.process_time() - start_cpu)
    return wall, cpu


def resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_memory(index: int) -> None:
    """Print the peak extra memory of one quantization (or clone, index -1) as JSON."""
    tensor = torch.empty(SHAPE)
    for chunk in tensor.view(-1).split(1 << 20):  # normal_ on the whole tensor allocates a temporary
        chunk.normal_(0, 0.02)
    quantize_tensor(torch.randn(64, 1024), WeightQuantConfig(block_size=BLOCK_SIZE))  # warm up lazy state
    before = resident_bytes()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if index < 0:
        result = tensor.clone()
    else:
        result, _ = quantize_tensor(tensor, variant_configs()[index])
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    del result
    print(json.dumps({"extra": peak_after - before, "hidden_below": peak_before - before}))


def memory_ratio(index: int) -> str:
    output = subprocess.run(
        [sys.executable, __file__, "--measure-memory", str(index)], capture_output=True, text=True, check=True
    ).stdout
    data = json.loads(output.strip().splitlines()[-1])
    size = SHAPE[0] * SHAPE[1] * 4
    ratio = data["extra"] / size
    # The previous peak can hide a smaller one: then only an upper bound is known.
    if data["extra"] <= data["hidden_below"]:
        return f"<= {data['hidden_below'] / size:.2f}"
    return f"{ratio:.2f}"


def tensor_benchmark(repeats: int) -> None:
    # Memory first: a forked child starts with its parent's ru_maxrss, so the parent must
    # not hold the tensor yet.
    configs = variant_configs()
    memory = {index: memory_ratio(index) for index in range(-1, len(configs))}

    torch.manual_seed(0)
    tensor = torch.randn(SHAPE) * 0.02
    clone_wall, clone_cpu = best_times(lambda: tensor.clone(), repeats)
    print(f"tensor {SHAPE[0]}x{SHAPE[1]} float32, B={BLOCK_SIZE}, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"clone: {clone_wall * 1e3:.0f} ms wall, {clone_cpu * 1e3:.0f} ms CPU, "
          f"peak extra memory {memory[-1]}x tensor")
    print(f"{'variant':26s} {'wall ms':>8s} {'/clone':>7s} {'CPU ms':>8s} {'/clone':>7s} {'peak mem':>9s}")
    for index, config in enumerate(configs):
        wall, cpu = best_times(lambda: quantize_tensor(tensor, config), repeats)
        print(f"{config.describe():26s} {wall * 1e3:8.0f} {wall / clone_wall:6.2f}x {cpu * 1e3:8.0f} "
              f"{cpu / clone_cpu:6.2f}x {memory[index]:>8s}x")


def model_benchmark(repeats: int) -> None:
    from superweight.models import load_model
    from superweight.perplexity import tokenize_source

    loaded = load_model("smollm2-135m", device="cpu")
    model = loaded.model
    ids = tokenize_source(loaded.tokenizer, "wiki-sample")[:2048][None]
    with torch.no_grad():
        forward_wall, _ = best_times(lambda: model(input_ids=ids, use_cache=False), max(1, repeats // 2))
    print(f"default model forward pass, 2048 tokens: {forward_wall:.2f} s")
    for clip, value in (("none", None), ("zscore", 9.0), ("iqr", 1.5)):
        config = WeightQuantConfig(block_size=BLOCK_SIZE, clip=clip, clip_value=value)
        seconds = []
        for _ in range(repeats):
            with quantized_weights(model, config) as report:
                seconds.append(report.seconds)
        print(f"default model quantization {config.describe()}: {min(seconds):.2f} s "
              f"({report.numel / 1e6:.0f}M weights in {len(report.matrices)} matrices; "
              f"{forward_wall / min(seconds):.1f}x faster than the forward pass)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="runs per measurement; the best is reported")
    parser.add_argument("--skip-model", action="store_true", help="skip the default-model comparison")
    parser.add_argument("--measure-memory", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_memory is not None:
        measure_memory(args.measure_memory)
        return
    tensor_benchmark(args.repeats)
    if not args.skip_model:
        model_benchmark(args.repeats)


if __name__ == "__main__":
    main()
