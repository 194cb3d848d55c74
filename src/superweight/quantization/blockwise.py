"""Block-wise round-to-nearest kernels: min-max INT, normal-float levels, outlier clipping.

A tensor is quantized as the rows of 2-D views, one block per row. Rows are processed
in groups of at most :data:`CHUNK_ELEMENTS` elements, so every step of a group runs on
data that is still in cache and temporaries stay at a few group sizes. A row longer
than that (``block_size="tensor"`` or a large B) is processed in column segments, with
one pass over its segments per step.

Definitions. All arithmetic is float32 and elementwise, in the order written. ``lo`` and
``hi`` are the minimum and maximum of the block after clipping, and ``round`` rounds half
to even. A block with ``hi == lo`` uses ``s = 1``, so it is reproduced exactly.

- INT (asymmetric min-max): ``s = (2^b - 1) / (hi - lo)``, ``q = round((w - lo) * s)``,
  ``w' = q / s + lo``.
- INT with scale-shift: ``s = 2^b / (hi - lo)``, ``q = min(floor((w - lo) * s), 2^b - 1)``,
  ``w' = (q + 0.5) / s + lo``: 2^b equal bins, each dequantized to its center. The
  authors' research code approximates this with ``s = (2^b - 0.01) / (hi - lo)`` and
  ``round(... - 0.49)``, which can round the block maximum to an extra level 2^b.
- NF (normal float): ``s = 2 / (hi - lo)``, ``x = (w - lo) * s - 1``, ``i = #{j : m_j < x}``,
  ``w' = (l_i + 1) / s + lo``, where ``l`` are the NF levels and
  ``m_j = (l_j + l_{j+1}) / 2`` their midpoints: nearest level, ties to the lower one.

Clipping sets ``w`` to ``clamp(w, -t, t)`` with a threshold ``t`` on ``|w|`` per block:

- ``zscore``: ``t = mean + z * std`` of ``|w|`` (``std`` with ``n - 1``), computed in
  float64 and rounded to float32.
- ``block_top`` / ``tensor_top``: with ``k = floor(f * n)`` (n = block or tensor size),
  ``t`` is the (k+1)-th largest ``|w|``. Exactly the elements with ``|w| > t`` are
  clipped: k of them, fewer when several elements tie at ``t``. ``k = 0`` clips nothing.
- ``iqr``: ``q1`` and ``q3`` of ``|w|`` with linear interpolation between order
  statistics (``torch.quantile``'s default), ``t = q3 + k (q3 - q1)`` in float64, rounded
  to float32.

Order statistics are exact and cost O(n). The largest values come from the few 64-element
sub-blocks whose maximum can reach them. Quantiles come from a histogram of the float32
bit patterns of ``|w|`` (monotone for non-negative floats), followed by a sort of the few
elements in the bin that contains each rank.

Float32 tensors on the CPU go to the compiled kernels of
:mod:`superweight.quantization.fused`, which compute the same results, and the tests
check both against one reference. The torch kernels below handle other dtypes and devices.

NOTE: the torch kernels accept CUDA tensors, but they are tuned and tested on CPU only.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import math
import threading
from collections.abc import Iterator, Sequence

import torch

from superweight.quantization import fused
from superweight.quantization.config import WeightQuantConfig

USE_FUSED = True
"""Whether float32 CPU tensors take the compiled kernels of :mod:`superweight.quantization.fused`.
With ``False``, the torch kernels below quantize every tensor, which the tests use to compare both."""
CHUNK_ELEMENTS = 1 << 20
"""Elements per row group (4 MiB in float32: fits the L2 or L3 cache of current CPUs)."""
SUB_BLOCK = 64
"""Elements per sub-block whose min and max locate the largest values of a block."""
_HISTOGRAM_BINS = 2048
"""Histogram bins per block: 16 octaves below the block's max |w|, 128 bins per octave."""
_KEY_SHIFT = 16
"""Low bits dropped from a float32 bit pattern to get its bin: 8 exponent and 7 mantissa
bits remain, so one bin spans 1/128 of an octave."""
_NF_CELLS_PER_UNIT = 32
"""Cells per unit of the normal-float lookup table over [-1, 1]. A cell contains at most
one midpoint, because the closest midpoints of NF4 are 0.08 apart."""
_NF_MAGIC = 262144.0
_NF_MAGIC_BITS = 0x48800000
"""float32 bit pattern of 2^18, whose spacing 2^-5 is one lookup cell."""

