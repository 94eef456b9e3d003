"""Forward kernel: tiled online softmax in the exp2 domain, one program per (query block, head, batch).

Scores are scaled by ``scale * log2(e)`` in one multiply so the softmax uses ``exp2``; the
running max ``m`` and sum ``l`` live in that domain and the natural-log LSE is recovered
once at the end as ``(m + log2 l) * ln 2``. The output is divided by ``l`` once, after the
key loop. Only key blocks that meet the band are visited (attnkern/triton/band.py), and
only blocks on its edge evaluate the per-element predicate.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .. import _semantics
from .band import key_block_range, key_bounds, segment_bounds
from .philox import dropout_keep

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
HUGE_LSE = tl.constexpr(_semantics.HUGE_LSE)
TANH_POLY_BOUND = tl.constexpr(_semantics.TANH_POLY_BOUND)
TANH_P0, TANH_P1, TANH_P2, TANH_P3, TANH_P4 = (tl.constexpr(c) for c in _semantics.TANH_POLY)

# the MASK_KIND specialisation
MASK_NONE = tl.constexpr(0)
MASK_BOOL = tl.constexpr(1)
MASK_FLOAT = tl.constexpr(2)
MASK_KINDS = {None: MASK_NONE.value, "bool": MASK_BOOL.value, "float": MASK_FLOAT.value}

# Integer arguments Triton must not specialise on (value 1, divisibility by 16): none of them
# feeds an address that needs alignment, and each specialisation would be another compile.
UNSPECIALIZED = ["heads_q", "group", "len_q", "len_k", "head_dim", "head_dim_v", "offset", "left", "right",
                 "seed_lo", "seed_hi", "drop_threshold", "band_kind", "len_q_bucket", "len_k_bucket"]


@triton.jit
def mask_to_log2(mask_value):
    """A float mask value in log2 units. Only -inf masks a key: finite values at or below about
    -2.4e38 (finfo(float32).min) would overflow to -inf when scaled, so they saturate at -FLT_MAX."""
    x = mask_value * LOG2E
    return tl.where((x == float("-inf")) & (mask_value != float("-inf")), -3.4028234663852886e38, x)


@triton.jit
def softcap_tanh(y):
    """tanh for the softcap, csrc/mask.h softcap_tanh's two branches: y + y^3 P(y^2) for
    |y| < TANH_POLY_BOUND (relative accuracy, so a large cap keeps the scores' own), else
    1 - 2 / (1 + e^(2y)) with y clamped to [-9, 9]. A NaN y fails the bound test and stays NaN
    through the polynomial."""
    z = y * y
    small = y + (y * z) * ((((TANH_P4 * z + TANH_P3) * z + TANH_P2) * z + TANH_P1) * z + TANH_P0)
    x = tl.minimum(tl.maximum(y, -9.0), 9.0)
    big = 1.0 - 2.0 / (1.0 + tl.exp2(x * (2.0 * LOG2E)))
    return tl.where(tl.abs(y) >= TANH_POLY_BOUND, big, small)


@triton.jit
def score_tile(a, b, rows, cols, mask_tile, qk_scale, len_k, offset, left, right, softcap2, slope2,
               EDGE: tl.constexpr, MASK_KIND: tl.constexpr, DOT_PRECISION: tl.constexpr, TRANSPOSED: tl.constexpr,
               SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """Scores ``a @ b`` in the log2 domain, -inf where a key takes no part; and tanh of the capped
    scores (for the backward's 1 - tanh^2; the scores themselves without SOFTCAP).

    (rows x keys) from ``a = Q, b = K^T``; with TRANSPOSED, (keys x rows) from ``a = K, b = Q^T``,
    the orientation the dK/dV pass needs. The forward and both backward passes score here, so
    they agree on every masked element. ``mask_tile`` comes from load_mask_tile in the same
    orientation; EDGE applies the band predicate (edge blocks only). The score modifiers come
    first (attnkern/_semantics.py): SOFTCAP caps at ``softcap2 = softcap * log2(e)``, HAS_ALIBI
    subtracts ``slope2 * |row + offset - col|`` (``slope2 = slope * log2(e)``).
    """
    s = tl.dot(a, b, input_precision=DOT_PRECISION) * qk_scale
    t = s
    if SOFTCAP:
        t = softcap_tanh(s / softcap2)
        s = softcap2 * t
    if HAS_ALIBI:
        if TRANSPOSED:
            dist = tl.abs((rows[None, :] + offset) - cols[:, None]).to(tl.float32)
        else:
            dist = tl.abs((rows[:, None] + offset) - cols[None, :]).to(tl.float32)
        s -= slope2 * dist
    if MASK_KIND == MASK_FLOAT:
        s += mask_to_log2(mask_tile.to(tl.float32))
    if EDGE:
        lo, hi = key_bounds(rows, len_k, offset, left, right)
        if TRANSPOSED:
            s = tl.where((cols[:, None] >= lo[None, :]) & (cols[:, None] < hi[None, :]), s, float("-inf"))
        else:
            s = tl.where((cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None]), s, float("-inf"))
    if MASK_KIND == MASK_BOOL:
        s = tl.where(mask_tile != 0, s, float("-inf"))
    return s, t


@triton.jit
def load_tile(ptrs, ok0, ok1, CHECK0: tl.constexpr, CHECK1: tl.constexpr):
    """Load a 2-D tile, bounds-checking only the dimensions that can run past the tensor."""
    if CHECK0 and CHECK1:
        tile = tl.load(ptrs, mask=ok0[:, None] & ok1[None, :], other=0.0)
    elif CHECK0:
        tile = tl.load(ptrs, mask=ok0[:, None], other=0.0)
    elif CHECK1:
        tile = tl.load(ptrs, mask=ok1[None, :], other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def load_mask_tile(mask_blk, rows, cols, m0, n0, stride_mm, stride_mn, len_q, len_k, MASK_KIND: tl.constexpr,
                   TRANSPOSED: tl.constexpr):
    """The user mask over rows x cols (cols x rows with TRANSPOSED); 0 without a mask.

    ``mask_blk`` points at element (m0, n0). Broadcast dimensions have stride 0, so a
    (1, 1, L, S) or (B, 1, 1, S) mask is read in place, never copied.
    """
    if MASK_KIND == MASK_NONE:
        tile = 0
    elif TRANSPOSED:
        ptrs = mask_blk + (cols - n0)[:, None] * stride_mn + (rows - m0)[None, :] * stride_mm
        tile = tl.load(ptrs, mask=(cols[:, None] < len_k) & (rows[None, :] < len_q), other=0)
    else:
        ptrs = mask_blk + (rows - m0)[:, None] * stride_mm + (cols - n0)[None, :] * stride_mn
        tile = tl.load(ptrs, mask=(rows[:, None] < len_q) & (cols[None, :] < len_k), other=0)
    return tile


@triton.jit
def _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, mask_row, rows, m0, n_start, n_end,
                stride_kn, stride_vn, stride_mm, stride_mn, len_q, len_k, offset, left, right, qk_scale,
                head_index, seed_lo, seed_hi, drop_threshold, head_dim, head_dim_v, softcap2, slope2,
                page_row, page_size, stride_kp, stride_vp,
                BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PAD_D: tl.constexpr, PAD_DV: tl.constexpr,
                BLOCK_N: tl.constexpr, EDGE: tl.constexpr, MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, PAGED: tl.constexpr):
    """Key blocks ``[n_start, n_end)`` into the running (acc, l, m). With PAGED, key j is row
    ``j % page_size`` of page ``page_row[j // page_size]`` (k_base/v_base point at the head;
    stride_kp/stride_vp step pages): any page size, one gathered row per key."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n = tl.arange(0, BLOCK_N)
    # 64-bit block pointers advanced per step; in-tile offsets stay 32-bit
    k_blk = k_base + n_start.to(tl.int64) * stride_kn
    v_blk = v_base + n_start.to(tl.int64) * stride_vn
    mask_blk = mask_row + n_start.to(tl.int64) * stride_mn
    for n0 in range(n_start, n_end, BLOCK_N):
        cols = n0 + offs_n
        # interior blocks end inside the sequence: only the padded head dim needs a bound
        col_ok = cols < len_k
        if PAGED:
            page = tl.load(page_row + cols // page_size, mask=col_ok, other=0).to(tl.int64)
            slot = cols % page_size
            kT = load_tile(k_base + offs_d[:, None] + (page * stride_kp + slot * stride_kn)[None, :],
                           offs_d < head_dim, col_ok, PAD_D, EDGE)
        else:
            kT = load_tile(k_blk + offs_d[:, None] + offs_n[None, :] * stride_kn, offs_d < head_dim, col_ok,
                           PAD_D, EDGE)
        mask_tile = load_mask_tile(mask_blk, rows, cols, m0, n0, stride_mm, stride_mn, len_q, len_k, MASK_KIND,
                                   False)
        s, _ = score_tile(q, kT, rows, cols, mask_tile, qk_scale, len_k, offset, left, right, softcap2, slope2,
                          EDGE, MASK_KIND, DOT_PRECISION, False, SOFTCAP, HAS_ALIBI)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row with no key so far keeps m = -inf; subtracting 0 instead avoids inf - inf
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_sub)
        p = tl.exp2(s - m_sub[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            # dropped weights still count in l (dropout acts after the softmax)
            p = tl.where(dropout_keep(rows, n0, head_index, seed_lo, seed_hi, drop_threshold, BLOCK_N), p, 0.0)
        if PAGED:
            v = load_tile(v_base + (page * stride_vp + slot * stride_vn)[:, None] + offs_dv[None, :], col_ok,
                          offs_dv < head_dim_v, EDGE, PAD_DV)
        else:
            v = load_tile(v_blk + offs_n[:, None] * stride_vn + offs_dv[None, :], col_ok, offs_dv < head_dim_v,
                          EDGE, PAD_DV)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
        k_blk += BLOCK_N * stride_kn
        v_blk += BLOCK_N * stride_vn
        mask_blk += BLOCK_N * stride_mn
    return acc, l_i, m_i


@triton.jit
def finish_rows(acc, l_i, m_i, Sinks, h, drop_scale, HAS_SINKS: tl.constexpr):
    """Normalised output rows and their natural-log LSE from the running (acc, l, m)."""
    if HAS_SINKS:
        # the head's sink joins the denominator once and adds no value (a row with no key keeps
        # acc = 0 and gets l = 1 at m = sink: output 0, LSE = sink)
        sink2 = tl.load(Sinks + h).to(tl.float32) * LOG2E + tl.zeros_like(m_i)  # (per row)
        # a NaN sink makes the rows NaN and a sink of +inf takes all the weight (output 0, LSE
        # +inf) but in a row a NaN score made NaN: the limits of logaddexp(LSE of the keys, sink),
        # as reference.py. Both join the sums below as no sink, then set the rows.
        sink_f = tl.where(sink2 < float("inf"), sink2, float("-inf"))
        top = tl.maximum(m_i, sink_f)
        top_sub = tl.where(top == float("-inf"), 0.0, top)
        keys = tl.exp2(m_i - top_sub)
        l_i = l_i * keys + tl.exp2(sink_f - top_sub)
        acc = acc * keys[:, None]
        m_i = top
        takes_all = (sink2 == float("inf")) & (l_i == l_i)
        acc = tl.where(takes_all[:, None], 0.0, acc)
        l_i = tl.where(sink2 != sink2, float("nan"), tl.where(takes_all, 1.0, l_i))
        m_i = tl.where(takes_all, float("inf"), m_i)
    empty = l_i == 0.0  # no key in the band (or every key masked): output 0, LSE -inf
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc * (drop_scale / l_safe)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
    return out, lse


@triton.jit(do_not_specialize=UNSPECIALIZED)
def fwd_kernel(
    Q, K, V, Mask, Out, Lse, RowStats,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om,
    heads_q, group, len_q, len_k, head_dim, head_dim_v, offset, left, right,
    qk_scale, seed_lo, seed_hi, drop_threshold, drop_scale,
    Sinks, Alibi, softcap2,  # score modifiers: (Hq,) fp32, (B, Hq) fp32, softcap * log2(e)
    band_kind, len_q_bucket, len_k_bucket,  # autotune keys only
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PAD_D: tl.constexpr, PAD_DV: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_ALIBI: tl.constexpr, WRITE_STATS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # last query blocks first: under a causal band they have the most keys, so the longest
    # programs start first and the short ones fill the tail
    m0 = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    h = tl.program_id(1)
    b = tl.program_id(2)
    h_kv = h // group
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = rows < len_q

    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + m0.to(tl.int64) * stride_qm
    q = load_tile(q_base + (rows - m0)[:, None] * stride_qm + offs_d[None, :], row_ok, offs_d < head_dim,
                  True, PAD_D)
    k_base = K + b.to(tl.int64) * stride_kb + h_kv.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h_kv.to(tl.int64) * stride_vh
    mask_row = Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh + m0.to(tl.int64) * stride_mm
    head_index = b * heads_q + h
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(Alibi + head_index).to(tl.float32) * LOG2E

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    start, full_lo, full_hi, end = key_block_range(m0, len_q, len_k, offset, left, right, BLOCK_M, BLOCK_N)
    for segment in tl.static_range(3):
        n_lo, n_hi = segment_bounds(segment, start, full_lo, full_hi, end)
        acc, l_i, m_i = _fwd_blocks(
            acc, l_i, m_i, q, k_base, v_base, mask_row, rows, m0, n_lo, n_hi, stride_kn, stride_vn, stride_mm,
            stride_mn, len_q, len_k, offset, left, right, qk_scale, head_index, seed_lo, seed_hi, drop_threshold,
            head_dim, head_dim_v, softcap2, slope2, q_base, 1, 0, 0, BLOCK_D, BLOCK_DV, PAD_D, PAD_DV, BLOCK_N,
            segment != 1, MASK_KIND, HAS_DROPOUT, DOT_PRECISION, SOFTCAP, HAS_ALIBI, False)

    if WRITE_STATS:
        # the backward's rare path (csrc/params.h row_stats): the keys' (max, log2 sum), (+inf, 0)
        # if none (a sink's mass is added back by the backward, csrc/mask.h backward_row_stats)
        no_key = l_i == 0.0
        stats_base = RowStats + 2 * ((b.to(tl.int64) * heads_q + h) * len_q)
        tl.store(stats_base + 2 * rows, tl.where(no_key, float("inf"), m_i), mask=row_ok)
        tl.store(stats_base + 2 * rows + 1, tl.where(no_key, 0.0, tl.log2(tl.where(no_key, 1.0, l_i))), mask=row_ok)
    out, lse = finish_rows(acc, l_i, m_i, Sinks, h, drop_scale, HAS_SINKS)
    o_base = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + m0.to(tl.int64) * stride_om
    tl.store(o_base + (rows - m0)[:, None] * stride_om + offs_dv[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < head_dim_v))
    lse_base = Lse + (b.to(tl.int64) * heads_q + h) * len_q
    tl.store(lse_base + rows, lse, mask=row_ok)
