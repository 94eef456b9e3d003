"""Backward kernels: a delta preprocess, a dK/dV pass over key blocks, a dQ pass over query blocks.

With ``P = softmax(S)`` recomputed from the saved LSE, ``dP = dO V^T`` and
``delta = rowsum(dO * O) - grad_lse``, the score gradient is ``dS = P * (dP - delta)``
(the LSE output adds ``grad_lse * P``, hence the minus sign). Dropout enters as
``dP <- dP * keep / (1 - p)`` and ``dV = (P * keep / (1 - p))^T dO``.

Each program owns the rows it writes: the dK/dV pass takes one key block of one K/V head
and walks every query head of its GQA group, the dQ pass one query block. No atomics, so
gradients are bit-identical from run to run. Both passes visit only the blocks that meet
the band, with the per-element predicate on edge blocks only, as in the forward.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .band import key_block_range, query_block_range, segment_bounds
from .forward import HUGE_LSE, LOG2E, UNSPECIALIZED, load_mask_tile, load_tile, mask_to_log2, score_tile
from .philox import dropout_keep


@triton.jit(do_not_specialize=["heads_q", "len_q", "head_dim_v"])
def preprocess_kernel(
    Out, dOut, GradLse, Delta,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    heads_q, len_q, head_dim_v,
    BLOCK_DV: tl.constexpr, PAD_DV: tl.constexpr, HAS_GRAD_LSE: tl.constexpr, BLOCK_M: tl.constexpr,
):
    m0 = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1)
    b = tl.program_id(2)
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = rows < len_q
    o_base = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + m0.to(tl.int64) * stride_om
    do_base = dOut + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh + m0.to(tl.int64) * stride_dom
    o = load_tile(o_base + (rows - m0)[:, None] * stride_om + offs_dv[None, :], row_ok, offs_dv < head_dim_v,
                  True, PAD_DV)
    do = load_tile(do_base + (rows - m0)[:, None] * stride_dom + offs_dv[None, :], row_ok, offs_dv < head_dim_v,
                   True, PAD_DV)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row_base = (b.to(tl.int64) * heads_q + h) * len_q
    if HAS_GRAD_LSE:
        delta -= tl.load(GradLse + row_base + rows, mask=row_ok, other=0.0)
    tl.store(Delta + row_base + rows, delta, mask=row_ok)


@triton.jit
def _load_row_stats(Lse, Delta, RowStats, row_base, rows, len_q, HUGE_ROWS: tl.constexpr):
    """(top, log2_sum, delta) of the rows for ``P = 2^((S - top) - log2_sum)``: top is the LSE in the
    log2 domain and log2_sum 0, except with HUGE_ROWS for rows whose LSE is huge (csrc/mask.h,
    backward_row_stats: their fp32 LSE lost log(sum)), which take the recomputed (max, log2 sum)
    plus any excess the saved LSE holds (a sink). Rows without keys (LSE -inf) or past len_q get
    top = +inf, so P = 0."""
    lse = tl.load(Lse + row_base + rows, mask=rows < len_q, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), mask_to_log2(lse))  # finite stays finite
    delta = tl.load(Delta + row_base + rows, mask=rows < len_q, other=0.0)
    log2_sum = tl.zeros_like(lse2)
    if HUGE_ROWS:
        huge = (tl.abs(lse) > HUGE_LSE) & (tl.abs(lse) != float("inf")) & (rows < len_q)
        top = tl.load(RowStats + 2 * (row_base + rows), mask=huge, other=0.0)
        total = tl.load(RowStats + 2 * (row_base + rows) + 1, mask=huge, other=0.0)
        excess = lse2 - (top + total)
        total = tl.where(excess > tl.abs(lse2) * 9.5367431640625e-07, total + excess, total)  # 2^-20
        lse2 = tl.where(huge, top, lse2)
        log2_sum = tl.where(huge, total, log2_sum)
    return lse2, log2_sum, delta


@triton.jit
def _dkdv_blocks(dk, dv, k, v, q_base, do_base, mask_col, Lse, Delta, RowStats, row_base, cols, n0, m_start, m_end,
                 stride_qm, stride_dom, stride_mm, stride_mn, len_q, len_k, offset, left, right, qk_scale,
                 head_index, seed_lo, seed_hi, drop_threshold, drop_scale, head_dim, head_dim_v, softcap2, slope2,
                 BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PAD_D: tl.constexpr, PAD_DV: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EDGE: tl.constexpr, MASK_KIND: tl.constexpr,
                 HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr,
                 HAS_ALIBI: tl.constexpr, HUGE_ROWS: tl.constexpr):
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    # 64-bit block pointers advanced per step; in-tile offsets stay 32-bit
    q_blk = q_base + m_start.to(tl.int64) * stride_qm
    do_blk = do_base + m_start.to(tl.int64) * stride_dom
    mask_blk = mask_col + m_start.to(tl.int64) * stride_mm
    for m0 in range(m_start, m_end, BLOCK_M):
        rows = m0 + offs_m
        row_ok = rows < len_q
        qT = load_tile(q_blk + offs_d[:, None] + offs_m[None, :] * stride_qm, offs_d < head_dim, row_ok,
                       PAD_D, True)
        do = load_tile(do_blk + offs_m[:, None] * stride_dom + offs_dv[None, :], row_ok, offs_dv < head_dim_v,
                       True, PAD_DV)
        lse2, log2_sum, delta = _load_row_stats(Lse, Delta, RowStats, row_base, rows, len_q, HUGE_ROWS)
        # scores transposed (keys x queries) so dK and dV come out of plain dots
        maskT = load_mask_tile(mask_blk, rows, cols, m0, n0, stride_mm, stride_mn, len_q, len_k, MASK_KIND, True)
        sT, tT = score_tile(k, qT, rows, cols, maskT, qk_scale, len_k, offset, left, right, softcap2, slope2, EDGE,
                            MASK_KIND, DOT_PRECISION, True, SOFTCAP, HAS_ALIBI)
        if HUGE_ROWS:  # the max off first, exactly, then the sum (csrc/mask.h backward_row_stats)
            pT = tl.exp2((sT - lse2[None, :]) - log2_sum[None, :])
        else:
            pT = tl.exp2(sT - lse2[None, :])
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keepT = tl.trans(dropout_keep(rows, n0, head_index, seed_lo, seed_hi, drop_threshold, BLOCK_N))
            p_dropT = tl.where(keepT, pT * drop_scale, 0.0)
            dpT = tl.where(keepT, dpT * drop_scale, 0.0)
        else:
            p_dropT = pT
        dv += tl.dot(p_dropT.to(do.dtype), do, input_precision=DOT_PRECISION)
        dsT = pT * (dpT - delta[None, :])
        if SOFTCAP:  # through the cap: d(raw score) = dS * (1 - tanh^2)
            dsT = dsT * (1.0 - tT * tT)
        dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=DOT_PRECISION)
        q_blk += BLOCK_M * stride_qm
        do_blk += BLOCK_M * stride_dom
        mask_blk += BLOCK_M * stride_mm
    return dk, dv


@triton.jit
def load_key_tile(k_base, v_base, stride_kn, stride_vn, col_ok, head_dim, head_dim_v, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PAD_D: tl.constexpr, PAD_DV: tl.constexpr):
    """The K and V rows of one key tile (resident in the dK/dV pass); base pointers at its first key."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = load_tile(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], col_ok, offs_d < head_dim, True, PAD_D)
    v = load_tile(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :], col_ok, offs_dv < head_dim_v,
                  True, PAD_DV)
    return k, v


