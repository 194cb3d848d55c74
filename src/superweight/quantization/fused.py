"""Fused CPU kernels for block-wise quantization, compiled with numba.

:mod:`superweight.quantization.blockwise` defines the arithmetic. This module computes
the same results with one compiled loop per pass over a block, where the torch kernels
run a dozen eager operations. A block is read from memory two or three times in all:

1. minimum, maximum and a finiteness check, plus the float64 moments of ``|w|`` for
   ``zscore``;
2. ``block_top`` and ``iqr`` only: a histogram of the float32 bit patterns of ``|w|``,
   then the elements of the few bins that hold the wanted ranks, sorted;
3. clamp, count the clipped elements, round and dequantize; for packed storage, one
   more pass writes the integer codes.

Blocks run in parallel over numba's threads. Only float32 tensors on the CPU take this
path (see :func:`supports`); other dtypes and devices use the torch kernels.

The compiled code is cached under ``<superweight cache>/numba`` unless
``NUMBA_CACHE_DIR`` is set. Only the first call on a machine compiles it (about 15 s on
2 cores), and later processes load it in about 1 s.
"""

from __future__ import annotations

import math
import os
import threading
from types import ModuleType

import numpy as np
import torch

from superweight.quantization.config import WeightQuantConfig

_lock = threading.Lock()


def supports(src: torch.Tensor, out: torch.Tensor, codes: torch.Tensor | None) -> bool:
    """Return whether the fused kernels handle these tensors: float32 on the CPU."""
    return (
        src.device.type == "cpu"
        and src.dtype == torch.float32
        and out.dtype == torch.float32
        and (codes is None or codes.dtype == torch.uint8)
    )


def compiled() -> ModuleType:
    """Return the kernel module; its functions compile (or load from the cache) on first use."""
    if "NUMBA_CACHE_DIR" not in os.environ:
        from superweight.models import cache_root

        os.environ["NUMBA_CACHE_DIR"] = str(cache_root() / "numba")
    # numba's own thread pool rather than a second OpenMP runtime next to torch's. It does
    # not allow concurrent parallel calls, which quantize_rows serializes with a lock.
    os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")
    from superweight.quantization import fused_kernels

    return fused_kernels


def quantize_rows(
    src: torch.Tensor,
    out: torch.Tensor,
    config: WeightQuantConfig,
    *,
    tensor_threshold: float | None,
    codes: torch.Tensor | None,
    threads: int,
    levels: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize each row of ``src`` as one block into ``out``; return ``lo``, ``scale``
    and the clipped count per row.

    ``levels`` are the ascending normal-float levels (at most 16; ``None`` for INT).
    """
    kernels = compiled()
    rows = src.shape[0]
    source = src.detach().numpy()
    target = out.detach().numpy()
    code_array = codes.numpy() if codes is not None else np.zeros((1, 1), dtype=np.uint8)

    clip_mode, clip_value, rank = _clip_arguments(config, src.shape[1], tensor_threshold)
    if config.format != "int":
        rounding, numerator = kernels.ROUND_NF, 2.0
    elif config.scale_shift:
        rounding, numerator = kernels.ROUND_SHIFT, float(2**config.bits)
    else:
        rounding, numerator = kernels.ROUND_INT, float(2**config.bits - 1)
    # The 15 decision boundaries of NF4, padded with +inf for NF3.
    midpoints = np.full(15, np.inf, dtype=np.float32)
    level_array = np.zeros(1, dtype=np.float32)
    if levels is not None:
        from superweight.quantization.blockwise import nf_midpoints

        level_array = levels.float().numpy()
        midpoints[: level_array.size - 1] = nf_midpoints(levels.float()).numpy()

    lo = np.empty(rows, dtype=np.float32)
    scale = np.empty(rows, dtype=np.float32)
    clipped = np.zeros(rows, dtype=np.int64)
    finite = np.ones(rows, dtype=np.bool_)
    with _lock:
        import numba

        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
        kernels.kernel(
            source, source.view(np.int32), target, code_array, codes is not None,
            clip_mode, clip_value, rank, rounding, np.float32(numerator), 2**config.bits - 1,
            level_array, midpoints, lo, scale, clipped, finite,
        )
    if not finite.all():
        raise ValueError("the tensor contains NaN or infinite values; quantize only finite weights")
    return torch.from_numpy(lo), torch.from_numpy(scale), torch.from_numpy(clipped)


def _clip_arguments(config: WeightQuantConfig, length: int, tensor_threshold: float | None) -> tuple[int, float, int]:
    """Return the kernel's clipping mode, its float argument and its rank argument."""
    kernels = compiled()
    if config.clip == "none":
        return kernels.CLIP_NONE, 0.0, 0
    if config.clip == "tensor_top":
        if tensor_threshold is None:
            return kernels.CLIP_NONE, 0.0, 0
        return kernels.CLIP_FIXED, tensor_threshold, 0
    if config.clip == "zscore":
        return kernels.CLIP_ZSCORE, config.clip_value, 0
    if config.clip == "block_top":
        k = math.floor(config.clip_value * length)
        if k == 0:
            return kernels.CLIP_NONE, 0.0, 0
        # The (k+1)-th largest |w| is the (length - 1 - k)-th smallest, counting from 0.
        return kernels.CLIP_RANK, 0.0, max(length - 1 - k, 0)
    if config.clip == "iqr":
        return kernels.CLIP_IQR, config.clip_value, 0
    raise ValueError(f"clip method {config.clip!r} is unknown")
