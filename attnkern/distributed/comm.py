"""torch.distributed's collectives, wrapped as custom ops so ``torch.compile`` traces them.

Every op names its process group by ``group_name`` (a string a graph can hold) and has a fake
(meta) implementation giving the output shapes, so ``torch.compile(fullgraph=True)`` records
the collectives as opaque nodes. Transport is torch's own: ``batch_isend_irecv`` for
point-to-point exchanges, ``all_gather``, ``all_to_all_single`` (also for reduce-scatter, which
gloo lacks) -- nothing home-made.

Overlap. In eager mode :func:`start_exchange` posts the sends and receives and returns at
once; the caller computes and then waits, so a ring step's attention overlaps the next
transfer. Under ``torch.compile`` the exchange is the synchronous ``attnkern_dist::p2p`` op
(a custom op cannot hand an in-flight buffer to a later op safely), so compiled code does
not overlap.

:func:`count_communication` records every byte this process sends, by collective, for the
tests and the benchmark.
"""

from __future__ import annotations

import contextlib
import zlib
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

_counters: List[list] = []


@contextlib.contextmanager
def count_communication():
    """Record ``(kind, bytes_sent)`` for every collective this process issues inside the block."""
    log: list = []
    _counters.append(log)
    try:
        yield log
    finally:
        _counters.remove(log)


def _record(kind: str, nbytes: int) -> None:
    for log in _counters:
        log.append((kind, int(nbytes)))


def bytes_sent(log, kind: Optional[str] = None) -> int:
    return sum(n for k, n in log if kind is None or k == kind)


def group_name(group) -> str:
    return (group if group is not None else dist.group.WORLD).group_name


def _resolve(name: str):
    return dist.distributed_c10d._resolve_process_group(name)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _recv_like(like: torch.Tensor, rows: int) -> torch.Tensor:
    shape = list(like.shape)
    shape[2] = rows
    return like.new_empty(shape)


# ---------------------------------------------------------------------------------------
# point-to-point exchange: send tensor i to send_to[i], receive a (B, H, recv_rows[i], C)
# tensor shaped like ``like`` from recv_from[i]; group ranks


class Pending:
    """Receive buffers of an exchange in flight; :meth:`wait` returns them once filled."""

    def __init__(self, recvs: List[torch.Tensor], works) -> None:
        self.recvs, self.works = recvs, works

    def wait(self) -> List[torch.Tensor]:
        for work in self.works:
            work.wait()
        self.works = []
        return self.recvs


def _post(sends, send_to, recv_from, recv_rows, like, name) -> Pending:
    group = _resolve(name)
    recvs = [_recv_like(like, rows) for rows in recv_rows]
    ops = []
    for tensor, peer in zip(sends, send_to):
        tensor = tensor.contiguous()
        _record("p2p", _nbytes(tensor))
        ops.append(dist.P2POp(dist.isend, tensor, group=group, group_peer=peer))
    for buf, peer in zip(recvs, recv_from):
        ops.append(dist.P2POp(dist.irecv, buf, group=group, group_peer=peer))
    return Pending(recvs, dist.batch_isend_irecv(ops) if ops else [])


@torch.library.custom_op("attnkern_dist::p2p", mutates_args=())
def p2p(
    sends: List[torch.Tensor], send_to: List[int], recv_from: List[int], recv_rows: List[int], like: torch.Tensor,
    group_name: str,
) -> List[torch.Tensor]:
    return _post(sends, send_to, recv_from, recv_rows, like, group_name).wait()


@p2p.register_fake
def _(sends, send_to, recv_from, recv_rows, like, group_name):
    return [_recv_like(like, rows) for rows in recv_rows]


def start_exchange(sends: Sequence[torch.Tensor], send_to: Sequence[int], recv_from: Sequence[int],
                   recv_rows: Sequence[int], like: torch.Tensor, name: str) -> Pending:
    """Post an exchange; eager mode returns before it completes (compiled code: after)."""
    if not sends and not recv_from:
        return Pending([], [])
    if torch.compiler.is_compiling():
        return Pending(p2p(list(sends), list(send_to), list(recv_from), list(recv_rows), like, name), [])
    return _post(list(sends), list(send_to), list(recv_from), list(recv_rows), like, name)


