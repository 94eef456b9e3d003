"""Attention between pieces of a sharded sequence, on global positions, and the LSE merge.

A query segment and a key segment each cover consecutive global positions. The band
(``window_left``, ``window_right`` on global positions, top-left aligned, -1 unbounded) cut
down to that pair is again a band: :func:`band_slice` trims the rows that see no key and the
keys no row sees, and rewrites the band for attnkern's top-left kernels, whose windows cannot
be negative. Every fused kernel then runs unchanged: no kernel knows it is distributed.

Partial results of one query row (from different key pieces) are merged by their LSE in fp32
(:func:`merge_attention`). The backward of a piece takes the *merged* output and LSE, as the
fused backward kernels do, so the pieces' gradients add up to the gradient of the whole.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from .. import dispatch, ops
from .._semantics import Problem, band_mask
from .layout import Segment


class Block(NamedTuple):
    """Local query rows [q0, q1) against local key rows [k0, k1), with a top-left window."""

    q0: int
    q1: int
    k0: int
    k1: int
    window_left: int
    window_right: int


def band_slice(q: Segment, k: Segment, left: int, right: int) -> Optional[Block]:
    """The part of the (q, k) segment pair inside the band, or None if it is empty."""
    d = q.start - k.start  # global position of local query row 0, minus that of key row 0
    q0, q1 = 0, q.length
    if right >= 0:
        q0 = max(q0, -d - right)  # rows before this see only keys before the segment
    if left >= 0:
        q1 = min(q1, k.length - d + left)  # rows from here on see only keys after it
    if q0 >= q1:
        return None
    k0 = 0 if left < 0 else max(0, q0 + d - left)
    k1 = k.length if right < 0 else min(k.length, q1 + d + right)
    if k0 >= k1:
        return None
    d += q0 - k0
    wl = -1 if left < 0 or left - d >= q1 - q0 - 1 else left - d  # -1 where the bound cuts nothing
    wr = -1 if right < 0 or right + d >= k1 - k0 - 1 else right + d
    return Block(q.local + q0, q.local + q1, k.local + k0, k.local + k1, wl, wr)


def blocks(q_segs: Sequence[Segment], k_segs: Sequence[Segment], left: int, right: int) -> List[Block]:
    found = (band_slice(qs, ks, left, right) for qs in q_segs for ks in k_segs)
    return [b for b in found if b is not None]


# ---------------------------------------------------------------------------------------
# one block through a backend


def _problem(q, k, v, scale, wl, wr) -> Problem:
    return Problem(
        batch=q.shape[0], heads_q=q.shape[1], heads_kv=k.shape[1], len_q=q.shape[2], len_k=k.shape[2],
        head_dim=q.shape[3], head_dim_v=v.shape[3], scale=scale, window_left=wl, window_right=wr,
        bottom_right=False, dropout_p=0.0, mask_kind=None, dtype=q.dtype, device_type=q.device.type,
    )


def _math_forward(q, k, v, scale, wl, wr):
    from .. import reference

    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    out, lse = reference.attention(q.to(compute), k.to(compute), v.to(compute), None, scale, wl, wr)
    return out.to(q.dtype), lse.to(compute)


def _math_backward(dout, dlse, q, k, v, out, lse, scale, wl, wr):
    """The flash backward in plain torch: P from the given LSE, D = rowsum(dO * O) - dLSE."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v, out, dout = (t.to(compute) for t in (q, k, v, out, dout))
    group = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    allowed = band_mask(q.shape[2], k.shape[2], wl, wr, 0, device=q.device)
    lse = lse.to(compute).unsqueeze(-1)
    scores = torch.matmul(q, kr.transpose(-1, -2)) * scale
    probs = torch.where(allowed & torch.isfinite(lse), torch.exp(scores - lse.nan_to_num(neginf=0.0)), 0.0)
    delta = (dout * out).sum(-1, keepdim=True)
    if dlse is not None:
        delta = delta - dlse.to(compute).unsqueeze(-1)
    dscores = probs * (torch.matmul(dout, vr.transpose(-1, -2)) - delta) * scale
    dq = torch.matmul(dscores, kr)
    dk = torch.matmul(dscores.transpose(-1, -2), q).unflatten(1, (-1, group)).sum(2)
    dv = torch.matmul(probs.transpose(-1, -2), dout).unflatten(1, (-1, group)).sum(2)
    return dq, dk, dv


def block_forward(q, k, v, scale: float, wl: int, wr: int, backend: str):
    name = dispatch.choose(_problem(q, k, v, scale, wl, wr), backend)
    if name == "math":
        return _math_forward(q, k, v, scale, wl, wr)
    fwd = ops.triton_fwd if name == "triton" else ops.native_fwd
    return fwd(q, k, v, None, None, scale, wl, wr, False, 0.0)


