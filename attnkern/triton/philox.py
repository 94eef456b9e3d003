"""Philox4x32-10 in Triton: the dropout stream of attnkern/reference.py, bit for bit.

Score ``(b, h, i, j)`` uses counter ``(j >> 2, i, b * Hq + h, 0)``, the 64-bit seed as key
``(lo, hi)``, and keeps word ``j & 3``; it survives iff that word is >= the threshold
``floor(p * 2**32)``. One Philox call therefore serves four neighbouring keys: a tile draws
``BLOCK_N / 4`` calls per row and interleaves the four output words back into key order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Ten Philox rounds on uint32 tensors; returns the four output words."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def dropout_words(rows, n0, head, seed_lo, seed_hi, BLOCK_N: tl.constexpr):
    """Random words of shape (rows, BLOCK_N) for keys ``n0 .. n0 + BLOCK_N`` (n0 a multiple of 4)."""
    groups = (n0 // 4 + tl.arange(0, BLOCK_N // 4)).to(tl.uint32)
    shape_rows = rows.to(tl.uint32)[:, None]
    c0 = groups[None, :] + tl.zeros_like(shape_rows)
    c1 = shape_rows + tl.zeros_like(groups[None, :])
    c2 = tl.zeros_like(c0) + head.to(tl.uint32)
    c3 = tl.zeros_like(c0)
    w0, w1, w2, w3 = philox4x32_10(c0, c1, c2, c3, seed_lo.to(tl.uint32), seed_hi.to(tl.uint32))
    # join(join(w0, w2), join(w1, w3)) has [..., t, s] = w[2t + s]; flattening the trailing
    # (2, 2) in row-major order therefore puts word (j & 3) at key j
    words = tl.join(tl.join(w0, w2), tl.join(w1, w3))
    return tl.reshape(words, (rows.shape[0], BLOCK_N))


@triton.jit
def dropout_keep(rows, n0, head, seed_lo, seed_hi, threshold, BLOCK_N: tl.constexpr):
    """Boolean keep mask (rows, BLOCK_N): word >= threshold."""
    return dropout_words(rows, n0, head, seed_lo, seed_hi, BLOCK_N) >= threshold.to(tl.uint32)


@triton.jit(do_not_specialize=["head", "seed_lo", "seed_hi"])
def _dropout_words_kernel(Out, len_q, len_k, head, seed_lo, seed_hi, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n0 = tl.program_id(1) * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    words = dropout_words(rows, n0, head, seed_lo, seed_hi, BLOCK_N)
    inside = (rows[:, None] < len_q) & (cols[None, :] < len_k)
    tl.store(Out + rows[:, None] * len_k + cols[None, :], words.to(tl.int64), mask=inside)


def dropout_words_table(len_q: int, len_k: int, head: int, seed: int, device="cpu") -> torch.Tensor:
    """The (len_q, len_k) random words the kernels draw for one head, as int64 (for tests)."""
    seed &= 0xFFFFFFFFFFFFFFFF
    out = torch.full((len_q, len_k), -1, dtype=torch.int64, device=device)
    block_m, block_n = 16, 16
    grid = (triton.cdiv(len_q, block_m), triton.cdiv(len_k, block_n))
    _dropout_words_kernel[grid](out, len_q, len_k, head, seed & 0xFFFFFFFF, seed >> 32, BLOCK_M=block_m,
                                BLOCK_N=block_n)
    return out
