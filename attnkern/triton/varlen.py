"""Packed (varlen) and paged kernels: the dense kernels' block loops behind a sequence lookup.

Work items are (sequence, head, tile) with no padding to the longest sequence. Grid axis 0
runs over *virtual tiles* of the packed rows: sequence ``b`` owns tiles
``[cu[b] // BLOCK + b, cu[b + 1] // BLOCK + b + 1)``, at least ``ceil(L_b / BLOCK)`` of them
(``floor(a / n) - floor(c / n) >= floor((a - c) / n)``), so ``total // BLOCK + B`` programs
cover every sequence without reading a length on the host, and at most one program per
sequence finds nothing to do and returns. A program finds its sequence by binary search over
``cu`` (``log2 B`` scalar loads). The work therefore follows the sum over sequences of
``L_q·L_k`` (or of the window), plus O(B) empty programs; a grid of ``(max tiles, B·H)`` with
early exit would also launch ``B·H·max_tiles - sum(tiles)`` empty programs and needs
``max_seqlen`` on the host.

Inside a sequence everything is the dense kernels' code (``_fwd_blocks``, ``_dkdv_blocks``,
``_dq_blocks``, ``finish_rows``) on a batch-1 problem with bottom-right alignment
(``offset = L_k - L_q``). The forward also reads paged K/V (``PAGED``: one page-table
lookup per key, any page size) and can split a query tile's key blocks over ``grid[2]``
programs (``SPLIT``): each writes its normalised partial output and LSE, which the launcher
merges (attnkern/triton/launch_varlen.py).

Dropout (HAS_DROPOUT) is the dense kernels' Philox stream on sequence b as a batch of one
keyed by ``seed + b`` (attnkern/_varlen_semantics.py): counter ``(j >> 2, i, h, 0)`` with i, j
the row and key *within* the sequence, so the mask does not depend on where the sequence sits
in the packed tensors, on paging, or on the split.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .backward import _dkdv_blocks, _dq_blocks, _load_row_stats, load_key_tile, store_key_grads
from .band import key_block_range, query_block_range, segment_bounds
from .forward import LOG2E, MASK_NONE, _fwd_blocks, finish_rows, load_tile

# integer arguments Triton must not specialise on (value 1, divisibility by 16), as in forward.py
BWD_UNSPECIALIZED = ["batch", "search_steps", "total_q", "heads_q", "group", "head_dim", "head_dim_v", "left", "right",
                     "seed_lo", "seed_hi", "drop_threshold", "band_kind", "len_q_bucket", "len_k_bucket"]
FWD_UNSPECIALIZED = BWD_UNSPECIALIZED + ["page_size", "num_splits"]


@triton.jit
def sequence_of_tile(tile, Cu, batch, search_steps, BLOCK: tl.constexpr):
    """``(b, first row of b, tile start within b)`` for virtual tile ``tile`` of the rows packed by ``Cu``.

    b is the last sequence whose first virtual tile ``Cu[b] // BLOCK + b`` is <= tile (those
    starts increase strictly with b, so binary search finds it in ``search_steps`` >= log2(batch)).
    """
    lo = tile * 0
    hi = lo + batch - 1
    for _ in range(search_steps):
        mid = (lo + hi + 1) // 2
        go = tl.load(Cu + mid) // BLOCK + mid <= tile
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid - 1)
    start = tl.load(Cu + lo)
    return lo, start, (tile - start // BLOCK - lo) * BLOCK


@triton.jit
def sequence_keys(CuK, SeqUsedK, b, HAS_SEQUSED: tl.constexpr):
    """First packed key row and key count of sequence b (``seqused_k[b]`` keys if given)."""
    k_start = tl.load(CuK + b)
    len_k = tl.load(CuK + b + 1) - k_start
    if HAS_SEQUSED:
        len_k = tl.load(SeqUsedK + b)
    return k_start, len_k


@triton.jit
def sequence_seed(seed_lo, seed_hi, b):
    """Sequence b's 64-bit dropout seed ``seed + b`` as the Philox key words (lo, hi), carry included."""
    b32 = b.to(tl.uint32)
    lo = seed_lo.to(tl.uint32) + b32
    hi = seed_hi.to(tl.uint32) + (lo < b32).to(tl.uint32)  # unsigned wrap-around: the sum is below b
    return lo, hi


