"""The numba kernels of :mod:`superweight.quantization.fused`.

Import this module through :func:`superweight.quantization.fused.compiled`, which first
points numba's cache at the superweight cache folder.
"""

import math

import numba
import numpy as np

# The same histogram layout as the torch kernels: 16 octaves below the block's max |w|,
# 128 bins per octave.
from superweight.quantization.blockwise import _HISTOGRAM_BINS, _KEY_SHIFT

f32 = np.float32

# Codes of the clipping rule and the rounding rule.
CLIP_NONE, CLIP_FIXED, CLIP_ZSCORE, CLIP_RANK, CLIP_IQR = range(5)
ROUND_INT, ROUND_SHIFT, ROUND_NF = range(3)


# min and max are exact in any order, so their loops may be vectorized ("reassoc",


# "nsz": the sign of a zero minimum may differ, which changes no dequantized value).


# Non-finite values are caught on the bit patterns, outside floating-point rules.


@numba.njit(cache=True, nogil=True, fastmath={"nnan", "ninf", "nsz", "reassoc"})
def extrema(row, row_bits):
    low = row[0]
    high = row[0]
    exponent = 0
    for j in range(row.size):
        low = min(low, row[j])
        high = max(high, row[j])
        exponent = max(exponent, row_bits[j] & 0x7F800000)
    return low, high, exponent != 0x7F800000  # all exponent bits set: NaN or infinite


# Float64 sums in any order (vectorized): the threshold is rounded to float32, which


# hides their last-bit differences, as with torch's own summation order.


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def abs_moments(row):
    sum_abs = 0.0
    sum_squares = 0.0
    for j in range(row.size):
        value = abs(np.float64(row[j]))
        sum_abs += value
        sum_squares += value * value
    return sum_abs, sum_squares


@numba.njit(cache=True, nogil=True)
def zscore_threshold(row, z):
    sum_abs, sum_squares = abs_moments(row)
    n = row.size
    mean = sum_abs / n
    # The same formula as the torch kernel: sum(a^2) - mean * sum(a), over n - 1.
    variance = max(sum_squares - mean * sum_abs, 0.0) / max(n - 1, 1)
    return f32(mean + z * math.sqrt(variance))


@numba.njit(cache=True, nogil=True)
def abs_order_statistics(row, row_bits, ranks, abs_max_bits):
    """Return the float64 values of |w| at the given ascending ranks (0-based)."""
    n = row.size
    base = (abs_max_bits >> _KEY_SHIFT) - (_HISTOGRAM_BINS - 1)

    counts = np.zeros(_HISTOGRAM_BINS, dtype=np.int64)
    for j in range(n):
        key = ((row_bits[j] & 0x7FFFFFFF) >> _KEY_SHIFT) - base
        if key < 0:
            key = 0
        counts[key] += 1

    # The bin of each rank and its rank inside the bin.
    bin_of = np.empty(ranks.size, dtype=np.int64)
    within = np.empty(ranks.size, dtype=np.int64)
    merged = False
    for i in range(ranks.size):
        total = 0
        b = 0
        while total + counts[b] <= ranks[i]:
            total += counts[b]
            b += 1
        bin_of[i] = b
        within[i] = ranks[i] - total
        if b == 0 and base > 0:
            merged = True  # bin 0 also contains every value below the 16-octave window

    result = np.empty(ranks.size, dtype=np.float64)
    if merged:
        # Rare (a rank below 2^-16 of the block's max |w|): sort the whole block.
        ordered = np.sort(np.abs(row))
        for i in range(ranks.size):
            result[i] = np.float64(ordered[ranks[i]])
        return result

    selected_bins = np.zeros(_HISTOGRAM_BINS, dtype=np.bool_)
    size = 0
    for i in range(ranks.size):
        if not selected_bins[bin_of[i]]:
            selected_bins[bin_of[i]] = True
            size += counts[bin_of[i]]
    collected = np.empty(size, dtype=np.int32)
    filled = 0
    for j in range(n):
        bits = row_bits[j] & 0x7FFFFFFF
        key = (bits >> _KEY_SHIFT) - base
        if key >= 0 and selected_bins[key]:
            collected[filled] = bits
            filled += 1
    collected.sort()  # non-negative float32 bit patterns sort like the values
    values = collected.view(np.float32)
    for i in range(ranks.size):
        start = 0
        for b in range(bin_of[i]):
            if selected_bins[b]:
                start += counts[b]
        result[i] = np.float64(values[start + within[i]])
    return result


@numba.njit(cache=True, nogil=True)
def float_bits(value):
    return np.array([value], dtype=np.float32).view(np.int32)[0]


@numba.njit(cache=True, nogil=True)
def int_pass(row, target, threshold, low, scale):
    clipped = 0
    for j in range(row.size):
        value = row[j]
        clipped += (value > threshold) | (value < -threshold)
        value = min(max(value, -threshold), threshold)
        q = f32(np.rint((value - low) * scale))  # half to even, as torch.round
        target[j] = q / scale + low
    return clipped


