"""The math oracle: plain PyTorch, any float dtype (float64 in tests), ``backend="math"``.

It materialises the (L, S) score matrix, so it is memory-hungry by design; it is the
definition every fused kernel is tested against, written for clarity, not speed.
Inputs are the canonical views produced by :mod:`attnkern._semantics`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._semantics import band_mask

# Philox4x32-10 constants (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3").
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
_U32 = 0xFFFFFFFF


def _mulhilo32(a: int, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Full 64-bit product of a 32-bit constant and 32-bit values held in int64, split in halves.

    Split ``b`` into 16-bit halves so no intermediate exceeds 2**63 (int64 has no unsigned mul).
    """
    b_lo = b & 0xFFFF
    b_hi = b >> 16
    lo_part = a * b_lo  # < 2**48
    mid = (lo_part >> 16) + a * b_hi  # product = mid * 2**16 + (lo_part & 0xFFFF); mid < 2**49
    lo = (lo_part & 0xFFFF) | ((mid & 0xFFFF) << 16)
    hi = (mid >> 16) & _U32
    return hi, lo


def philox4x32(c0, c1, c2, c3, seed: int):
    """Philox4x32-10 on int64 tensors holding uint32 values; ``seed`` is a 64-bit key."""
    k0 = seed & _U32
    k1 = (seed >> 32) & _U32
    for _ in range(10):
        hi0, lo0 = _mulhilo32(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & _U32
        k1 = (k1 + PHILOX_W1) & _U32
    return c0, c1, c2, c3


def dropout_threshold(p: float) -> int:
    """A score survives dropout iff its 32-bit random word is >= this threshold."""
    return min(int(p * 4294967296.0), 4294967295)


def dropout_keep_mask(seed: int, p: float, batch: int, heads: int, len_q: int, len_k: int, device=None) -> torch.Tensor:
    """Boolean ``(B, H, L, S)`` keep-mask of the dropout every backend applies.

    Element ``(b, h, i, j)`` uses the Philox counter ``(j >> 2, i, b * H + h, 0)`` and
    keeps word ``j & 3`` of the output, so one Philox call serves four neighbouring keys.
    """
    j = torch.arange(len_k, dtype=torch.int64, device=device).view(1, 1, len_k)
    i = torch.arange(len_q, dtype=torch.int64, device=device).view(1, len_q, 1)
    bh = torch.arange(batch * heads, dtype=torch.int64, device=device).view(-1, 1, 1)
    shape = (batch * heads, len_q, len_k)
    words = philox4x32(
        (j >> 2).expand(shape), i.expand(shape), bh.expand(shape), torch.zeros(shape, dtype=torch.int64, device=device), seed
    )
    word = torch.stack(words, dim=-1).gather(-1, (j & 3).expand(shape).unsqueeze(-1)).squeeze(-1)
    return (word >= dropout_threshold(p)).view(batch, heads, len_q, len_k)


def _first_equal_key(k: torch.Tensor) -> torch.Tensor:
    """(B, H, S) int64: for each key of each (batch, head), the index of the first key whose row
    compares equal to it (with head dim 0 each key its own: every score is 0 then)."""
    batch, heads, len_k, head_dim = k.shape
    first = torch.arange(len_k, device=k.device).repeat(batch, heads, 1)
    if len_k == 0 or head_dim == 0:
        return first
    positions = torch.arange(len_k, device=k.device)
    for b in range(batch):
        for h in range(heads):
            _, inverse = torch.unique(k[b, h], dim=0, return_inverse=True)
            lowest = torch.full((len_k,), len_k, dtype=torch.long, device=k.device)
            first[b, h] = lowest.scatter_reduce(0, inverse, positions, "amin")[inverse]
    return first


def _scores_allowed(q, k, v, mask, scale, window_left, window_right, bottom_right, softcap=0.0, alibi_slopes=None,
                    exact_ties=False):
    """Scaled scores (softcap, ALiBi bias and float mask applied, in that order), the (B, Hq, L, S)
    keys each query may see (band, bool mask, and not -inf), and v with its heads repeated for GQA.
    exact_ties: equal keys give bit-equal scores (_first_equal_key), for top-k's tie rule."""
    batch, heads_q, len_q, _ = q.shape
    heads_kv, len_k = k.shape[1], k.shape[2]
    # per kv head, before its keys are repeated for the query heads of its group
    first_equal = _first_equal_key(k) if exact_ties else None
    if heads_kv != heads_q:
        group = heads_q // heads_kv
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        first_equal = first_equal.repeat_interleave(group, dim=1) if exact_ties else None
    dots = torch.matmul(q, k.transpose(-1, -2))
    if exact_ties:
        # A float64 GEMM need not sum every key column in one order: MKL on an AMD EPYC (AVX2)
        # gave keys repeated exactly scores up to 2e-14 apart, and the oracle broke exact ties by
        # rounding. Each key takes its first equal key's value (tied + 0 exactly), and keeps its
        # own gradient.
        tied = dots.detach().gather(-1, first_equal.unsqueeze(-2).expand(dots.shape))
        dots = tied + (dots - dots.detach())
    scores = dots * scale
    offset = len_k - len_q if bottom_right else 0
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        pos_q = torch.arange(len_q, device=q.device, dtype=q.dtype).view(-1, 1) + offset
        cols = torch.arange(len_k, device=q.device, dtype=q.dtype).view(1, -1)
        slopes = alibi_slopes.to(q.dtype).expand(batch, heads_q).view(batch, heads_q, 1, 1)
        scores = scores - slopes * (pos_q - cols).abs()
    allowed = band_mask(len_q, len_k, window_left, window_right, offset, device=q.device)
    allowed = allowed.expand(batch, heads_q, len_q, len_k)
    if mask is not None:
        if mask.dtype == torch.bool:
            allowed = allowed & mask
        else:
            scores = scores + mask.to(q.dtype)
    # keys with score -inf (from a float mask) take no part either; NaN scores stay: they make
    # the row NaN, as in torch
    return scores, allowed & (scores != float("-inf")), v


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],
    scale: float,
    window_left: int = -1,
    window_right: int = -1,
    bottom_right: bool = False,
    dropout_p: float = 0.0,
    seed: Optional[int] = None,
    softcap: float = 0.0,
    sinks: Optional[torch.Tensor] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference attention on canonical tensors; returns ``(out, lse)``.

    q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev), mask None or (B, Hq, L, S) bool/float.
    Differentiable by autograd (sinks included), with zero (never NaN) gradients for rows that
    attend nothing. LSE is the natural-log log-sum-exp of the scaled, capped, biased, masked
    scores and the sink; -inf for empty rows without a sink. The modifiers (softcap > 0,
    sinks (Hq,), alibi_slopes (Hq,) or (B, Hq)) follow attnkern._semantics' docstring.
    """
    batch, heads_q, len_q, _ = q.shape
    len_k = k.shape[2]
    dtype = q.dtype
    scores, allowed, v = _scores_allowed(q, k, v, mask, scale, window_left, window_right, bottom_right,
                                         softcap, alibi_slopes)
    neg_inf = torch.tensor(float("-inf"), dtype=dtype, device=q.device)
    masked = torch.where(allowed, scores, neg_inf)
    if len_k:
        row_max = masked.amax(dim=-1, keepdim=True).detach()
    else:  # no keys (amax refuses an empty dim): every row is empty
        row_max = masked.new_zeros(masked.shape[:-1] + (1,))
    if sinks is not None:
        sink = sinks.to(dtype).view(1, heads_q, 1, 1)
        row_max = torch.maximum(row_max, sink.detach())
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    # exponentiate a finite stand-in where disallowed so autograd never sees inf * 0
    safe = torch.where(allowed, scores - row_max, torch.zeros_like(scores))
    weights = torch.where(allowed, torch.exp(safe), torch.zeros_like(scores))
    denom = weights.sum(dim=-1, keepdim=True)
    if sinks is not None:
        # the sink joins the denominator once per row and contributes no value
        denom = denom + torch.exp(sink - row_max)
    empty = denom == 0
    denom_safe = torch.where(empty, torch.ones_like(denom), denom)
    probs = weights / denom_safe
    lse = torch.where(empty, neg_inf, row_max + torch.log(denom_safe)).squeeze(-1)
    if dropout_p > 0.0:
        if seed is None:
            raise ValueError("seed is required when dropout_p > 0")
        keep = dropout_keep_mask(seed, dropout_p, batch, heads_q, len_q, len_k, device=q.device)
        probs = probs * keep.to(dtype) / (1.0 - dropout_p)
    out = torch.matmul(probs, v)
    return out, lse.to(torch.float32) if dtype != torch.float64 else lse


def topk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],
    top_k: int,
    scale: float,
    window_left: int = -1,
    window_right: int = -1,
    bottom_right: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference top-k attention (attnkern/_semantics.py, "Top-k selection"); ``(out, lse, indices)``.

    Scores and allowed keys exactly as in :func:`attention`; a stable descending sort puts
    equal scores in key order, so taking its first ``min(top_k, S)`` entries applies the tie
    rule. The kept probabilities are scattered back into a dense (L, S) matrix, so autograd
    differentiates the softmax over the kept keys only. indices: int64, -1 for empty slots.
    """
    len_k = k.shape[2]
    scores, allowed, v = _scores_allowed(q, k, v, mask, scale, window_left, window_right, bottom_right,
                                         exact_ties=True)
    neg_inf = torch.tensor(float("-inf"), dtype=q.dtype, device=q.device)
    ranked = torch.where(allowed, scores, neg_inf).detach()
    ordered, order = torch.sort(ranked, dim=-1, descending=True, stable=True)
    slots = min(top_k, len_k)
    kept = ordered[..., :slots] > float("-inf")
    indices = torch.where(kept, order[..., :slots], torch.full_like(order[..., :slots], -1))
    safe_index = indices.clamp(min=0)
    picked = scores.gather(-1, safe_index)
    if slots == 0:  # S = 0: every row is empty
        row_max = picked.new_zeros(picked.shape[:-1] + (1,))
    else:
        row_max = torch.where(kept, picked, neg_inf).amax(dim=-1, keepdim=True).detach()
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.where(kept, torch.exp(torch.where(kept, picked - row_max, torch.zeros_like(picked))),
                          torch.zeros_like(picked))
    denom = weights.sum(dim=-1, keepdim=True)
    empty = denom == 0
    denom_safe = torch.where(empty, torch.ones_like(denom), denom)
    probs = torch.zeros_like(scores).scatter_add(-1, safe_index, weights / denom_safe)
    out = torch.matmul(probs, v)
    lse = torch.where(empty, neg_inf, row_max + torch.log(denom_safe)).squeeze(-1)
    return out, lse.to(torch.float32) if q.dtype != torch.float64 else lse, indices


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (on out's device): how backends are scored against this oracle."""
    out, ref = out.detach().double(), ref.detach().double().to(out.device)
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
