"""context_parallel_attention: attention over a sequence sharded across a process group.

Strategies (every one exact; they differ in what travels):

* ``ring``: K|V shards hop rank to rank with ``batch_isend_irecv`` while each hop's attention
  is computed (eager mode overlaps the next transfer with this hop's compute). The ring runs
  only the hops the band needs: ``forward_hops`` to the right and ``backward_hops`` to the
  left (a window of w tokens needs about w / shard hops), or P-1 hops one way when that is
  fewer. The backward re-circulates K|V with fp32 dK|dV accumulators travelling alongside;
  after the last hop each accumulator goes straight back to its owner.
* ``allgather``: all-gather K|V, attend, reduce-scatter the fp32 dK|dV.
* ``halo``: for a window whose left and right extents fit in one chunk, each rank receives
  only the rows of its neighbours' chunks its window reaches (W rows from the left, R from
  the right), in flight while the rank's own rows are attended; the rows' fp32 gradient goes
  back to their owner. Per-rank traffic is O(W), independent of L and P.
* ``ulysses``: all-to-all from sequence shards to head shards, full-sequence attention on
  H/P heads, all-to-all back. Needs H and H_kv divisible by P.
* ``auto``: halo when the window fits, else ring (which caps its hops to what the band needs).
"""

from __future__ import annotations

from functools import lru_cache
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist

from .._semantics import FLOAT_DTYPES, _check_scale, check_backend, normalize_window
from . import comm
from .blocks import attend_piece, attend_piece_backward, blocks, block_backward, block_forward
from .layout import Segment, chunk_owner, chunks_per_rank, check_layout, layout_error, segments

STRATEGIES = ("auto", "ring", "allgather", "halo", "ulysses")


class Plan(NamedTuple):
    """Everything about a call that is not a tensor; the same on every rank but ``rank``."""

    rank: int
    world: int
    local_len: int
    layout: str
    left: int
    right: int
    scale: float
    head_dim: int
    strategy: str
    backend: str
    group: str  # process group name ("" with one rank and no process group)

    @property
    def segs(self) -> Tuple[Segment, ...]:
        return segments(self.rank, self.world, self.local_len, self.layout)

    @property
    def seq_len(self) -> int:
        return self.local_len * self.world


def _fits_halo(world: int, local_len: int, layout: str, left: int, right: int) -> bool:
    chunk = local_len // chunks_per_rank(layout)
    return left >= 0 and right >= 0 and max(left, right) <= chunk


def _uncached_when_compiling(fn):
    """An lru_cache'd geometry function; dynamo traces (and constant-folds) the plain one."""
    plain = fn.__wrapped__

    def call(*args):
        return plain(*args) if torch.compiler.is_compiling() else fn(*args)

    call.__doc__, call.cache_info = fn.__doc__, fn.cache_info
    return call


@_uncached_when_compiling
@lru_cache(maxsize=256)
def ring_hops(world: int, local_len: int, layout: str, left: int, right: int) -> Tuple[int, int]:
    """``(forward_hops, backward_hops)``: the fewest ring hops each way that bring every rank
    every K|V shard its queries see. Hop d forward brings rank r the shard of rank r-d."""
    needed = set()
    for rank in range(world):
        q_segs = segments(rank, world, local_len, layout)
        for d in range(1, world):
            if blocks(q_segs, segments((rank - d) % world, world, local_len, layout), left, right):
                needed.add(d)
    if not needed:
        return 0, 0
    best = (world - 1, 0)
    for fwd in range(world):
        back = max([0] + [world - d for d in needed if d > fwd])  # dynamo 2.11 rejects max(genexpr, default=)
        if fwd + back < sum(best):
            best = (fwd, back)
    return best


def _accumulators(q, width: int):
    """fp32 (float64 for float64 inputs) output and LSE accumulators for q's rows: 0 and -inf."""
    dtype = _accumulate_dtype(q)
    return q.new_zeros(q.shape[:3] + (width,), dtype=dtype), q.new_full(q.shape[:3], float("-inf"), dtype=dtype)


def _accumulate_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _zeros(t):
    """A gradient accumulator for ``t``: fp32 (float64 for float64)."""
    return torch.zeros(t.shape, dtype=_accumulate_dtype(t), device=t.device)


