"""Show where each super weight sits in its quantization block and how it stretches the block.

For every block size, prints the block index and offset of each super weight of the
model, the block's max |w| with and without the super weights, and the median over
all blocks of that layer's down-projection. A super weight that sets its block's range
makes the 4-bit step coarse for every other weight of the block.

Run: .venv/bin/python results/super_weight_blocks.py [MODEL]
"""

from __future__ import annotations

import sys

import torch

from superweight.adapters import get_adapter
from superweight.api import resolve_super_weights
from superweight.models import load_model

BLOCK_SIZES = (16384, 65536, 262144, 1048576, "tensor")


def main() -> None:
    loaded = load_model(sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m", device="cpu")
    super_weights, source = resolve_super_weights(loaded)
    adapter = get_adapter(loaded.model)
    print(f"model {loaded.spec}; super weights ({source}): {', '.join(sw.to_spec() for sw in super_weights)}")
    for layer in sorted({sw.layer for sw in super_weights}):
        weight = adapter.down_proj_module(loaded.model, layer).weight.detach().float()
        flat = weight.flatten()
        cols = weight.shape[1]
        protected = [sw.row * cols + sw.col for sw in super_weights if sw.layer == layer]
        without = flat.clone()
        without[protected] = 0
        print(f"\nlayer {layer} down-projection {tuple(weight.shape)}, {flat.numel():,} weights, "
              f"median |w| {flat.abs().median().item():.4f}")
        for block_size in BLOCK_SIZES:
            size = flat.numel() if block_size == "tensor" else block_size
            blocks = [flat[i : i + size] for i in range(0, flat.numel(), size)]
            block_max = torch.stack([b.abs().max() for b in blocks])
            for index in protected:
                block = index // size
                start = block * size
                rest = without[start : start + size].abs().max().item()
                print(f"  B={block_size!s:>8}: weight at offset {index - start:>7,} of block {block:>3}; "
                      f"block max |w| {block_max[block].item():.3f} with it, {rest:.3f} without it; "
                      f"median block max over the matrix {block_max.median().item():.3f}")


if __name__ == "__main__":
    main()