@triton.jit
def _alibi_slope2(Alibi, head_index, HAS_ALIBI: tl.constexpr):
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(Alibi + head_index).to(tl.float32) * LOG2E
    return slope2


@triton.jit
def _split_bounds(lo, hi, chunk_lo, chunk_hi):
    """Segment ``[lo, hi)`` cut to this split's key chunk (block-aligned starts stay aligned)."""
    lo = tl.minimum(tl.maximum(lo, chunk_lo), chunk_hi)
    return lo, tl.maximum(tl.minimum(hi, chunk_hi), lo)


@triton.jit(do_not_specialize=FWD_UNSPECIALIZED)
def varlen_fwd_kernel(
    Q, K, V, Out, Lse, CuQ, CuK, SeqUsedK, BlockTable,
    stride_qm, stride_qh, stride_kn, stride_kh, stride_kp, stride_vn, stride_vh, stride_vp,
    stride_om, stride_oh, stride_os, stride_ls, stride_bt,
    batch, search_steps, total_q, heads_q, group, head_dim, head_dim_v, left, right, page_size, num_splits,
    qk_scale, seed_lo, seed_hi, drop_threshold, drop_scale,
    Sinks, Alibi, softcap2,  # score modifiers: (Hq,) fp32, (B, Hq) fp32, softcap * log2(e)
    band_kind, len_q_bucket, len_k_bucket,  # autotune keys only
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PAD_D: tl.constexpr, PAD_DV: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_SINKS: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SEQUSED: tl.constexpr, PAGED: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # last tiles first: under a causal band they have the most keys (as the dense kernel)
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    b, q_start, m0 = sequence_of_tile(tile, CuQ, batch, search_steps, BLOCK_M)
    len_q = tl.load(CuQ + b + 1) - q_start
    if m0 >= len_q:  # the spare tile of sequence b
        return
    k_start, len_k = sequence_keys(CuK, SeqUsedK, b, HAS_SEQUSED)
    offset = len_k - len_q  # bottom-right alignment per sequence
    h_kv = h // group
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = rows < len_q

    q_base = Q + (q_start + m0).to(tl.int64) * stride_qm + h.to(tl.int64) * stride_qh
    q = load_tile(q_base + (rows - m0)[:, None] * stride_qm + offs_d[None, :], row_ok, offs_d < head_dim,
                  True, PAD_D)
    k_base = K + h_kv.to(tl.int64) * stride_kh
    v_base = V + h_kv.to(tl.int64) * stride_vh
    if not PAGED:
        k_base += k_start.to(tl.int64) * stride_kn
        v_base += k_start.to(tl.int64) * stride_vn
    page_row = BlockTable + b.to(tl.int64) * stride_bt
    slope2 = _alibi_slope2(Alibi, b * heads_q + h, HAS_ALIBI)
    seq_lo, seq_hi = sequence_seed(seed_lo, seed_hi, b)

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    start, full_lo, full_hi, end = key_block_range(m0, len_q, len_k, offset, left, right, BLOCK_M, BLOCK_N)
    chunk_lo = start
    chunk_hi = end
    if SPLIT:  # this program's share of the key blocks
        per_split = tl.cdiv(tl.cdiv(end - start, BLOCK_N), num_splits) * BLOCK_N
        chunk_lo = start + split * per_split
        chunk_hi = tl.minimum(chunk_lo + per_split, end)
    for segment in tl.static_range(3):
        n_lo, n_hi = segment_bounds(segment, start, full_lo, full_hi, end)
        if SPLIT:
            n_lo, n_hi = _split_bounds(n_lo, n_hi, chunk_lo, chunk_hi)
        acc, l_i, m_i = _fwd_blocks(
            acc, l_i, m_i, q, k_base, v_base, q_base, rows, m0, n_lo, n_hi, stride_kn, stride_vn, 0, 0, len_q,
            len_k, offset, left, right, qk_scale, h, seq_lo, seq_hi, drop_threshold, head_dim, head_dim_v, softcap2,
            slope2, page_row, page_size, stride_kp, stride_vp, BLOCK_D, BLOCK_DV, PAD_D, PAD_DV, BLOCK_N,
            segment != 1, MASK_NONE, HAS_DROPOUT, DOT_PRECISION, SOFTCAP, HAS_ALIBI, PAGED)

    # split partials carry no sink (HAS_SINKS is off with SPLIT): the merge adds it once; their
    # l counts dropped weights too, so the LSE-weighted merge of acc * drop_scale / l is exact
    out, lse = finish_rows(acc, l_i, m_i, Sinks, h, drop_scale, HAS_SINKS)
    o_base = Out + split.to(tl.int64) * stride_os + (q_start + m0).to(tl.int64) * stride_om + h.to(tl.int64) * stride_oh
    tl.store(o_base + (rows - m0)[:, None] * stride_om + offs_dv[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < head_dim_v))
    lse_base = Lse + split.to(tl.int64) * stride_ls + h.to(tl.int64) * total_q + q_start
    tl.store(lse_base + rows, lse, mask=row_ok)


@triton.jit(do_not_specialize=BWD_UNSPECIALIZED)
def varlen_dkdv_kernel(
    Q, K, V, dOut, Lse, Delta, dK, dV, CuQ, CuK, SeqUsedK,
    stride_qm, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_dom, stride_doh,
    stride_dkn, stride_dkh, stride_dvn, stride_dvh,
    batch, search_steps, total_q, heads_q, group, head_dim, head_dim_v, left, right,
    scale, qk_scale, seed_lo, seed_hi, drop_threshold, drop_scale, Alibi, softcap2,
    band_kind, len_q_bucket, len_k_bucket,  # autotune keys only
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PAD_D: tl.constexpr, PAD_DV: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_SEQUSED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # one key tile of one K/V head per program, virtual tiles over the keys packed by cu_seqlens_k
    h_kv = tl.program_id(1)
    b, _, n0 = sequence_of_tile(tl.program_id(0), CuK, batch, search_steps, BLOCK_N)
    k_start, len_k = sequence_keys(CuK, SeqUsedK, b, HAS_SEQUSED)
    if n0 >= len_k:  # the spare tile, or keys past seqused_k (their gradient stays 0)
        return
    q_start = tl.load(CuQ + b)
    len_q = tl.load(CuQ + b + 1) - q_start
    offset = len_k - len_q
    offs_n = tl.arange(0, BLOCK_N)
    cols = n0 + offs_n
    col_ok = cols < len_k

    k_row = (k_start + n0).to(tl.int64)
    k_base = K + k_row * stride_kn + h_kv.to(tl.int64) * stride_kh
    v_base = V + k_row * stride_vn + h_kv.to(tl.int64) * stride_vh
    k, v = load_key_tile(k_base, v_base, stride_kn, stride_vn, col_ok, head_dim, head_dim_v, BLOCK_N, BLOCK_D,
                         BLOCK_DV, PAD_D, PAD_DV)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    start, full_lo, full_hi, end = query_block_range(n0, len_q, len_k, offset, left, right, BLOCK_M, BLOCK_N)
    seq_lo, seq_hi = sequence_seed(seed_lo, seed_hi, b)
    for g in range(group):  # the query heads sharing this K/V head, in a fixed order
        h = h_kv * group + g
        q_base = Q + q_start.to(tl.int64) * stride_qm + h.to(tl.int64) * stride_qh
        do_base = dOut + q_start.to(tl.int64) * stride_dom + h.to(tl.int64) * stride_doh
        row_base = h.to(tl.int64) * total_q + q_start  # lse and delta are (Hq, total_q)
        slope2 = _alibi_slope2(Alibi, b * heads_q + h, HAS_ALIBI)
        for segment in tl.static_range(3):
            m_lo, m_hi = segment_bounds(segment, start, full_lo, full_hi, end)
            dk, dv = _dkdv_blocks(
                dk, dv, k, v, q_base, do_base, Q, Lse, Delta, Lse, row_base, cols, n0, m_lo, m_hi, stride_qm,
                stride_dom, 0, 0, len_q, len_k, offset, left, right, qk_scale, h, seq_lo, seq_hi, drop_threshold,
                drop_scale, head_dim, head_dim_v, softcap2, slope2, BLOCK_D, BLOCK_DV, PAD_D, PAD_DV, BLOCK_M,
                BLOCK_N, segment != 1, MASK_NONE, HAS_DROPOUT, DOT_PRECISION, SOFTCAP, HAS_ALIBI,
                False)  # no huge-LSE rare path (see launcher)

    dk_base = dK + k_row * stride_dkn + h_kv.to(tl.int64) * stride_dkh
    dv_base = dV + k_row * stride_dvn + h_kv.to(tl.int64) * stride_dvh
    store_key_grads(dk_base, dv_base, dk * scale, dv, stride_dkn, stride_dvn, col_ok, head_dim, head_dim_v, BLOCK_N,
                    BLOCK_D, BLOCK_DV)


@triton.jit(do_not_specialize=BWD_UNSPECIALIZED)
def varlen_dq_kernel(
    Q, K, V, dOut, Lse, Delta, dQ, CuQ, CuK, SeqUsedK,
    stride_qm, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_dom, stride_doh,
    stride_dqm, stride_dqh,
    batch, search_steps, total_q, heads_q, group, head_dim, head_dim_v, left, right,
    scale, qk_scale, seed_lo, seed_hi, drop_threshold, drop_scale, Alibi, softcap2,
    band_kind, len_q_bucket, len_k_bucket,  # autotune keys only
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PAD_D: tl.constexpr, PAD_DV: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_SEQUSED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b, q_start, m0 = sequence_of_tile(tile, CuQ, batch, search_steps, BLOCK_M)
    len_q = tl.load(CuQ + b + 1) - q_start
    if m0 >= len_q:
        return
    k_start, len_k = sequence_keys(CuK, SeqUsedK, b, HAS_SEQUSED)
    offset = len_k - len_q
    h_kv = h // group
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < len_q
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q_row = (q_start + m0).to(tl.int64)
    q_base = Q + q_row * stride_qm + h.to(tl.int64) * stride_qh
    do_base = dOut + q_row * stride_dom + h.to(tl.int64) * stride_doh
    q = load_tile(q_base + (rows - m0)[:, None] * stride_qm + offs_d[None, :], row_ok, offs_d < head_dim,
                  True, PAD_D)
    do = load_tile(do_base + (rows - m0)[:, None] * stride_dom + offs_dv[None, :], row_ok, offs_dv < head_dim_v,
                   True, PAD_DV)
    lse2, log2_sum, delta = _load_row_stats(Lse, Delta, Lse, h.to(tl.int64) * total_q + q_start, rows, len_q, False)
    k_base = K + k_start.to(tl.int64) * stride_kn + h_kv.to(tl.int64) * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vn + h_kv.to(tl.int64) * stride_vh
    slope2 = _alibi_slope2(Alibi, b * heads_q + h, HAS_ALIBI)
    seq_lo, seq_hi = sequence_seed(seed_lo, seed_hi, b)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    start, full_lo, full_hi, end = key_block_range(m0, len_q, len_k, offset, left, right, BLOCK_M, BLOCK_N)
    for segment in tl.static_range(3):
        n_lo, n_hi = segment_bounds(segment, start, full_lo, full_hi, end)
        dq = _dq_blocks(
            dq, q, do, lse2, log2_sum, delta, k_base, v_base, Q, Delta, rows, m0, n_lo, n_hi, stride_kn, stride_vn,
            0, 0, len_q, len_k, offset, left, right, qk_scale, h, seq_lo, seq_hi, drop_threshold, drop_scale,
            head_dim, head_dim_v, softcap2, slope2, BLOCK_D, BLOCK_DV, PAD_D, PAD_DV, BLOCK_N, segment != 1,
            MASK_NONE, HAS_DROPOUT, False, DOT_PRECISION, SOFTCAP, HAS_ALIBI, False)

    dq_base = dQ + q_row * stride_dqm + h.to(tl.int64) * stride_dqh
    tl.store(dq_base + (rows - m0)[:, None] * stride_dqm + offs_d[None, :], (dq * scale).to(dQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < head_dim))