# ---------------------------------------------------------------------------------------
# ring


def _peer(plan: Plan, hops: int) -> int:
    return (plan.rank + hops) % plan.world


def _ring_forward(plan: Plan, q, kv):
    fwd_hops, back_hops = ring_hops(plan.world, plan.local_len, plan.layout, plan.left, plan.right)
    acc_out, acc_lse = _accumulators(q, kv.shape[3] - plan.head_dim)
    right_bound, left_bound = kv, kv  # what moves right (the shard of rank - s), left (rank + s)
    for step in range(max(fwd_hops, back_hops) + 1):
        sends, to, frm = [], [], []
        if step < fwd_hops:
            sends.append(right_bound), to.append(_peer(plan, 1)), frm.append(_peer(plan, -1))
        if step < back_hops:
            sends.append(left_bound), to.append(_peer(plan, -1)), frm.append(_peer(plan, 1))
        pending = comm.start_exchange(sends, to, frm, [plan.local_len] * len(sends), kv, plan.group)
        pieces = [(kv, plan.rank)] if step == 0 else []
        if 0 < step <= fwd_hops:
            pieces.append((right_bound, _peer(plan, -step)))
        if 0 < step <= back_hops:
            pieces.append((left_bound, _peer(plan, step)))
        for piece, source in pieces:
            _attend(plan, q, piece, source, acc_out, acc_lse)
        received = pending.wait()
        if step < fwd_hops:
            right_bound = received[0]
        if step < back_hops:
            left_bound = received[-1]
    return acc_out, acc_lse


def _attend(plan: Plan, q, kv, source: int, acc_out, acc_lse):
    kv_segs = segments(source, plan.world, plan.local_len, plan.layout)
    attend_piece(q, plan.segs, kv, kv_segs, plan.head_dim, plan.scale, plan.left, plan.right, plan.backend,
                 acc_out, acc_lse)


def _attend_backward(plan: Plan, grads, kv, source: int, dq_acc, dkv_acc):
    dout, dlse, q, out, lse = grads
    kv_segs = segments(source, plan.world, plan.local_len, plan.layout)
    attend_piece_backward(dout, dlse, q, out, lse, plan.segs, kv, kv_segs, plan.head_dim, plan.scale, plan.left,
                          plan.right, plan.backend, dq_acc, dkv_acc)


def _ring_backward(plan: Plan, grads, kv):
    """K|V circulate again (the next hop's transfer overlapping this hop's compute). Each
    direction's fp32 dK|dV accumulator follows its shard one hop behind -- sent after a hop's
    compute, received during the next -- and after its last hop goes straight to its owner."""
    hops = dict(zip((1, -1), ring_hops(plan.world, plan.local_len, plan.layout, plan.left, plan.right)))
    q = grads[2]
    dq = _zeros(q)
    dkv = _zeros(kv)
    _attend_backward(plan, grads, kv, plan.rank, dq, dkv)
    rows = lambda n: [plan.local_len] * n  # noqa: E731

    def post_shards(step, held):
        moving = [d for d in (1, -1) if step <= hops[d]]
        sends = [held[d] for d in moving]
        to, frm = [_peer(plan, d) for d in moving], [_peer(plan, -d) for d in moving]
        return moving, comm.start_exchange(sends, to, frm, rows(len(moving)), kv, plan.group)

    held = {1: kv, -1: kv}
    moving, shard_pending = post_shards(1, held)
    acc_pending, acc_kinds = comm.Pending([], []), []
    for step in range(1, max(hops.values()) + 1):
        held.update(zip(moving, shard_pending.wait()))
        now = moving
        if step < max(hops.values()):
            moving, shard_pending = post_shards(step + 1, held)
        partial = {}
        for d in now:
            partial[d] = torch.zeros_like(dkv)
            _attend_backward(plan, grads, held[d], _peer(plan, -d * step), dq, partial[d])
        for (d, home), buf in zip(acc_kinds, acc_pending.wait()):
            if home:
                dkv += buf
            else:
                partial[d] += buf
        acc_kinds = [(d, step == hops[d]) for d in now]
        to = [_peer(plan, -d * step) if home else _peer(plan, d) for d, home in acc_kinds]
        frm = [_peer(plan, d * step) if home else _peer(plan, -d) for d, home in acc_kinds]
        acc_pending = comm.start_exchange([partial[d] for d in now], to, frm, rows(len(now)), dkv, plan.group)
    for buf in acc_pending.wait():
        dkv += buf
    return dq, dkv