# The NF4 levels of QLoRA (Dettmers et al. 2023), as float32 values published in
# bitsandbytes: quantiles of N(0, 1) scaled to [-1, 1], with an exact zero.
NF4_LEVELS: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# The NF3 levels used by the super weight authors' research code.
NF3_LEVELS: tuple[float, ...] = (
    -1.0, -0.5350227355957031, -0.2469314038753510, 0.0,
    0.1833375245332718, 0.3819939494132996, 0.6229856610298157, 1.0,
)


def nf_levels(fmt: str) -> torch.Tensor:
    """Return the float32 normal-float levels of ``nf4`` or ``nf3``, ascending."""
    if fmt == "nf4":
        return torch.tensor(NF4_LEVELS, dtype=torch.float32)
    if fmt == "nf3":
        return torch.tensor(NF3_LEVELS, dtype=torch.float32)
    raise ValueError(f"format {fmt!r} has no normal-float levels; use 'nf4' or 'nf3'")


def nf_midpoints(levels: torch.Tensor) -> torch.Tensor:
    """Return the float32 decision boundaries ``(l_j + l_{j+1}) / 2`` between levels."""
    return (levels[:-1] + levels[1:]) / 2


@dataclasses.dataclass
class BlockResult:
    """Per-block parameters of one quantized 2-D view (one entry per row)."""

    lo: torch.Tensor
    """float32 minimum of each clipped block: the dequantization offset."""
    scale: torch.Tensor
    """float32 ``s`` of each block (see the module docstring)."""
    clipped: torch.Tensor
    """int64 number of elements clipped in each block."""


class Workspace:
    """Scratch buffers reused by every row group of a run, one per purpose.

    A fresh multi-megabyte temporary per operation costs more than the arithmetic:
    glibc maps large allocations anew and returns them on free, so every use
    page-faults again. The buffers grow to the largest group seen, at most
    ``CHUNK_ELEMENTS`` elements each: about 25 MiB in all for float32 weights and 33 MiB
    for 16-bit ones, which need float32 copies.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """Return buffer ``name`` viewed as ``shape``; its content is undefined."""
        numel = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype:
            buffer = torch.empty(numel, dtype=dtype, device=self.device)
            self._buffers[name] = buffer
        return buffer[:numel].view(*shape)

    def float32(self, segment: torch.Tensor) -> torch.Tensor:
        """Return ``segment`` itself if it is float32, else a float32 copy in the workspace."""
        if segment.dtype == torch.float32:
            return segment
        copy = self.get("source", segment.shape, torch.float32)
        copy.copy_(segment)
        return copy


# -- threads ----------------------------------------------------------------------------


@contextlib.contextmanager
def single_threaded() -> Iterator[int]:
    """Run torch's CPU kernels on one thread inside the block; yield the previous count.

    The kernels issue many short operations on cache-sized chunks. With several
    intra-op threads every operation ends in a barrier, and on a loaded machine a thread
    that waits for a descheduled sibling makes the operation 10-100x slower than running
    it on one thread. The kernels instead spread row groups over that many worker
    threads. NOTE: ``torch.set_num_threads`` is process-wide, so other threads of the
    process also run single-threaded until the block exits.
    """
    previous = torch.get_num_threads()
    if previous == 1:
        yield 1
        return
    torch.set_num_threads(1)
    try:
        yield previous
    finally:
        torch.set_num_threads(previous)


class WorkerPool:
    """Worker threads with one :class:`Workspace` each, for independent row groups.

    Use it inside :func:`single_threaded`, with the thread count that it yields.
    """

    def __init__(self, workers: int = 1, device: torch.device | str = "cpu") -> None:
        device = torch.device(device)
        self.workers = max(1, workers) if device.type == "cpu" else 1
        self.device = device
        self._local = threading.local()
        self._executor = None
        if self.workers > 1:
            self._executor = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="superweight-quant")

    def workspace(self) -> Workspace:
        """Return the calling thread's workspace."""
        workspace = getattr(self._local, "workspace", None)
        if workspace is None:
            workspace = self._local.workspace = Workspace(self.device)
        return workspace

    def map(self, function, items: Sequence) -> list:
        """Return ``[function(item) for item in items]``, run on the workers."""
        if self._executor is None or len(items) < 2:
            return [function(item) for item in items]
        return list(self._executor.map(function, items))

    def close(self) -> None:
        """Stop the worker threads."""
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# -- entry points -----------------------------------------------------------------------