@numba.njit(cache=True, nogil=True)
def shift_pass(row, target, threshold, low, scale, top):
    clipped = 0
    half = f32(0.5)
    for j in range(row.size):
        value = row[j]
        clipped += (value > threshold) | (value < -threshold)
        value = min(max(value, -threshold), threshold)
        q = min(f32(np.floor((value - low) * scale)), top)
        target[j] = (q + half) / scale + low
    return clipped


@numba.njit(cache=True, nogil=True)
def nf_pass(row, target, threshold, low, scale, m, d):
    # x > m_k for exactly the midpoints below x, so the chain of selects ends on the
    # nearest level, with ties to the lower one. Unused midpoints are +inf.
    clipped = 0
    one = f32(1.0)
    m0, m1, m2, m3, m4, m5, m6, m7 = m[0], m[1], m[2], m[3], m[4], m[5], m[6], m[7]
    m8, m9, m10, m11, m12, m13, m14 = m[8], m[9], m[10], m[11], m[12], m[13], m[14]
    d0, d1, d2, d3, d4, d5, d6, d7 = d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]
    d8, d9, d10, d11, d12, d13, d14, d15 = d[8], d[9], d[10], d[11], d[12], d[13], d[14], d[15]
    for j in range(row.size):
        value = row[j]
        clipped += (value > threshold) | (value < -threshold)
        value = min(max(value, -threshold), threshold)
        x = (value - low) * scale - one
        v = d0
        v = d1 if x > m0 else v
        v = d2 if x > m1 else v
        v = d3 if x > m2 else v
        v = d4 if x > m3 else v
        v = d5 if x > m4 else v
        v = d6 if x > m5 else v
        v = d7 if x > m6 else v
        v = d8 if x > m7 else v
        v = d9 if x > m8 else v
        v = d10 if x > m9 else v
        v = d11 if x > m10 else v
        v = d12 if x > m11 else v
        v = d13 if x > m12 else v
        v = d14 if x > m13 else v
        v = d15 if x > m14 else v
        target[j] = v
    return clipped


@numba.njit(cache=True, nogil=True)
def code_pass(row, codes, threshold, low, scale, rounding, midpoints, top):
    one = f32(1.0)
    for j in range(row.size):
        value = min(max(row[j], -threshold), threshold)
        y = (value - low) * scale
        if rounding == ROUND_NF:
            level = 0
            for k in range(midpoints.size):
                level += midpoints[k] < y - one
            codes[j] = level
        elif rounding == ROUND_SHIFT:
            codes[j] = np.uint8(min(f32(np.floor(y)), top))
        else:
            codes[j] = np.uint8(f32(np.rint(y)))


@numba.njit(cache=True, parallel=True)
def kernel(src, src_bits, out, codes, write_codes, clip_mode, clip_value, rank, rounding, numerator,
           top_code, levels, midpoints, lo_out, scale_out, clipped_out, finite_out):
    rows, n = src.shape
    one = f32(1.0)
    top = f32(top_code)
    for r in numba.prange(rows):
        row = src[r]
        low, high, finite = extrema(row, src_bits[r])
        if not finite:
            finite_out[r] = False
            continue
        threshold = f32(np.inf)  # clamping to +-inf changes nothing and counts nothing
        if clip_mode == CLIP_FIXED:
            threshold = f32(clip_value)
        elif clip_mode == CLIP_ZSCORE:
            threshold = zscore_threshold(row, clip_value)
        elif clip_mode == CLIP_RANK or clip_mode == CLIP_IQR:
            abs_max_bits = float_bits(max(high, -low))
            if clip_mode == CLIP_RANK:
                ranks = np.array([rank], dtype=np.int64)
                threshold = f32(abs_order_statistics(row, src_bits[r], ranks, abs_max_bits)[0])
            else:
                p1 = 0.25 * (n - 1)
                p3 = 0.75 * (n - 1)
                r1 = math.floor(p1)
                r3 = math.floor(p3)
                ranks = np.array([r1, min(r1 + 1, n - 1), r3, min(r3 + 1, n - 1)], dtype=np.int64)
                v = abs_order_statistics(row, src_bits[r], ranks, abs_max_bits)
                q1 = v[0] + (p1 - r1) * (v[1] - v[0])
                q3 = v[2] + (p3 - r3) * (v[3] - v[2])
                threshold = f32(q3 + clip_value * (q3 - q1))
        low = max(low, -threshold)
        high = min(high, threshold)
        span = high - low
        scale = numerator / span if span > 0 else one
        lo_out[r] = low
        scale_out[r] = scale

        target = out[r]
        if rounding == ROUND_NF:
            # The dequantized value of every level, padded to 16. The padding is never
            # selected, because its midpoints are +inf.
            dequantized = np.zeros(16, dtype=np.float32)
            for i in range(levels.size):
                dequantized[i] = (levels[i] + one) / scale + low
            clipped_out[r] = nf_pass(row, target, threshold, low, scale, midpoints, dequantized)
        elif rounding == ROUND_SHIFT:
            clipped_out[r] = shift_pass(row, target, threshold, low, scale, top)
        else:
            clipped_out[r] = int_pass(row, target, threshold, low, scale)
        if write_codes:
            code_pass(row, codes[r], threshold, low, scale, rounding, midpoints, top)