# ---------------------------------------------------------------------------------------
# all-gather


def _gathered_segments(plan: Plan) -> List[Segment]:
    return [Segment(s.start, r * plan.local_len + s.local, s.length)
            for r in range(plan.world) for s in segments(r, plan.world, plan.local_len, plan.layout)]


def _allgather_kv(plan: Plan, kv):
    if plan.world == 1:
        return kv
    full = comm.all_gather(kv.contiguous(), plan.group)  # (P, B, Hk, S, C)
    return full.permute(1, 2, 0, 3, 4).flatten(2, 3)


def _allgather_backward(plan: Plan, grads, kv_all):
    q = grads[2]
    dq = _zeros(q)
    dkv_all = _zeros(kv_all)
    attend_piece_backward(*grads, plan.segs, kv_all, _gathered_segments(plan), plan.head_dim, plan.scale,
                          plan.left, plan.right, plan.backend, dq, dkv_all)
    if plan.world == 1:
        return dq, dkv_all
    per_rank = dkv_all.unflatten(2, (plan.world, plan.local_len)).permute(2, 0, 1, 3, 4)
    return dq, comm.reduce_scatter(per_rank.contiguous(), plan.group)


# ---------------------------------------------------------------------------------------
# halo


class HaloPiece(NamedTuple):
    """Rows [start, start + length) of the global sequence that ``receiver``'s segment ``seg``
    needs from ``owner`` (rows ``owner_local ...`` of the owner's shard)."""

    receiver: int
    seg: int
    side: int  # -1 left of the segment, +1 right of it
    owner: int
    owner_local: int
    start: int
    length: int


@_uncached_when_compiling
@lru_cache(maxsize=256)
def halo_pieces(world: int, local_len: int, layout: str, left: int, right: int) -> Tuple[HaloPiece, ...]:
    """Every halo row range of every rank, in one canonical order all ranks agree on."""
    seq_len = local_len * world
    chunk = local_len // chunks_per_rank(layout)
    found = []
    for rank in range(world):
        for i, seg in enumerate(segments(rank, world, local_len, layout)):
            for side, start, stop in ((-1, max(0, seg.start - left), seg.start),
                                      (1, seg.start + seg.length, min(seq_len, seg.start + seg.length + right))):
                if start >= stop:
                    continue
                c = start // chunk  # the window fits in one chunk, so the range lies in one neighbour chunk
                owner = chunk_owner(world, layout, c)
                owner_seg = next(s for s in segments(owner, world, local_len, layout) if s.start == c * chunk)
                found.append(HaloPiece(rank, i, side, owner, owner_seg.local + start - owner_seg.start, start,
                                       stop - start))
    return tuple(found)


def _halo_routes(plan: Plan):
    """(pieces this rank receives, by owner; pieces it sends, by receiver): remote pieces only."""
    pieces = halo_pieces(plan.world, plan.local_len, plan.layout, plan.left, plan.right)
    incoming, outgoing = {}, {}
    for p in pieces:
        if p.receiver == plan.rank and p.owner != plan.rank:
            incoming.setdefault(p.owner, []).append(p)
        elif p.owner == plan.rank and p.receiver != plan.rank:
            outgoing.setdefault(p.receiver, []).append(p)
    return incoming, outgoing


def _rows(t, p: HaloPiece):
    return t[:, :, p.owner_local:p.owner_local + p.length]


def _received_segments(pieces) -> List[Segment]:
    """Where each piece of one peer's message sits: its global rows, at its offset in the message."""
    found, offset = [], 0
    for p in pieces:
        found.append(Segment(p.start, offset, p.length))
        offset += p.length
    return found