def quantize_rows(
    src: torch.Tensor,
    out: torch.Tensor,
    config: WeightQuantConfig,
    *,
    tensor_threshold: float | None = None,
    codes: torch.Tensor | None = None,
    pool: WorkerPool | None = None,
) -> BlockResult:
    """Quantize each row of ``src`` as one block and write the dequantized rows to ``out``.

    ``src`` and ``out`` are 2-D with contiguous rows; ``out`` may be ``src`` itself.
    ``tensor_threshold`` is the clipping threshold of ``tensor_top`` (``None``: nothing
    to clip). ``codes``, a uint8 tensor shaped like ``src``, receives the integer level
    of every element.
    """
    rows, length = src.shape
    pool = pool or WorkerPool(1, src.device)
    if USE_FUSED and fused.supports(src, out, codes):
        lo, scale, clipped = fused.quantize_rows(
            src, out, config, tensor_threshold=tensor_threshold, codes=codes, threads=pool.workers,
            levels=None if config.format == "int" else nf_levels(config.format),
        )
        return BlockResult(lo=lo, scale=scale, clipped=clipped)
    nf_tables = _NFTables.build(config.format, src.device) if config.format != "int" else None
    if length <= CHUNK_ELEMENTS:
        rows_per_group = max(1, CHUNK_ELEMENTS // length)
        groups = [(start, min(rows, start + rows_per_group)) for start in range(0, rows, rows_per_group)]
        segments = [(0, length)]
    else:
        # Segment lengths are multiples of SUB_BLOCK, so sub-blocks never straddle them.
        groups = [(row, row + 1) for row in range(rows)]
        segments = [(c, min(c + CHUNK_ELEMENTS, length)) for c in range(0, length, CHUNK_ELEMENTS)]

    def run(bounds: tuple[int, int]) -> BlockResult:
        start, stop = bounds
        group = _Group(
            src[start:stop], out[start:stop], segments, pool.workspace(),
            None if codes is None else codes[start:stop],
        )
        return group.quantize(config, tensor_threshold, nf_tables)

    results = pool.map(run, groups)
    return BlockResult(
        lo=torch.cat([r.lo for r in results]),
        scale=torch.cat([r.scale for r in results]),
        clipped=torch.cat([r.clipped for r in results]),
    )


def tensor_top_threshold(flat: torch.Tensor, fraction: float, workspace: Workspace | None = None) -> float | None:
    """Return the (k+1)-th largest |w| of a tensor, k = floor(fraction * numel).

    ``flat`` is the tensor viewed as one row ``[1, numel]``. Returns ``None`` when k is 0,
    because then nothing is clipped.
    """
    numel = flat.shape[1]
    k = math.floor(fraction * numel)
    if k == 0:
        return None
    segments = [(c, min(c + CHUNK_ELEMENTS, numel)) for c in range(0, numel, CHUNK_ELEMENTS)]
    group = _Group(flat, flat, segments, workspace or Workspace(flat.device), None)
    sub_min, sub_max = group.subblock_extrema()
    sub_abs = torch.maximum(sub_max, sub_min.neg())
    return float(group.kth_largest_abs(sub_abs, k + 1)[0][0])


# -- one group of rows --------------------------------------------------------------------


class _Group:
    """Rows of one 2-D view processed together: short rows in one segment, or one long
    row in column segments of at most ``CHUNK_ELEMENTS``."""

    def __init__(
        self,
        src: torch.Tensor,
        out: torch.Tensor,
        segments: Sequence[tuple[int, int]],
        workspace: Workspace,
        codes: torch.Tensor | None,
    ) -> None:
        self.workspace = workspace
        # One segment is converted to float32 once for all steps; long rows per step.
        self.src = workspace.float32(src) if len(segments) == 1 else src
        self.out = out
        self.segments = segments
        self.codes = codes
        self.rows, self.length = src.shape

    def segment(self, start: int, stop: int) -> torch.Tensor:
        """Return columns ``start:stop`` of the source as float32."""
        return self.workspace.float32(self.src[:, start:stop])

    def quantize(self, config: WeightQuantConfig, tensor_threshold: float | None, nf_tables: _NFTables | None) -> BlockResult:
        sub_min, sub_max = self.subblock_extrema()
        row_min = sub_min.amin(1)
        row_max = sub_max.amax(1)
        if not (torch.isfinite(row_min).all() and torch.isfinite(row_max).all()):
            raise ValueError("the tensor contains NaN or infinite values; quantize only finite weights")
        sub_abs = torch.maximum(sub_max, sub_min.neg())

        threshold, clipped = self.clip_threshold(config, sub_abs, tensor_threshold)
        if threshold is None:
            lo, hi = row_min, row_max
            clipped = torch.zeros(self.rows, dtype=torch.int64, device=row_min.device)
            clamp = None
        else:
            lo = torch.maximum(row_min, threshold.neg())
            hi = torch.minimum(row_max, threshold)
            if clipped is None:
                clipped = self.count_above(sub_abs, threshold)
            clamp = threshold if bool((clipped > 0).any()) else None

        scale = _block_scale(lo, hi, config)
        for start, stop in self.segments:
            self.dequantize_segment(start, stop, lo, scale, clamp, config, nf_tables)
        return BlockResult(lo=lo, scale=scale, clipped=clipped)

    def subblock_extrema(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return float32 ``[rows, ceil(length / SUB_BLOCK)]`` minima and maxima of sub-blocks."""
        minima, maxima = [], []
        for start, stop in self.segments:
            segment = self.src[:, start:stop]
            full = (stop - start) // SUB_BLOCK
            if full:
                blocks = segment[:, : full * SUB_BLOCK].view(self.rows, full, SUB_BLOCK)
                minima.append(blocks.amin(2))
                maxima.append(blocks.amax(2))
            if full * SUB_BLOCK < stop - start:
                tail = segment[:, full * SUB_BLOCK :]
                minima.append(tail.amin(1, keepdim=True))
                maxima.append(tail.amax(1, keepdim=True))
        return torch.cat(minima, 1).float(), torch.cat(maxima, 1).float()

    def dequantize_segment(
        self,
        start: int,
        stop: int,
        lo: torch.Tensor,
        scale: torch.Tensor,
        clamp: torch.Tensor | None,
        config: WeightQuantConfig,
        nf_tables: _NFTables | None,
    ) -> None:
        src = self.segment(start, stop)
        out = self.out[:, start:stop]
        codes = None if self.codes is None else self.codes[:, start:stop]
        work = out if out.dtype == torch.float32 else self.workspace.get("work", src.shape, torch.float32)
        lo_col = lo[:, None]
        scale_col = scale[:, None]
        if clamp is not None:
            clamp_col = clamp[:, None]
            torch.maximum(src, clamp_col.neg(), out=work)
            torch.minimum(work, clamp_col, out=work)
            work.sub_(lo_col)
        else:
            torch.sub(src, lo_col, out=work)
        work.mul_(scale_col)

        if nf_tables is not None:
            nf_tables.dequantize_(work, lo, scale, codes, self.workspace)
        elif config.scale_shift:
            work.floor_().clamp_(max=2**config.bits - 1)
            if codes is not None:
                codes.copy_(work)
            work.add_(0.5).div_(scale_col).add_(lo_col)
        else:
            work.round_()
            if codes is not None:
                codes.copy_(work)
            work.div_(scale_col).add_(lo_col)

        if work is not out:
            out.copy_(work)

    # -- clipping thresholds ----------------------------------------------------------

    def clip_threshold(
        self, config: WeightQuantConfig, sub_abs: torch.Tensor, tensor_threshold: float | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Return the float32 threshold of each row (``None``: nothing is clipped) and,
        when the method finds it on the way, the number of elements above it."""
        if config.clip == "none":
            return None, None
        if config.clip == "tensor_top":
            if tensor_threshold is None:
                return None, None
            return torch.full((self.rows,), tensor_threshold, dtype=torch.float32, device=sub_abs.device), None
        if config.clip == "zscore":
            return self.zscore_threshold(config.clip_value), None
        if config.clip == "block_top":
            k = math.floor(config.clip_value * self.length)
            if k == 0:
                return None, None
            return self.kth_largest_abs(sub_abs, k + 1)
        if config.clip == "iqr":
            return self.iqr_threshold(sub_abs, config.clip_value)
        raise ValueError(f"clip method {config.clip!r} is unknown")

    def zscore_threshold(self, z: float) -> torch.Tensor:
        sum_abs = torch.zeros(self.rows, dtype=torch.float64, device=self.src.device)
        sum_squares = torch.zeros_like(sum_abs)
        for start, stop in self.segments:
            values = self.workspace.get("wide", (self.rows, stop - start), torch.float64)
            values.copy_(self.src[:, start:stop]).abs_()
            sum_abs += values.sum(1)
            sum_squares += values.mul_(values).sum(1)
        mean = sum_abs / self.length
        # sum((a - mean)^2) = sum(a^2) - mean * sum(a); in float64 the difference is
        # exact far below float32 resolution for weight-like data.
        variance = (sum_squares - mean * sum_abs).clamp_(min=0) / max(self.length - 1, 1)
        return (mean + z * variance.sqrt()).float()

    def kth_largest_abs(self, sub_abs: torch.Tensor, kth: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return the ``kth`` largest |w| of each row (``kth`` >= 1) as float32, and the
        number of elements above it (``None`` when not counted).

        The kth largest value of a row is at least the kth largest sub-block maximum t0,
        because the sub-blocks of the kth largest maxima hold kth values >= t0. So every
        value that can rank among the top kth lies in a sub-block whose maximum is >= t0,
        and those sub-blocks (about kth of them) plus the row's tail contain the result.
        """
        rows, length = self.rows, self.length
        full = length // SUB_BLOCK
        if kth > full // 4:
            # NOTE: too few sub-blocks per selected value: select on the whole row. This
            # copies the row, so a large fraction of a long row costs one tensor of memory.
            values = torch.cat([self.segment(a, b).abs() for a, b in self.segments], 1)
            return values.kthvalue(length - kth + 1, dim=1).values, None

        main = sub_abs[:, :full]
        lower_bound = main.topk(kth, dim=1).values[:, -1:]
        selected = int((main >= lower_bound).sum(1).max())
        chosen = main.topk(selected, dim=1).indices
        blocks = self.src[:, : full * SUB_BLOCK].view(rows, full, SUB_BLOCK)
        row_ids = torch.arange(rows, device=chosen.device)[:, None]
        candidates = blocks[row_ids, chosen].reshape(rows, -1)
        tail = self.src[:, full * SUB_BLOCK :]
        candidates = torch.cat([candidates, tail], 1).abs().float()
        threshold = candidates.topk(kth, dim=1).values[:, -1]
        # Every element above the threshold is among the candidates.
        return threshold, (candidates > threshold[:, None]).sum(1)

    def count_above(self, sub_abs: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        """Return the int64 number of elements with ``|w| > threshold`` in each row."""
        rows, length = self.rows, self.length
        full = length // SUB_BLOCK
        column = threshold[:, None]
        hit_rows, hit_blocks = (sub_abs[:, :full] > column).nonzero(as_tuple=True)
        counts = torch.zeros(rows, dtype=torch.int64, device=threshold.device)
        if hit_rows.numel() * SUB_BLOCK > rows * length // 4:
            for start, stop in self.segments:
                # sign(|w| - t) is 1 exactly where |w| > t; summing float32 ones is exact
                # below 2^24 per row and much faster than summing a bool mask.
                values = self.workspace.get("abs", (rows, stop - start), torch.float32)
                torch.abs(self.segment(start, stop), out=values)
                values.sub_(column).sign_().clamp_(min=0)
                counts += values.sum(1).long()
            return counts
        if hit_rows.numel():
            blocks = self.src[:, : full * SUB_BLOCK].view(rows, full, SUB_BLOCK)[hit_rows, hit_blocks]
            counts.index_add_(0, hit_rows, (blocks.abs() > column[hit_rows]).sum(1))
        tail = self.src[:, full * SUB_BLOCK :]
        if tail.numel():
            counts += (tail.abs() > column).sum(1)
        return counts

    def iqr_threshold(self, sub_abs: torch.Tensor, k: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return ``q3 + k (q3 - q1)`` of ``|w|`` per row and, when the histogram gives
        it, the number of elements above it."""
        length = self.length
        positions = (0.25 * (length - 1), 0.75 * (length - 1))
        ranks = []
        for position in positions:
            lower = math.floor(position)
            ranks += [lower, min(lower + 1, length - 1)]
        histogram = _AbsHistogram(self, sub_abs.amax(1))
        keys, within, merged = histogram.rank_bins(ranks)

        # The threshold is monotone in q1 and q3, so the value ranges of their bins bound
        # it. Collecting the bins in that range gives the clipped count without another pass.
        def bin_range(low_key: torch.Tensor, high_key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return _key_value(low_key), _key_value(high_key + 1)

        q1_low, q1_high = bin_range(keys[:, 0], keys[:, 1])
        q3_low, q3_high = bin_range(keys[:, 2], keys[:, 3])
        t_low = (q3_low + k * (q3_low - q1_high)).clamp_(min=0).float()
        t_high = (q3_high + k * (q3_high - q1_low)).float()
        threshold_keys = (t_low.view(torch.int32) >> _KEY_SHIFT, t_high.view(torch.int32) >> _KEY_SHIFT)
        ranges = [(keys[:, j], keys[:, j]) for j in range(len(ranks))] + [threshold_keys]
        found = histogram.collect(ranges)

        values = histogram.values(found, keys, within).double()
        if bool(merged.any()):
            values = values.clone()
            for row in merged.any(1).nonzero().flatten().tolist():
                # NOTE: rare (a rank below 2^-16 of the row's max |w|); this copies the row.
                row_values = torch.cat([self.segment(a, b)[row].abs() for a, b in self.segments])
                values[row] = row_values.sort().values[torch.tensor(ranks, device=values.device)].double()
        q1 = values[:, 0] + (positions[0] - ranks[0]) * (values[:, 1] - values[:, 0])
        q3 = values[:, 2] + (positions[1] - ranks[2]) * (values[:, 3] - values[:, 2])
        threshold = (q3 + k * (q3 - q1)).float()
        counts = None if bool(merged.any()) else histogram.count_above(found, threshold, threshold_keys)
        return threshold, counts

    def abs_bits(self, start: int, stop: int) -> torch.Tensor:
        """Return the int32 bit patterns of ``|w|`` in float32, monotone in ``|w|``."""
        values = self.workspace.get("abs", (self.rows, stop - start), torch.float32)
        torch.abs(self.segment(start, stop), out=values)
        return values.view(torch.int32)


def _key_value(key: torch.Tensor) -> torch.Tensor:
    """Return the smallest float value (as float64) whose bin key is ``key``."""
    return (key.to(torch.int32) << _KEY_SHIFT).view(torch.float32).double()


class _AbsHistogram:
    """Counts of ``|w|`` per row in bins of float32 bit patterns, for exact order statistics.

    A bin is the bit pattern without its low 16 bits (1/128 of an octave). Pass 1 counts
    each row's elements in a window of 16 octaves below the row's max |w|; smaller values
    share bin 0. Pass 2 (:meth:`collect`) gathers the elements of chosen bins, and
    sorting those few gives exact values and counts.
    """

    def __init__(self, group: _Group, abs_max: torch.Tensor) -> None:
        self.group = group
        rows, bins, device = group.rows, _HISTOGRAM_BINS, abs_max.device
        self.device = device
        # Every key of a row is <= the key of its max |w| = base + bins - 1.
        self.base = (abs_max.view(torch.int32) >> _KEY_SHIFT) - (bins - 1)
        self.offsets = torch.arange(0, rows * bins, bins, dtype=torch.int32, device=device)[:, None]
        counts = torch.zeros(rows * bins, dtype=torch.int64, device=device)
        self._single_segment = None
        for start, stop in group.segments:
            bits, index = self._bin_index(start, stop)
            counts += torch.bincount(index.view(-1), minlength=rows * bins)
            if len(group.segments) == 1:
                self._single_segment = (bits, index)
        self.counts = counts.view(rows, bins)
        self.cumulative = self.counts.cumsum(1)

    def _bin_index(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the bit patterns of a segment and each element's bin + row * bins."""
        bits = self.group.abs_bits(start, stop)
        index = self.group.workspace.get("key", bits.shape, torch.int32)
        torch.bitwise_right_shift(bits, _KEY_SHIFT, out=index)
        index.sub_(self.base[:, None]).clamp_(min=0).add_(self.offsets)
        return bits, index

    def rank_bins(self, ranks: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return, per row and rank, the bin's key, the rank within the bin, and whether the
        rank fell into the shared bin 0."""
        rank_table = torch.tensor(ranks, dtype=torch.int64, device=self.device).expand(self.group.rows, -1)
        target = torch.searchsorted(self.cumulative, rank_table.contiguous(), right=True)
        before = torch.where(target > 0, self.cumulative.gather(1, (target - 1).clamp(min=0)), 0)
        merged = (target == 0) & (self.base[:, None] > 0)
        return target + self.base[:, None], rank_table - before, merged

    def collect(self, ranges: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Gather the elements whose key lies in one of the per-row inclusive key ranges.

        Returns their ``(row << 31) | bits``, sorted: by row, then by value (non-negative
        float32 bit patterns are < 2^31).
        """
        group, bins = self.group, _HISTOGRAM_BINS
        rows = group.rows
        # Mark the bins of every range with a +1/-1 difference array and a cumulative sum.
        marks = torch.zeros(rows, bins + 1, dtype=torch.int32, device=self.device)
        for low, high in ranges:
            first = (low.long() - self.base.long()).view(rows).clamp(1, bins)
            last = (high.long() - self.base.long()).view(rows).clamp(0, bins - 1) + 1
            valid = last > first
            row_ids = torch.arange(rows, device=self.device)[valid]
            marks.index_put_((row_ids, first[valid]), torch.ones_like(row_ids, dtype=torch.int32), accumulate=True)
            marks.index_put_((row_ids, last[valid]), -torch.ones_like(row_ids, dtype=torch.int32), accumulate=True)
        selected = (marks.cumsum(1)[:, :bins] > 0).to(torch.uint8).view(-1)

        found_rows, found_bits = [], []
        for start, stop in group.segments:
            bits, index = self._single_segment if self._single_segment is not None else self._bin_index(start, stop)
            flags = group.workspace.get("flags", bits.shape, torch.uint8)
            torch.index_select(selected, 0, index.view(-1), out=flags.view(-1))
            hit_rows, hit_columns = flags.nonzero(as_tuple=True)
            found_rows.append(hit_rows)
            found_bits.append(bits[hit_rows, hit_columns])
        combined = (torch.cat(found_rows).long() << 31) | torch.cat(found_bits).long()
        return combined.sort().values

    def _row_keys(self, keys: torch.Tensor) -> torch.Tensor:
        row_ids = torch.arange(self.group.rows, dtype=torch.int64, device=self.device)
        return row_ids.view(-1, *([1] * (keys.dim() - 1))) << 31

    def values(self, found: torch.Tensor, keys: torch.Tensor, within: torch.Tensor) -> torch.Tensor:
        """Return the float32 value at rank ``within`` of each collected bin ``keys``."""
        if found.numel() == 0:
            return torch.zeros(keys.shape, dtype=torch.float32, device=self.device)
        first = torch.searchsorted(found, self._row_keys(keys) | (keys.long() << _KEY_SHIFT))
        position = (first + within).clamp_(0, found.numel() - 1)
        return (found[position] & 0x7FFFFFFF).to(torch.int32).view(torch.float32).clone()

    def count_above(
        self, found: torch.Tensor, threshold: torch.Tensor, collected: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor | None:
        """Return the number of elements with ``|w| > threshold`` per row, or ``None`` when
        the threshold's bin was not collected."""
        key = (threshold.view(torch.int32) >> _KEY_SHIFT).long()
        low, high = collected
        bin_index = key - self.base.long()
        inside = (key >= low.long()) & (key <= high.long()) & (bin_index >= 1)
        beyond = bin_index >= _HISTOGRAM_BINS
        if not bool((inside | beyond).all()):
            return None
        bins = _HISTOGRAM_BINS
        last = bin_index.clamp(0, bins - 1)
        # Elements in bins above the threshold's bin, plus those of its bin above it.
        total = self.cumulative[:, -1]
        above_bin = total - self.cumulative.gather(1, last[:, None]).view(-1)
        row_keys = self._row_keys(key)
        in_bin = torch.searchsorted(found, row_keys | ((key + 1) << _KEY_SHIFT)) - torch.searchsorted(
            found, row_keys | threshold.view(torch.int32).long(), right=True
        )
        return torch.where(beyond, 0, above_bin + in_bin)


def _block_scale(lo: torch.Tensor, hi: torch.Tensor, config: WeightQuantConfig) -> torch.Tensor:
    if config.format != "int":
        numerator = 2.0
    elif config.scale_shift:
        numerator = float(2**config.bits)
    else:
        numerator = float(2**config.bits - 1)
    span = hi - lo
    # A true division: `number / tensor` would multiply by a rounded reciprocal.
    scale = torch.full_like(span, numerator) / torch.where(span > 0, span, 1.0)
    return torch.where(span > 0, scale, 1.0)


@dataclasses.dataclass(frozen=True)
class _NFTables:
    """Lookup tables that round ``x = y - 1`` (``y`` in [0, 2]) to the nearest NF level.

    Cell ``c = round(y * 32)`` rounds to level ``base[c]``, or to ``base[c] + 1`` when the
    one midpoint inside the cell, ``midpoint[c]``, is below ``x`` (``inf`` when the cell
    has none). Comparing ``x`` with it equals comparing ``x`` with
    every midpoint. The dequantized value is then looked up per row at ``2 c + above``.
    """

    levels: torch.Tensor
    midpoint: torch.Tensor
    level_of_slot: torch.Tensor
    """Level index of each slot ``2 c + above``."""

    @classmethod
    def build(cls, fmt: str, device: torch.device | str = "cpu") -> _NFTables:
        levels = nf_levels(fmt)
        midpoints = nf_midpoints(levels)
        per_unit = _NF_CELLS_PER_UNIT
        # Cell c takes y in [(c - 0.5) / 32, (c + 0.5) / 32] (the ends may round either
        # way). x = fl(y - 1) is monotone in y, so the cell's x lies between the x of its
        # ends. The last cell also takes y slightly above 2, which float rounding of
        # (hi - lo) * s can produce.
        cells = torch.arange(2 * per_unit + 2, dtype=torch.float32)
        y_low = ((cells - 0.5) / per_unit).clamp_(min=0)
        y_high = (cells + 0.5) / per_unit
        y_high[-1] = 4.0
        base = torch.searchsorted(midpoints, y_low - 1.0, right=False)
        top = torch.searchsorted(midpoints, y_high - 1.0, right=False)
        if bool((top - base > 1).any()):
            raise RuntimeError("a normal-float lookup cell holds two midpoints; raise _NF_CELLS_PER_UNIT")
        midpoint = torch.cat([midpoints, torch.tensor([math.inf])])[base]
        slots = torch.stack([base, (base + 1).clamp_(max=levels.numel() - 1)], 1).view(-1)
        return cls(levels=levels.to(device), midpoint=midpoint.to(device), level_of_slot=slots.to(device))

    def dequantize_(
        self,
        work: torch.Tensor,
        lo: torch.Tensor,
        scale: torch.Tensor,
        codes: torch.Tensor | None,
        workspace: Workspace,
    ) -> None:
        """Replace ``y = (w - lo) * s`` in ``work`` (contiguous) by the dequantized NF value."""
        rows = work.shape[0]
        slots = self.level_of_slot.numel()
        flat = work.view(-1)
        shifted = workspace.get("nf_shifted", flat.shape, torch.float32)
        difference = workspace.get("nf_difference", flat.shape, torch.float32)
        slot = workspace.get("key", flat.shape, torch.int32)

        # y + 2^18 is rounded to a multiple of 2^-5 (the float32 spacing at 2^18), so its
        # bit pattern minus that of 2^18 is round(y * 32).
        torch.add(flat, _NF_MAGIC, out=shifted)
        cell = shifted.view(torch.int32).sub_(_NF_MAGIC_BITS)
        flat.sub_(1.0)
        # x > midpoint exactly when midpoint - x is negative, i.e. has its sign bit set
        # (equal values give +0); the arithmetic shift turns the sign bit into -1 or 0.
        torch.index_select(self.midpoint, 0, cell, out=difference).sub_(flat)
        above = difference.view(torch.int32).bitwise_right_shift_(31)
        torch.mul(cell, 2, out=slot).sub_(above)
        if codes is not None:
            codes.copy_(torch.index_select(self.level_of_slot, 0, slot).view(work.shape))
        # Row r's dequantized values of slots 0 .. slots - 1 sit at r * slots + slot.
        values = (self.levels[self.level_of_slot] + 1)[None, :] / scale[:, None] + lo[:, None]
        offsets = torch.arange(0, rows * slots, slots, dtype=torch.int32, device=work.device)
        slot.view(rows, -1).add_(offsets[:, None])
        torch.index_select(values.view(-1), 0, slot, out=flat)
