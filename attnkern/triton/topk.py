"""Top-k attention in Triton: the ``attnkern::triton_topk_fwd`` / ``triton_topk_bwd`` kernels and launchers.

Semantics: attnkern/_semantics.py ("Top-k selection"), oracle: attnkern.reference.topk_attention.

Forward, one program per (query block, head, batch):
  pass 1 streams the key blocks of the band (band.py, the scores of forward.score_tile, so a
         score here is exactly the dense kernel's) and keeps, per row, its best ``K_PAD``
         keys (K_PAD = min(top_k, S) rounded up to a power of two, <= 256) in registers, as int64
         keys that pack the score's order-preserving bits above the complemented key index: one
         integer compare is the selection order (higher score, then the lower key index: the tie
         rule). The row's running threshold is its worst kept key; while some row's best new
         key beats it, that key replaces it (one insertion per row per step, all rows at once;
         a row that keeps nothing yet takes a whole K_PAD-wide block at once). After the first
         blocks few keys beat the threshold, so most blocks cost a compare and a few steps.
  pass 2 takes the kept keys best first (a max per slot, so no sort is needed for the selection
         order), the softmax over their scores, and gathers their V rows.
Extra memory: none beyond the outputs (the (B, Hq, L, min(top_k, S)) indices); the backward adds
fp32 dK/dV accumulators of K's and V's size.

Backward, one program per (query block, head, batch), from the forward's indices (so it
matches the forward's selection exactly): P over the kept keys recomputed from the LSE and
renormalised (a row that keeps one key then gets exactly no score gradient),
``dS = P (dP - sum P dP)``; dq is accumulated in registers, dk/dv are scattered into fp32
buffers with atomic adds (several rows may keep the same key), so their last bits can vary
from run to run on a GPU; a float mask's gradient is ``dS`` at the kept keys.

The launch checks reuse launch.py's; this module is imported on the first launch only
(see launch.py on why kernel modules are not imported with the capability check).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .band import key_block_range, segment_bounds
from .forward import LN2, MASK_FLOAT, MASK_KINDS, load_mask_tile, load_tile, score_tile
from .launch import _band_args, _check_inputs, _head_blocks, _interpreting, _mask_arg, _strides3, _unit_last_stride

# Largest kept-key count (min(top_k, S)); dispatch.TOPK_MAX_SLOTS states it for the capability table.
MAX_SLOTS = 256

# Key values (encode_keys): every score above -inf encodes above NEG_INF_TOP, encode(-inf, 0).
# The kept row starts with distinct placeholders below every encoded key (EMPTY_KEY - slot), so
# "replace the row's minimum" replaces exactly one slot; scores of -inf (keys outside the band
# or masked) become DROPPED, below the placeholders, so they never take a slot.
_NEG_INF_ORDERED = -2139095041  # the order-preserving int32 of -inf's bits (0xFF800000 ^ 0x7FFFFFFF)
NEG_INF_TOP = tl.constexpr((_NEG_INF_ORDERED << 32) + 0xFFFFFFFF)  # encode(-inf, 0)
EMPTY_KEY = tl.constexpr((_NEG_INF_ORDERED << 32) - 1)  # encode(-inf, 2^32 - 1) - 1
DROPPED = tl.constexpr(-(2**63) + 1)
KEPT_MAX = tl.constexpr(2**63 - 1)

UNSPECIALIZED = ["heads_q", "group", "len_q", "len_k", "head_dim", "head_dim_v", "offset", "left", "right",
                 "slots"]


@triton.jit
def encode_keys(s, cols):
    """int64 keys whose order is the selection order: score bits (monotone) above 2^32 - 1 - index.
    NaN scores become -inf (never kept, as on the CPU kernel); adding 0 turns -0 into +0 (a tie)."""
    s = tl.where(s == s, s + 0.0, float("-inf"))
    bits = s.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) + (4294967296 - (cols.to(tl.int64) + 1))


@triton.jit
def decode_keys(keys):
    """(score, key index) of encode_keys's keys (index -1 and a NaN score for the placeholders)."""
    high = keys >> 32
    ordered = high.to(tl.int32)
    bits = tl.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF)
    low = keys - (high << 32)
    return bits.to(tl.float32, bitcast=True), (4294967296 - (low + 1)).to(tl.int32)