def _halo_forward(plan: Plan, q, kv):
    """Post the halo exchange, attend the rows this rank holds while it is in flight, then the halo.
    (Halo rows a rank holds itself -- zigzag's middle rank, or P = 1 -- are among its own rows.)"""
    incoming, outgoing = _halo_routes(plan)
    sends = [torch.cat([_rows(kv, p) for p in outgoing[r]], 2) for r in sorted(outgoing)]
    rows = [sum(p.length for p in incoming[o]) for o in sorted(incoming)]
    pending = comm.start_exchange(sends, sorted(outgoing), sorted(incoming), rows, kv, plan.group)
    acc_out, acc_lse = _accumulators(q, kv.shape[3] - plan.head_dim)
    attend_piece(q, plan.segs, kv, plan.segs, plan.head_dim, plan.scale, plan.left, plan.right, plan.backend,
                 acc_out, acc_lse)
    received = pending.wait()
    for o, buf in zip(sorted(incoming), received):
        attend_piece(q, plan.segs, buf, _received_segments(incoming[o]), plan.head_dim, plan.scale, plan.left,
                     plan.right, plan.backend, acc_out, acc_lse)
    return acc_out, acc_lse, received


def _halo_backward(plan: Plan, grads, kv, received):
    """The halo rows' fp32 gradient goes back to their owners (the forward exchange reversed),
    in flight while this rank's own rows' backward runs."""
    incoming, outgoing = _halo_routes(plan)
    q = grads[2]
    dq, dkv = _zeros(q), _zeros(kv)
    returned = []
    for o, buf in zip(sorted(incoming), received):
        dbuf = _zeros(buf)
        attend_piece_backward(*grads, plan.segs, buf, _received_segments(incoming[o]), plan.head_dim, plan.scale,
                              plan.left, plan.right, plan.backend, dq, dbuf)
        returned.append(dbuf)
    rows = [sum(p.length for p in outgoing[r]) for r in sorted(outgoing)]
    pending = comm.start_exchange(returned, sorted(incoming), sorted(outgoing), rows, dkv, plan.group)
    attend_piece_backward(*grads, plan.segs, kv, plan.segs, plan.head_dim, plan.scale, plan.left, plan.right,
                          plan.backend, dq, dkv)
    for r, buf in zip(sorted(outgoing), pending.wait()):
        for p, seg in zip(outgoing[r], _received_segments(outgoing[r])):
            _rows(dkv, p).add_(buf[:, :, seg.local:seg.local + seg.length])
    return dq, dkv


# ---------------------------------------------------------------------------------------
# Ulysses: sequence shards <-> head shards


def _to_head_shards(plan: Plan, x):
    """(B, H, S_local, C) sequence shard -> (B, H/P, L, C) full sequence of this rank's heads."""
    if plan.world == 1:
        return x
    parts = comm.all_to_all(x.unflatten(1, (plan.world, -1)).transpose(0, 1).contiguous(), plan.group)
    pieces = {s.start: parts[r][:, :, s.local:s.local + s.length]
              for r in range(plan.world) for s in segments(r, plan.world, plan.local_len, plan.layout)}
    return torch.cat([pieces[start] for start in sorted(pieces)], 2)


def _to_sequence_shards(plan: Plan, x):
    """Inverse of :func:`_to_head_shards`; works for (B, H/P, L) LSE too (a trailing dim is added)."""
    if plan.world == 1:
        return x
    squeeze = x.dim() == 3
    x = x.unsqueeze(-1) if squeeze else x
    per_rank = [torch.cat([x[:, :, s.start:s.start + s.length] for s in segments(r, plan.world, plan.local_len,
                                                                                  plan.layout)], 2)
                for r in range(plan.world)]
    parts = comm.all_to_all(torch.stack(per_rank), plan.group)  # [j]: heads of rank j, my rows
    out = parts.transpose(0, 1).flatten(1, 2)
    return out.squeeze(-1) if squeeze else out


def _ulysses_forward(plan: Plan, q, kv):
    q_full, kv_full = _to_head_shards(plan, q), _to_head_shards(plan, kv)
    whole = Segment(0, 0, plan.seq_len)
    acc_out, acc_lse = _accumulators(q_full, kv.shape[3] - plan.head_dim)
    attend_piece(q_full, [whole], kv_full, [whole], plan.head_dim, plan.scale, plan.left, plan.right, plan.backend,
                 acc_out, acc_lse)
    return acc_out, acc_lse, q_full, kv_full