def block_backward(dout, dlse, q, k, v, out, lse, scale: float, wl: int, wr: int, backend: str):
    name = dispatch.choose(_problem(q, k, v, scale, wl, wr), backend)
    if name == "math":
        return _math_backward(dout, dlse, q, k, v, out, lse, scale, wl, wr)
    bwd = ops.triton_bwd if name == "triton" else ops.native_bwd
    dq, dk, dv, _ = bwd(dout, dlse, q, k, v, out, lse, None, None, scale, wl, wr, False, 0.0, False)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------
# the LSE merge


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of two disjoint key sets, from the attention over each.

    ``out_*`` are ``(..., L, Ev)``, ``lse_*`` ``(..., L)`` (natural log, -inf for a row that
    saw no key). Returns ``(out, lse)``: out in ``out_a``'s dtype, lse in fp32; the arithmetic
    is fp32 (float64 stays float64). A row empty on both sides gives out 0 and lse -inf,
    never NaN, and so do its gradients. Differentiable.
    """
    for t, name in ((out_a, "out_a"), (lse_a, "lse_a"), (out_b, "out_b"), (lse_b, "lse_b")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if out_a.shape != out_b.shape:
        raise ValueError(f"out_a and out_b must have one shape, got {tuple(out_a.shape)} and {tuple(out_b.shape)}")
    if lse_a.shape != out_a.shape[:-1] or lse_b.shape != out_a.shape[:-1]:
        raise ValueError(
            f"lse_a and lse_b must have shape {tuple(out_a.shape[:-1])} (out without its last dim), "
            f"got {tuple(lse_a.shape)} and {tuple(lse_b.shape)}"
        )
    compute = torch.float64 if torch.float64 in (out_a.dtype, lse_a.dtype) else torch.float32
    out, lse = _merge(out_a.to(compute), lse_a.to(compute), out_b.to(compute), lse_b.to(compute))
    return out.to(out_a.dtype), lse if compute == torch.float64 else lse.to(torch.float32)


def _merge(out_a, lse_a, out_b, lse_b):
    top = torch.maximum(lse_a, lse_b)
    # a finite stand-in for rows empty on both sides, so no -inf - -inf (and no NaN gradient)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    wa, wb = torch.exp(lse_a - top), torch.exp(lse_b - top)
    total = wa + wb
    empty = total == 0
    total = torch.where(empty, torch.ones_like(total), total)
    lse = torch.where(empty, torch.full_like(top, float("-inf")), top + torch.log(total))
    out = (out_a * (wa / total).unsqueeze(-1)) + (out_b * (wb / total).unsqueeze(-1))
    return out, lse


def merge_into(acc_out: torch.Tensor, acc_lse: torch.Tensor, rows: slice, out: torch.Tensor, lse: torch.Tensor) -> None:
    """In place: fold a block's ``(out, lse)`` for local query ``rows`` into the fp32 accumulators."""
    merged_out, merged_lse = _merge(acc_out[:, :, rows], acc_lse[:, :, rows], out.to(acc_out.dtype),
                                    lse.to(acc_lse.dtype))
    acc_out[:, :, rows] = merged_out
    acc_lse[:, :, rows] = merged_lse


# ---------------------------------------------------------------------------------------
# local queries against one piece of keys/values (k and v packed on the last dim)


def attend_piece(q, q_segs, kv, kv_segs, head_dim, scale, left, right, backend, acc_out, acc_lse) -> None:
    """Fold the attention of the local queries over ``kv``'s segments into the accumulators."""
    for b in blocks(q_segs, kv_segs, left, right):
        k = kv[:, :, b.k0:b.k1, :head_dim]
        v = kv[:, :, b.k0:b.k1, head_dim:]
        out, lse = block_forward(q[:, :, b.q0:b.q1], k, v, scale, b.window_left, b.window_right, backend)
        merge_into(acc_out, acc_lse, slice(b.q0, b.q1), out, lse)


def attend_piece_backward(dout, dlse, q, out, lse, q_segs, kv, kv_segs, head_dim, scale, left, right, backend,
                          dq_acc, dkv_acc) -> None:
    """Add this piece's share of dq (into ``dq_acc``) and its dk|dv (into ``dkv_acc``), fp32."""
    for b in blocks(q_segs, kv_segs, left, right):
        rows = slice(b.q0, b.q1)
        k = kv[:, :, b.k0:b.k1, :head_dim]
        v = kv[:, :, b.k0:b.k1, head_dim:]
        dq, dk, dv = block_backward(
            dout[:, :, rows], None if dlse is None else dlse[:, :, rows], q[:, :, rows], k, v, out[:, :, rows],
            lse[:, :, rows], scale, b.window_left, b.window_right, backend,
        )
        dq_acc[:, :, rows] += dq
        dkv_acc[:, :, b.k0:b.k1, :head_dim] += dk
        dkv_acc[:, :, b.k0:b.k1, head_dim:] += dv