@triton.jit
def _select_blocks(best, q, k_base, mask_row, rows, m0, n_start, n_end, stride_kn, stride_mm, stride_mn,
                   len_q, len_k, offset, left, right, qk_scale, head_dim,
                   BLOCK_D: tl.constexpr, PAD_D: tl.constexpr, BLOCK_N: tl.constexpr, K_PAD: tl.constexpr,
                   EDGE: tl.constexpr, MASK_KIND: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = rows < len_q
    k_blk = k_base + n_start.to(tl.int64) * stride_kn
    mask_blk = mask_row + n_start.to(tl.int64) * stride_mn
    for n0 in range(n_start, n_end, BLOCK_N):
        cols = n0 + offs_n
        kT = load_tile(k_blk + offs_d[:, None] + offs_n[None, :] * stride_kn, offs_d < head_dim, cols < len_k,
                       PAD_D, EDGE)
        mask_tile = load_mask_tile(mask_blk, rows, cols, m0, n0, stride_mm, stride_mn, len_q, len_k, MASK_KIND,
                                   False)
        s, _ = score_tile(q, kT, rows, cols, mask_tile, qk_scale, len_k, offset, left, right, 1.0, 0.0, EDGE,
                          MASK_KIND, DOT_PRECISION, False, False, False)
        keys = tl.where(row_ok[:, None] & (s > float("-inf")), encode_keys(s, cols), DROPPED)
        if BLOCK_N == K_PAD:  # a row that keeps nothing yet takes the whole block in one step
            fresh = tl.max(best, 1) <= EMPTY_KEY
            best = tl.where(fresh[:, None], tl.where(keys == DROPPED, best, keys), best)
            keys = tl.where(fresh[:, None], DROPPED, keys)
        threshold = tl.min(best, 1)  # each row's worst kept key
        candidate = tl.max(keys, 1)  # and its best new one
        while tl.max((candidate > threshold).to(tl.int32), 0) > 0:
            take = candidate > threshold
            best = tl.where(take[:, None] & (best == threshold[:, None]), candidate[:, None], best)
            keys = tl.where(keys == candidate[:, None], DROPPED, keys)
            threshold = tl.min(best, 1)
            candidate = tl.max(keys, 1)
        k_blk += BLOCK_N * stride_kn
        mask_blk += BLOCK_N * stride_mn
    return best


@triton.jit(do_not_specialize=UNSPECIALIZED)
def topk_fwd_kernel(
    Q, K, V, Mask, Out, Lse, Indices,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om,
    heads_q, group, len_q, len_k, head_dim, head_dim_v, offset, left, right, slots, qk_scale,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PAD_D: tl.constexpr, PAD_DV: tl.constexpr,
    MASK_KIND: tl.constexpr, DOT_PRECISION: tl.constexpr, K_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    m0 = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1)
    b = tl.program_id(2)
    h_kv = h // group
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    slot = tl.arange(0, K_PAD)
    row_ok = rows < len_q

    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + m0.to(tl.int64) * stride_qm
    q = load_tile(q_base + (rows - m0)[:, None] * stride_qm + offs_d[None, :], row_ok, offs_d < head_dim,
                  True, PAD_D)
    k_base = K + b.to(tl.int64) * stride_kb + h_kv.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h_kv.to(tl.int64) * stride_vh
    mask_row = Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh + m0.to(tl.int64) * stride_mm

    # pass 1: selection
    best = EMPTY_KEY - tl.zeros([BLOCK_M, K_PAD], dtype=tl.int64) - slot[None, :].to(tl.int64)
    start, full_lo, full_hi, end = key_block_range(m0, len_q, len_k, offset, left, right, BLOCK_M, BLOCK_N)
    for segment in tl.static_range(3):
        n_lo, n_hi = segment_bounds(segment, start, full_lo, full_hi, end)
        best = _select_blocks(best, q, k_base, mask_row, rows, m0, n_lo, n_hi, stride_kn, stride_mm, stride_mn,
                              len_q, len_k, offset, left, right, qk_scale, head_dim, BLOCK_D, PAD_D, BLOCK_N,
                              K_PAD, segment != 1, MASK_KIND, DOT_PRECISION)

    # pass 2: the kept keys best first (selection order), softmax over their scores (log2
    # domain), V rows gathered one slot at a time
    row_base = (b.to(tl.int64) * heads_q + h) * len_q
    index_rows = (row_base + rows) * slots
    for _ in range(slots, K_PAD):  # K_PAD is slots rounded up: drop the extra worst (DROPPED marks a dropped slot)
        worst = tl.min(tl.where(best == DROPPED, KEPT_MAX, best), 1)
        best = tl.where(best == worst[:, None], DROPPED, best)
    score, index = decode_keys(best)
    kept = best > NEG_INF_TOP
    top = tl.max(tl.where(kept, score, float("-inf")), 1)
    top = tl.where(top == float("-inf"), 0.0, top)
    p = tl.where(kept, tl.exp2(tl.where(kept, score, 0.0) - top[:, None]), 0.0)
    total = tl.sum(p, 1)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for j in range(0, slots):
        current = tl.max(best, 1)
        chosen = best == current[:, None]
        best = tl.where(chosen, DROPPED, best)
        key = tl.max(tl.where(chosen & kept, index, -1), 1)
        v = tl.load(v_base + key.to(tl.int64)[:, None] * stride_vn + offs_dv[None, :],
                    mask=(key >= 0)[:, None] & (offs_dv[None, :] < head_dim_v), other=0.0)
        acc += tl.sum(tl.where(chosen, p, 0.0), 1)[:, None] * v.to(tl.float32)
        tl.store(Indices + index_rows + j, key.to(tl.int64), mask=row_ok)

    empty = total == 0.0  # no key in the band (or every key masked): output 0, LSE -inf
    total_safe = tl.where(empty, 1.0, total)
    o_base = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + m0.to(tl.int64) * stride_om
    tl.store(o_base + (rows - m0)[:, None] * stride_om + offs_dv[None, :], (acc / total_safe[:, None]).to(
        Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < head_dim_v))
    tl.store(Lse + row_base + rows, tl.where(empty, float("-inf"), (top + tl.log2(total_safe)) * LN2), mask=row_ok)


@triton.jit
def _kept_keys(k_base, v_base, mask_rows, Indices, index_rows, j0, slots, q, do, lse, row_ok, scale,
               stride_kn, stride_vn, stride_mn, head_dim, head_dim_v,
               BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, MASK_KIND: tl.constexpr, CHUNK: tl.constexpr):
    """Slots [j0, j0 + CHUNK) of each row: key indices, K rows (rows, CHUNK, D), the unnormalised
    probabilities exp(s - lse) and dP = dO . v, all (rows, CHUNK)."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_c = j0 + tl.arange(0, CHUNK)
    key = tl.load(Indices + index_rows[:, None] + offs_c[None, :], mask=row_ok[:, None] & (offs_c[None, :] < slots),
                  other=-1)
    ok = key >= 0
    k = tl.load(k_base + key[:, :, None] * stride_kn + offs_d[None, None, :],
                mask=ok[:, :, None] & (offs_d[None, None, :] < head_dim), other=0.0).to(tl.float32)
    v = tl.load(v_base + key[:, :, None] * stride_vn + offs_dv[None, None, :],
                mask=ok[:, :, None] & (offs_dv[None, None, :] < head_dim_v), other=0.0).to(tl.float32)
    s = tl.sum(q[:, None, :] * k, 2) * scale
    if MASK_KIND == MASK_FLOAT:
        s += tl.load(mask_rows[:, None] + key * stride_mn, mask=ok, other=0.0).to(tl.float32)
    p = tl.where(ok, tl.exp(tl.where(ok, s - lse[:, None], 0.0)), 0.0)
    return key, ok, k, p, tl.sum(do[:, None, :] * v, 2)


@triton.jit(do_not_specialize=UNSPECIALIZED)
def topk_bwd_kernel(
    Q, K, V, dOut, Mask, Lse, Indices, dQ, dK, dV, dMask,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dqb, stride_dqh, stride_dqm,
    heads_q, group, len_q, len_k, head_dim, head_dim_v, slots, scale,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PAD_D: tl.constexpr, PAD_DV: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_GRAD: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr,
):
    m0 = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1)
    b = tl.program_id(2)
    h_kv = h // group
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = rows < len_q
    d_ok = offs_d < head_dim
    dv_ok = offs_dv < head_dim_v

    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    q = load_tile(q_base + rows[:, None] * stride_qm + offs_d[None, :], row_ok, d_ok, True, PAD_D).to(tl.float32)
    do_base = dOut + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    do = load_tile(do_base + rows[:, None] * stride_dom + offs_dv[None, :], row_ok, dv_ok, True, PAD_DV).to(
        tl.float32)
    k_base = K + b.to(tl.int64) * stride_kb + h_kv.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h_kv.to(tl.int64) * stride_vh
    mask_rows = Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh + rows.to(tl.int64) * stride_mm
    row_base = (b.to(tl.int64) * heads_q + h) * len_q
    index_rows = (row_base + rows) * slots
    lse = tl.load(Lse + row_base + rows, mask=row_ok, other=0.0)
    # the kv head's fp32 gradient buffers (B, Hkv, S, E) / (B, Hkv, S, Ev), contiguous
    dk_base = dK + (b.to(tl.int64) * (heads_q // group) + h_kv) * len_k * head_dim
    dv_base = dV + (b.to(tl.int64) * (heads_q // group) + h_kv) * len_k * head_dim_v

    # renormalised: the recomputed probabilities of a row sum to 1 to rounding
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    weighted = tl.zeros([BLOCK_M], dtype=tl.float32)
    for j0 in range(0, slots, CHUNK):
        _, _, _, p, dp = _kept_keys(k_base, v_base, mask_rows, Indices, index_rows, j0, slots, q, do, lse, row_ok,
                                    scale, stride_kn, stride_vn, stride_mn, head_dim, head_dim_v, BLOCK_D, BLOCK_DV,
                                    MASK_KIND, CHUNK)
        total += tl.sum(p, 1)
        weighted += tl.sum(p * dp, 1)
    total = tl.where(total > 0.0, total, 1.0)
    delta = weighted / total

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for j0 in range(0, slots, CHUNK):
        key, ok, k, p, dp = _kept_keys(k_base, v_base, mask_rows, Indices, index_rows, j0, slots, q, do, lse,
                                       row_ok, scale, stride_kn, stride_vn, stride_mn, head_dim, head_dim_v, BLOCK_D,
                                       BLOCK_DV, MASK_KIND, CHUNK)
        p = p / total[:, None]
        ds = p * (dp - delta[:, None])
        dq += tl.sum(ds[:, :, None] * k, 1)
        key64 = key.to(tl.int64)
        tl.atomic_add(dk_base + key64[:, :, None] * head_dim + offs_d[None, None, :],
                      (scale * ds)[:, :, None] * q[:, None, :], mask=ok[:, :, None] & d_ok[None, None, :])
        tl.atomic_add(dv_base + key64[:, :, None] * head_dim_v + offs_dv[None, None, :],
                      p[:, :, None] * do[:, None, :], mask=ok[:, :, None] & dv_ok[None, None, :])
        if MASK_GRAD:  # each (row, key) once: a plain store
            tl.store(dMask + (row_base + rows)[:, None] * len_k + key64, ds, mask=ok)
    dq_base = dQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
    tl.store(dq_base + rows[:, None] * stride_dqm + offs_d[None, :], (dq * scale).to(dQ.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


# ---------------------------------------------------------------------------------------
# launchers (the ops attnkern::triton_topk_fwd / triton_topk_bwd, registered in attnkern/topk.py)


def _tiles(slots_padded: int):
    """(BLOCK_M, BLOCK_N, num_warps): the key tile holds at least K_PAD keys (the merge takes a block's best
    K_PAD); wider kept rows take shorter query tiles so the (BLOCK_M, K_PAD) keys stay in registers.
    The interpreter takes the smallest tiles (several blocks per test sequence). GPU choice unverified:
    no GPU run has timed these."""
    if _interpreting():
        return 16, max(16, slots_padded), 4
    block_m = 64 if slots_padded <= 16 else 32 if slots_padded <= 64 else 16
    return block_m, max(64, slots_padded), 4


def _check_top_k(top_k, len_k) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
    slots = min(top_k, len_k)
    if slots > MAX_SLOTS:
        raise ValueError(f"the Triton top-k kernel keeps at most {MAX_SLOTS} keys per query (min(top_k, S)), "
                         f"got {slots}")
    return slots


def _meta(q, k, v, mask_kind):
    E, Ev = q.shape[3], v.shape[3]
    block_d, block_dv = _head_blocks(E, Ev)
    return dict(BLOCK_D=block_d, BLOCK_DV=block_dv, PAD_D=block_d != E, PAD_DV=block_dv != Ev,
                MASK_KIND=MASK_KINDS[mask_kind])


def forward(q, k, v, mask, top_k, scale, window_left, window_right, bottom_right):
    mask_kind = _check_inputs("triton_topk_fwd", q, k, v, mask, None, scale, window_left, window_right, 0.0)
    B, Hq, L, _ = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    slots = _check_top_k(top_k, S)
    # contiguous, as the CPU op allocates them (one fake kernel serves both)
    out = torch.empty((B, Hq, L, Ev), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, L), dtype=torch.float32, device=q.device)
    indices = torch.empty((B, Hq, L, slots), dtype=torch.int64, device=q.device)
    if B * Hq * L == 0:
        return out, lse, indices
    if slots == 0:  # S == 0: every row is empty
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse, indices
    qc, kc, vc = (_unit_last_stride(t) for t in (q, k, v))
    mask_arg, mask_strides = _mask_arg(mask, qc)
    offset, left, right = _band_args(L, S, window_left, window_right, bottom_right)
    k_pad = triton.next_power_of_2(slots)
    block_m, block_n, warps = _tiles(k_pad)
    extra = {} if _interpreting() else {"num_warps": warps}
    topk_fwd_kernel[(triton.cdiv(L, block_m), Hq, B)](
        qc, kc, vc, mask_arg, out, lse, indices,
        *_strides3(qc), *_strides3(kc), *_strides3(vc), *mask_strides, *_strides3(out),
        Hq, Hq // Hkv, L, S, q.shape[3], Ev, offset, left, right, slots, scale * math.log2(math.e),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", K_PAD=k_pad, BLOCK_M=block_m,
        BLOCK_N=block_n, **_meta(qc, kc, vc, mask_kind), **extra,
    )
    return out, lse, indices


def backward(grad_out, q, k, v, lse, indices, mask, scale, window_left, window_right, bottom_right,
             mask_needs_grad):
    mask_kind = _check_inputs("triton_topk_bwd", q, k, v, mask, None, scale, window_left, window_right, 0.0)
    B, Hq, L, E = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    if tuple(grad_out.shape) != (B, Hq, L, Ev) or grad_out.dtype != q.dtype or grad_out.device != q.device:
        raise ValueError(f"grad_out must be {q.dtype} of shape {(B, Hq, L, Ev)} on {q.device}, got "
                         f"{grad_out.dtype} {tuple(grad_out.shape)} on {grad_out.device}")
    if tuple(lse.shape) != (B, Hq, L) or lse.dtype != torch.float32 or lse.device != q.device:
        raise ValueError(f"lse must be float32 of shape {(B, Hq, L)} on {q.device}, got {lse.dtype} "
                         f"{tuple(lse.shape)} on {lse.device}")
    if (indices.dim() != 4 or tuple(indices.shape[:3]) != (B, Hq, L) or indices.dtype != torch.int64
            or indices.shape[3] > min(S, MAX_SLOTS) or indices.device != q.device):
        raise ValueError(f"indices must be int64 of shape (B, Hq, L, min(top_k, S)) with B, Hq, L = {(B, Hq, L)} "
                         f"on {q.device}, got {indices.dtype} {tuple(indices.shape)} on {indices.device}")
    if mask_needs_grad and mask_kind != "float":
        raise ValueError("mask_needs_grad requires a floating mask")
    if indices.numel() > 0 and (int(indices.min()) < -1 or int(indices.max()) >= S):  # the kernel reads these rows
        raise ValueError(f"indices must lie in [-1, S) = [-1, {S}), got [{int(indices.min())}, {int(indices.max())}]")
    dmask = torch.zeros((B, Hq, L, S) if mask_needs_grad else (0,), dtype=torch.float32, device=q.device)
    dq = torch.empty((B, Hq, L, E), dtype=q.dtype, device=q.device)
    dk32 = torch.zeros((B, Hkv, S, E), dtype=torch.float32, device=q.device)
    dv32 = torch.zeros((B, Hkv, S, Ev), dtype=torch.float32, device=q.device)
    slots = indices.shape[3]
    if B * Hq * L > 0 and slots > 0:
        qc, kc, vc, doc = (_unit_last_stride(t) for t in (q, k, v, grad_out))
        mask_arg, mask_strides = _mask_arg(mask, qc)
        # CHUNK kept slots per step ((rows, CHUNK, D) gathers): wide under the interpreter, where each
        # step costs interpretation overhead, narrow on a GPU, where the tile lives in registers
        block_m, chunk = (16, 16) if _interpreting() else (32, 4)
        extra = {} if _interpreting() else {"num_warps": 4}
        topk_bwd_kernel[(triton.cdiv(L, block_m), Hq, B)](
            qc, kc, vc, doc, mask_arg, lse.contiguous(), indices.contiguous(), dq, dk32, dv32,
            dmask if mask_needs_grad else dk32,
            *_strides3(qc), *_strides3(kc), *_strides3(vc), *_strides3(doc), *mask_strides, *_strides3(dq),
            Hq, Hq // Hkv, L, S, E, Ev, slots, scale,
            MASK_GRAD=mask_needs_grad, BLOCK_M=block_m, CHUNK=chunk, **_meta(qc, kc, vc, mask_kind), **extra,
        )
    else:
        dq.zero_()
    return dq, dk32.to(q.dtype), dv32.to(q.dtype), dmask