def _ulysses_backward(plan: Plan, dout, dlse, q_full, kv_full, out_full, lse_full):
    whole = Segment(0, 0, plan.seq_len)
    dout_full = _to_head_shards(plan, dout)
    dlse_full = None if dlse is None else _to_head_shards(plan, dlse.unsqueeze(-1)).squeeze(-1)
    dq = _zeros(q_full)
    dkv = _zeros(kv_full)
    attend_piece_backward(dout_full, dlse_full, q_full, out_full, lse_full, [whole], kv_full, [whole], plan.head_dim,
                          plan.scale, plan.left, plan.right, plan.backend, dq, dkv)
    # each head's gradient is complete here: it travels in the inputs' dtype
    return _to_sequence_shards(plan, dq.to(q_full.dtype)), _to_sequence_shards(plan, dkv.to(kv_full.dtype))


# ---------------------------------------------------------------------------------------
# autograd


class _ContextParallelAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: Plan):
        kv = torch.cat([k, v], -1)  # K and V travel as one tensor
        extra = ()
        if plan.strategy == "ring":
            acc_out, acc_lse = _ring_forward(plan, q, kv)
        elif plan.strategy == "allgather":
            kv = _allgather_kv(plan, kv)
            acc_out, acc_lse = _accumulators(q, v.shape[3])
            attend_piece(q, plan.segs, kv, _gathered_segments(plan), plan.head_dim, plan.scale, plan.left,
                         plan.right, plan.backend, acc_out, acc_lse)
        elif plan.strategy == "halo":
            acc_out, acc_lse, extra = _halo_forward(plan, q, kv)
        else:
            acc_out, acc_lse, q_full, kv = _ulysses_forward(plan, q, kv)
            extra = (q_full, acc_out.to(q.dtype), acc_lse)
            acc_out, acc_lse = _to_sequence_shards(plan, extra[1]), _to_sequence_shards(plan, acc_lse)
        out = acc_out.to(q.dtype)
        if torch.compiler.is_compiling():
            # Dynamo of torch 2.11 gives zero input gradients when an autograd.Function returns a
            # tensor it created and then wrote in place (acc_out, acc_lse); copies avoid that
            # (tests/test_distributed.py, compiled vs eager, failed on 2.11 and passes with them).
            out, acc_lse = out.clone(), acc_lse.clone()
        ctx.plan = plan
        ctx.dtypes = (k.dtype, v.dtype)
        ctx.n_extra = len(extra)
        ctx.save_for_backward(q, kv, out, acc_lse, *extra)
        ctx.set_materialize_grads(False)  # an unused LSE brings no zero gradient to move around
        return out, acc_lse

    @staticmethod
    def backward(ctx, dout, dlse):
        plan = ctx.plan
        q, kv, out, lse, *extra = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        grads = (dout, dlse, q, out, lse)
        if plan.strategy == "ring":
            dq, dkv = _ring_backward(plan, grads, kv)
        elif plan.strategy == "allgather":
            dq, dkv = _allgather_backward(plan, grads, kv)
        elif plan.strategy == "halo":
            dq, dkv = _halo_backward(plan, grads, kv, list(extra))
        else:
            q_full, out_full, lse_full = extra
            dq, dkv = _ulysses_backward(plan, dout, dlse, q_full, kv, out_full, lse_full)
        dk, dv = dkv[..., :plan.head_dim], dkv[..., plan.head_dim:]
        return dq.to(q.dtype), dk.to(ctx.dtypes[0]), dv.to(ctx.dtypes[1]), None


# ---------------------------------------------------------------------------------------
# the public function


