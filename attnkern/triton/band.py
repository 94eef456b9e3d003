"""The attention band in Triton: per-row key bounds and the block ranges every pass loops over.

Same band as attnkern/_semantics.py and csrc/mask.h: query row ``i`` sits at key position
``i + offset`` and sees keys ``[i + offset - left, i + offset + right]`` within ``[0, S)``.
The launcher replaces an unbounded side (-1) by ``L + S``, which no row can reach, so the
kernels need no branch for it.

A block range is returned as ``(start, full_lo, full_hi, end)``: blocks in
``[full_lo, full_hi)`` lie wholly inside the band and inside the sequence, so they skip the
per-element predicate; blocks in ``[start, full_lo)`` and ``[full_hi, end)`` sit on the
band's edge and apply it. Kernels walk the three segments with ``segment_bounds`` in a
``tl.static_range(3)``, so the edge/interior choice is a compile-time specialisation. Blocks
outside ``[start, end)`` are never visited, which is what makes local attention cost O(L * W)
rather than O(L * S).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def key_bounds(rows, len_k, offset, left, right):
    """Half-open range ``[lo, hi)`` of keys each row may attend (hi <= lo: none)."""
    pos = rows + offset
    return tl.maximum(pos - left, 0), tl.minimum(pos + right + 1, len_k)


@triton.jit
def _split(first, start, end, full_lo, full_hi):
    # ``first``/``end`` bound the rows (keys) that take part; none (end <= first) visits no block
    end = tl.where(end > first, end, start)
    # clamp so that start <= full_lo <= full_hi <= end, all block-aligned except a clamped end
    full_lo = tl.minimum(tl.maximum(full_lo, start), end)
    full_hi = tl.maximum(tl.minimum(full_hi, end), full_lo)
    return start, full_lo, full_hi, end


@triton.jit
def key_block_range(m0, len_q, len_k, offset, left, right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key blocks of query block ``[m0, m0 + BLOCK_M)``: ``(start, full_lo, full_hi, end)``.

    The keys any row may see form one interval, ``[lo(first row), hi(last row))``, because
    both bounds grow with the row.
    """
    first_lo, _ = key_bounds(m0, len_k, offset, left, right)
    _, last_hi = key_bounds(tl.minimum(m0 + BLOCK_M, len_q) - 1, len_k, offset, left, right)
    start = (first_lo // BLOCK_N) * BLOCK_N
    # interior: every row of the (unclamped) block sees every key of the key block
    full_lo = tl.cdiv(tl.maximum(m0 + BLOCK_M - 1 + offset - left, 0), BLOCK_N) * BLOCK_N
    full_hi = (tl.maximum(tl.minimum(m0 + offset + right + 1, len_k), 0) // BLOCK_N) * BLOCK_N
    return _split(first_lo, start, last_hi, full_lo, full_hi)


@triton.jit
def query_block_range(n0, len_q, len_k, offset, left, right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query blocks whose rows see any key of ``[n0, n0 + BLOCK_N)``: ``(start, full_lo, full_hi, end)``.

    Rows past ``len_q`` may fall in an interior block; the backward loads them as zeros
    with LSE +inf, so they contribute nothing.
    """
    col_last = tl.minimum(n0 + BLOCK_N, len_k) - 1
    # first row with hi(row) > n0, one past the last row with lo(row) <= col_last
    first = tl.minimum(tl.maximum(n0 - offset - right, 0), len_q)
    end = tl.minimum(tl.maximum(col_last - offset + left + 1, 0), len_q)
    start = (first // BLOCK_M) * BLOCK_M
    full_lo = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - offset - right, 0), BLOCK_M) * BLOCK_M
    full_hi = (tl.maximum(n0 - offset + left + 1, 0) // BLOCK_M) * BLOCK_M
    full_hi = tl.where(n0 + BLOCK_N <= len_k, full_hi, 0)  # a key block past S is never interior
    return _split(first, start, end, full_lo, full_hi)


@triton.jit
def segment_bounds(SEGMENT: tl.constexpr, start, full_lo, full_hi, end):
    """Block bounds of segment 0 (leading edge), 1 (interior) or 2 (trailing edge)."""
    if SEGMENT == 0:
        lo, hi = start, full_lo
    elif SEGMENT == 1:
        lo, hi = full_lo, full_hi
    else:
        lo, hi = full_hi, end
    return lo, hi