@triton.jit
def store_key_grads(dk_base, dv_base, dk, dv, stride_dkn, stride_dvn, col_ok, head_dim, head_dim_v,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """dK and dV of one key tile, in the tensors' dtype; rows past the keys and padded dims are not written."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    tl.store(dk_base + offs_n[:, None] * stride_dkn + offs_d[None, :], dk.to(dk_base.dtype.element_ty),
             mask=col_ok[:, None] & (offs_d[None, :] < head_dim))
    tl.store(dv_base + offs_n[:, None] * stride_dvn + offs_dv[None, :], dv.to(dv_base.dtype.element_ty),
             mask=col_ok[:, None] & (offs_dv[None, :] < head_dim_v))


@triton.jit(do_not_specialize=UNSPECIALIZED)
def dkdv_kernel(
    Q, K, V, dOut, Mask, Lse, Delta, RowStats, dK, dV,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    heads_q, group, len_q, len_k, head_dim, head_dim_v, offset, left, right,
    scale, qk_scale, seed_lo, seed_hi, drop_threshold, drop_scale,
    Alibi, softcap2,  # score modifiers: (B, Hq) fp32 slopes, softcap * log2(e)
    band_kind, len_q_bucket, len_k_bucket,  # autotune keys only
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PAD_D: tl.constexpr, PAD_DV: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HUGE_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    n0 = tl.program_id(0) * BLOCK_N
    h_kv = tl.program_id(1)
    b = tl.program_id(2)
    offs_n = tl.arange(0, BLOCK_N)
    cols = n0 + offs_n
    col_ok = cols < len_k

    k_base = K + b.to(tl.int64) * stride_kb + h_kv.to(tl.int64) * stride_kh + n0.to(tl.int64) * stride_kn
    v_base = V + b.to(tl.int64) * stride_vb + h_kv.to(tl.int64) * stride_vh + n0.to(tl.int64) * stride_vn
    k, v = load_key_tile(k_base, v_base, stride_kn, stride_vn, col_ok, head_dim, head_dim_v, BLOCK_N, BLOCK_D,
                         BLOCK_DV, PAD_D, PAD_DV)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    start, full_lo, full_hi, end = query_block_range(n0, len_q, len_k, offset, left, right, BLOCK_M, BLOCK_N)
    for g in range(group):  # the query heads sharing this K/V head, in a fixed order
        h = h_kv * group + g
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        do_base = dOut + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        mask_col = Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh + n0.to(tl.int64) * stride_mn
        row_base = (b.to(tl.int64) * heads_q + h) * len_q
        head_index = b * heads_q + h
        slope2 = 0.0
        if HAS_ALIBI:
            slope2 = tl.load(Alibi + head_index).to(tl.float32) * LOG2E
        for segment in tl.static_range(3):
            m_lo, m_hi = segment_bounds(segment, start, full_lo, full_hi, end)
            dk, dv = _dkdv_blocks(
                dk, dv, k, v, q_base, do_base, mask_col, Lse, Delta, RowStats, row_base, cols, n0, m_lo, m_hi,
                stride_qm, stride_dom, stride_mm, stride_mn, len_q, len_k, offset, left, right, qk_scale, head_index,
                seed_lo, seed_hi, drop_threshold, drop_scale, head_dim, head_dim_v, softcap2, slope2, BLOCK_D, BLOCK_DV,
                PAD_D, PAD_DV, BLOCK_M, BLOCK_N, segment != 1, MASK_KIND, HAS_DROPOUT, DOT_PRECISION, SOFTCAP,
                HAS_ALIBI, HUGE_ROWS)

    dk_base = dK + b.to(tl.int64) * stride_dkb + h_kv.to(tl.int64) * stride_dkh + n0.to(tl.int64) * stride_dkn
    dv_base = dV + b.to(tl.int64) * stride_dvb + h_kv.to(tl.int64) * stride_dvh + n0.to(tl.int64) * stride_dvn
    store_key_grads(dk_base, dv_base, dk * scale, dv, stride_dkn, stride_dvn, col_ok, head_dim, head_dim_v, BLOCK_N,
                    BLOCK_D, BLOCK_DV)


@triton.jit
def _dq_blocks(dq, q, do, lse2, log2_sum, delta, k_base, v_base, mask_row, dmask_row, rows, m0, n_start, n_end,
               stride_kn, stride_vn, stride_mm, stride_mn, len_q, len_k, offset, left, right, qk_scale,
               head_index, seed_lo, seed_hi, drop_threshold, drop_scale, head_dim, head_dim_v, softcap2, slope2,
               BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PAD_D: tl.constexpr, PAD_DV: tl.constexpr,
               BLOCK_N: tl.constexpr, EDGE: tl.constexpr, MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr,
               MASK_GRAD: tl.constexpr, DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
               HUGE_ROWS: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    # 64-bit block pointers advanced per step; in-tile offsets stay 32-bit
    k_blk = k_base + n_start.to(tl.int64) * stride_kn
    v_blk = v_base + n_start.to(tl.int64) * stride_vn
    mask_blk = mask_row + n_start.to(tl.int64) * stride_mn
    dmask_blk = dmask_row + n_start
    for n0 in range(n_start, n_end, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < len_k
        kT = load_tile(k_blk + offs_d[:, None] + offs_n[None, :] * stride_kn, offs_d < head_dim, col_ok,
                       PAD_D, EDGE)
        vT = load_tile(v_blk + offs_dv[:, None] + offs_n[None, :] * stride_vn, offs_dv < head_dim_v, col_ok,
                       PAD_DV, EDGE)
        mask_tile = load_mask_tile(mask_blk, rows, cols, m0, n0, stride_mm, stride_mn, len_q, len_k, MASK_KIND,
                                   False)
        s, t = score_tile(q, kT, rows, cols, mask_tile, qk_scale, len_k, offset, left, right, softcap2, slope2, EDGE,
                          MASK_KIND, DOT_PRECISION, False, SOFTCAP, HAS_ALIBI)
        if HUGE_ROWS:
            p = tl.exp2((s - lse2[:, None]) - log2_sum[:, None])
        else:
            p = tl.exp2(s - lse2[:, None])
        dp = tl.dot(do, vT, input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep = dropout_keep(rows, n0, head_index, seed_lo, seed_hi, drop_threshold, BLOCK_N)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if MASK_GRAD:  # d loss / d (scaled scores + mask), fp32, written by exactly one program
            ptrs = dmask_blk + (rows - m0)[:, None] * len_k + (cols - n0)[None, :]
            tl.store(ptrs, ds, mask=(rows[:, None] < len_q) & col_ok[None, :])
        if SOFTCAP:  # through the cap (the mask's gradient above is dS itself)
            ds = ds * (1.0 - t * t)
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=DOT_PRECISION)
        k_blk += BLOCK_N * stride_kn
        v_blk += BLOCK_N * stride_vn
        mask_blk += BLOCK_N * stride_mn
        dmask_blk += BLOCK_N
    return dq


@triton.jit(do_not_specialize=UNSPECIALIZED)
def dq_kernel(
    Q, K, V, dOut, Mask, Lse, Delta, RowStats, dQ, dMask,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dqb, stride_dqh, stride_dqm,
    heads_q, group, len_q, len_k, head_dim, head_dim_v, offset, left, right,
    scale, qk_scale, seed_lo, seed_hi, drop_threshold, drop_scale,
    Alibi, softcap2,  # score modifiers: (B, Hq) fp32 slopes, softcap * log2(e)
    band_kind, len_q_bucket, len_k_bucket,  # autotune keys only
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PAD_D: tl.constexpr, PAD_DV: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr, MASK_GRAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HUGE_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # last query blocks first: under a causal band they have the most keys, so the longest
    # programs start first and the short ones fill the tail
    m0 = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    h = tl.program_id(1)
    b = tl.program_id(2)
    h_kv = h // group
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < len_q
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + m0.to(tl.int64) * stride_qm
    do_base = dOut + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh + m0.to(tl.int64) * stride_dom
    q = load_tile(q_base + (rows - m0)[:, None] * stride_qm + offs_d[None, :], row_ok, offs_d < head_dim,
                  True, PAD_D)
    do = load_tile(do_base + (rows - m0)[:, None] * stride_dom + offs_dv[None, :], row_ok, offs_dv < head_dim_v,
                   True, PAD_DV)
    row_base = (b.to(tl.int64) * heads_q + h) * len_q
    lse2, log2_sum, delta = _load_row_stats(Lse, Delta, RowStats, row_base, rows, len_q, HUGE_ROWS)
    k_base = K + b.to(tl.int64) * stride_kb + h_kv.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h_kv.to(tl.int64) * stride_vh
    mask_row = Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh + m0.to(tl.int64) * stride_mm
    dmask_row = dMask + (row_base + m0) * len_k  # dMask is (B, Hq, L, S) contiguous
    head_index = b * heads_q + h
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(Alibi + head_index).to(tl.float32) * LOG2E

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    start, full_lo, full_hi, end = key_block_range(m0, len_q, len_k, offset, left, right, BLOCK_M, BLOCK_N)
    for segment in tl.static_range(3):
        n_lo, n_hi = segment_bounds(segment, start, full_lo, full_hi, end)
        dq = _dq_blocks(
            dq, q, do, lse2, log2_sum, delta, k_base, v_base, mask_row, dmask_row, rows, m0, n_lo, n_hi, stride_kn,
            stride_vn, stride_mm, stride_mn, len_q, len_k, offset, left, right, qk_scale, head_index, seed_lo,
            seed_hi, drop_threshold, drop_scale, head_dim, head_dim_v, softcap2, slope2, BLOCK_D, BLOCK_DV, PAD_D,
            PAD_DV, BLOCK_N, segment != 1, MASK_KIND, HAS_DROPOUT, MASK_GRAD, DOT_PRECISION, SOFTCAP, HAS_ALIBI,
            HUGE_ROWS)

    dq_base = dQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh + m0.to(tl.int64) * stride_dqm
    tl.store(dq_base + (rows - m0)[:, None] * stride_dqm + offs_d[None, :], (dq * scale).to(dQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < head_dim))