def _local_error(q, k, v, world, causal, window_size, scale, layout, strategy, backend):
    """Everything wrong with this rank's arguments, as one message ("" if nothing), and the
    normalised (left, right, scale). Nothing here raises: the ranks must first agree."""
    try:
        for t, name in ((q, "q"), (k, "k"), (v, "v")):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype not in FLOAT_DTYPES:
                raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
            if t.dim() != 4:
                raise ValueError(f"{name} must be 4-D (batch, heads, local_seq, head_dim), got shape {tuple(t.shape)}")
        if not (q.dtype == k.dtype == v.dtype):
            raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
        if not (q.device == k.device == v.device):
            raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
        (b, h, s, e), (bk, hk, sk, ek) = q.shape, k.shape
        if v.shape[:3] != k.shape[:3] or (bk, sk, ek) != (b, s, e):
            raise ValueError(
                f"k and v must be (B, H_kv, S_local, E) shards matching q's (B, H, S_local, E) = {tuple(q.shape)}: "
                f"got k {tuple(k.shape)}, v {tuple(v.shape)} (q, k and v are this rank's shards of one sequence)"
            )
        if hk == 0 or h % hk:
            raise ValueError(f"q heads {h} must be a multiple of k/v heads {hk} (GQA)")
        left, right = normalize_window(window_size, causal)
        scale = _check_scale(scale, e)
        check_layout(layout)
        check_backend(backend)
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        error = layout_error(s * world, world, layout, f"the sequence length (S_local {s} x {world} ranks) =")
        if error:
            raise ValueError(error)
        if strategy == "halo" and not _fits_halo(world, s, layout, left, right):
            raise ValueError(
                f"strategy='halo' needs a window whose left and right extents (got {(left, right)}; -1 unbounded) "
                f"fit in one chunk of {s // chunks_per_rank(layout)} tokens (S_local {s}, layout={layout!r})"
            )
        if strategy == "ulysses" and (h % world or hk % world):
            raise ValueError(f"strategy='ulysses' needs q heads ({h}) and k/v heads ({hk}) divisible by {world} ranks")
        return "", (left, right, scale)
    except (TypeError, ValueError) as exc:
        return str(exc), None


def context_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group=None,
    *,
    causal: bool = False,
    window_size: Optional[Tuple[int, int]] = None,
    scale: Optional[float] = None,
    layout: str = "zigzag",
    strategy: str = "auto",
    return_lse: bool = False,
    backend: str = "auto",
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
):
    """Attention over a sequence sharded across ``group`` (default: the world).

    ``q`` ``(B, H, S_local, E)``, ``k``/``v`` ``(B, H_kv, S_local, E/Ev)`` are this rank's
    shards in ``layout`` (see :func:`shard_sequence`); H_kv may divide H (GQA, never repeated
    on the wire). ``causal`` and ``window_size=(left, right)`` act on *global* positions,
    top-left aligned, exactly as :func:`attnkern.scaled_dot_product_attention` on the whole
    sequence. Returns this rank's shard of the output, and with ``return_lse=True`` also its
    LSE ``(B, H, S_local)`` fp32 (differentiable). Every rank must call it with the same
    shapes and options; a bad argument on any rank raises on every rank.

    ``attn_mask`` and ``dropout_p`` are not supported yet (NotImplementedError).
    """
    if attn_mask is not None:
        raise NotImplementedError("context_parallel_attention does not support attn_mask yet")
    if dropout_p:
        raise NotImplementedError("context_parallel_attention does not support dropout yet")
    distributed = dist.is_available() and dist.is_initialized()
    if group is None and not distributed:
        rank, world, name = 0, 1, ""
    else:
        rank, world, name = dist.get_rank(group), dist.get_world_size(group), comm.group_name(group)
    error, normalised = _local_error(q, k, v, world, causal, window_size, scale, layout, strategy, backend)
    if not torch.compiler.is_compiling():
        signature = ("context_parallel_attention", layout, strategy, return_lse, backend)
        if normalised is not None:  # the band and scale as normalised: (5, 0) and [5, 0] agree
            signature += normalised + (tuple(q.shape), tuple(k.shape), tuple(v.shape), str(q.dtype), q.device.type)
        if world > 1:
            comm.agree(group, error, signature)
        elif error:
            raise ValueError(error)
    elif error:
        raise ValueError(error)
    left, right, scale = normalised
    local_len = q.shape[2]
    if strategy == "auto":
        strategy = "halo" if _fits_halo(world, local_len, layout, left, right) else "ring"
    plan = Plan(rank, world, local_len, layout, left, right, scale, q.shape[3], strategy, backend, name)
    out, lse = _ContextParallelAttention.apply(q, k, v, plan)
    return (out, lse) if return_lse else out