# ---------------------------------------------------------------------------------------
# all-gather, reduce-scatter, all-to-all over the leading dim


@torch.library.custom_op("attnkern_dist::all_gather", mutates_args=())
def all_gather(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """``(P, *x.shape)``: every rank's ``x``, in group-rank order."""
    group = _resolve(group_name)
    world = dist.get_world_size(group)
    out = x.new_empty((world,) + tuple(x.shape))
    _record("all_gather", _nbytes(x) * (world - 1))  # what a ring all-gather sends per rank
    dist.all_gather(list(out.unbind(0)), x.contiguous(), group=group)
    return out


@all_gather.register_fake
def _(x, group_name):
    world = dist.get_world_size(_resolve(group_name))
    return x.new_empty((world,) + tuple(x.shape))


def _all_to_all(x: torch.Tensor, group, kind: str) -> torch.Tensor:
    world = x.shape[0]
    out = torch.empty_like(x)
    x = x.contiguous()
    _record(kind, _nbytes(x) // world * (world - 1))
    dist.all_to_all_single(out, x, group=group)
    return out


@torch.library.custom_op("attnkern_dist::all_to_all", mutates_args=())
def all_to_all(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """``x[i]`` goes to rank i; ``out[j]`` is what rank j sent here. ``x`` has P on dim 0."""
    return _all_to_all(x, _resolve(group_name), "all_to_all")


@all_to_all.register_fake
def _(x, group_name):
    return torch.empty_like(x)


@torch.library.custom_op("attnkern_dist::reduce_scatter", mutates_args=())
def reduce_scatter(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """Sum over ranks of ``x[rank]`` (``x`` has P on dim 0): a reduce-scatter as all-to-all + local sum."""
    return _all_to_all(x, _resolve(group_name), "reduce_scatter").sum(0)


@reduce_scatter.register_fake
def _(x, group_name):
    return x.new_empty(tuple(x.shape[1:]))


# autograd: all-gather and reduce-scatter are each other's adjoints; all-to-all is its own
all_gather.register_autograd(lambda ctx, grad: (reduce_scatter(grad.contiguous(), ctx.group_name), None),
                             setup_context=lambda ctx, inputs, output: setattr(ctx, "group_name", inputs[1]))
reduce_scatter.register_autograd(lambda ctx, grad: (all_gather(grad.contiguous(), ctx.group_name), None),
                                 setup_context=lambda ctx, inputs, output: setattr(ctx, "group_name", inputs[1]))
all_to_all.register_autograd(lambda ctx, grad: (all_to_all(grad.contiguous(), ctx.group_name), None),
                             setup_context=lambda ctx, inputs, output: setattr(ctx, "group_name", inputs[1]))


# ---------------------------------------------------------------------------------------
# agreement: every rank raises, or none does


def _meta_device(group):
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(group, error: str, signature: Sequence, device=None) -> None:
    """Raise the same exception on every rank if any rank has an ``error`` or its ``signature`` differs.

    One small all-gather of a hash and an error flag (plus an object gather on the error
    path), so a bad argument on one rank cannot leave the others waiting in a collective.
    """
    world = dist.get_world_size(group)
    if world == 1:
        if error:
            raise ValueError(error)
        return
    digest = zlib.crc32("|".join(str(s) for s in signature).encode())  # not hash(): str hashes are salted per process
    flags = torch.tensor([1 if error else 0, digest], dtype=torch.int64, device=_meta_device(group))
    gathered = [torch.empty_like(flags) for _ in range(world)]
    dist.all_gather(gathered, flags, group=group)
    rows = [g.tolist() for g in gathered]
    if not any(r[0] for r in rows) and len({r[1] for r in rows}) == 1:
        return
    reports: list = [None] * world
    dist.all_gather_object(reports, (error, [str(s) for s in signature]), group=group)
    errors = [f"rank {r}: {e}" for r, (e, _) in enumerate(reports) if e]
    if errors:
        raise ValueError("; ".join(errors))
    details = "; ".join(f"rank {r}: {', '.join(sig)}" for r, (_, sig) in enumerate(reports))
    raise ValueError(f"ranks disagree on the call's shapes or options (they must match on every rank): {details}")
