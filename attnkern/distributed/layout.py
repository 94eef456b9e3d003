"""Sequence layouts: which global positions each rank holds.

A layout cuts a sequence of length L into chunks and gives every rank the same number of
tokens. Each rank's tokens are a short list of *segments*: runs of consecutive global
positions, stored one after another in the local tensor.

* ``"contiguous"``: P chunks; rank r holds chunk r.
* ``"zigzag"``: 2P chunks; rank r holds chunks r and 2P-1-r (in that order). Under causal
  attention every rank then does the same work. It is the layout of torch's head-tail load
  balancer (``torch.distributed.tensor.experimental.context_parallel``) and of
  ring-flash-attention's ``zigzag_ring_flash_attn``, so shards round-trip with those tools.
"""

from __future__ import annotations

from typing import List, NamedTuple, Tuple

import torch

LAYOUTS = ("zigzag", "contiguous")


class Segment(NamedTuple):
    """``length`` consecutive global positions from ``start``, stored from local row ``local``."""

    start: int
    local: int
    length: int


def check_layout(layout) -> str:
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def chunks_per_rank(layout: str) -> int:
    return 2 if layout == "zigzag" else 1


def layout_error(seq_len: int, world: int, layout: str, what: str = "sequence length") -> str:
    """Why ``seq_len`` cannot be cut for ``world`` ranks in ``layout`` (empty string if it can)."""
    parts = chunks_per_rank(layout) * world
    if seq_len % parts:
        return (
            f"{what} {seq_len} must be divisible by {parts} for layout={layout!r} on {world} rank(s) "
            f"({chunks_per_rank(layout)} chunk(s) per rank)"
        )
    return ""


def segments(rank: int, world: int, local_len: int, layout: str) -> Tuple[Segment, ...]:
    """The segments of ``rank`` when every rank holds ``local_len`` tokens."""
    if layout == "contiguous":
        return (Segment(rank * local_len, 0, local_len),)
    c = local_len // 2
    return (Segment(rank * c, 0, c), Segment((2 * world - 1 - rank) * c, c, c))


def chunk_owner(world: int, layout: str, chunk: int) -> int:
    if layout == "contiguous":
        return chunk
    return chunk if chunk < world else 2 * world - 1 - chunk


def _group_info(group) -> Tuple[int, int]:
    import torch.distributed as dist

    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 0, 1  # no process group: one rank holds everything
    return dist.get_rank(group), dist.get_world_size(group)


def _check_dim(x: torch.Tensor, dim) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be an int in [{-x.dim()}, {x.dim()}) for a {x.dim()}-D tensor, got {dim!r}")
    return dim % x.dim()


def local_indices(seq_len: int, rank: int, world: int, layout: str) -> List[Tuple[int, int]]:
    """``(start, stop)`` global ranges of ``rank``'s tokens, in local order."""
    local_len = seq_len // world
    return [(s.start, s.start + s.length) for s in segments(rank, world, local_len, layout)]


def shard_sequence(x: torch.Tensor, group=None, *, dim: int, layout: str = "zigzag") -> torch.Tensor:
    """This rank's part of the full sequence ``x`` (the same tensor on every rank) along ``dim``."""
    layout = check_layout(layout)
    dim = _check_dim(x, dim)
    rank, world = _group_info(group)
    error = layout_error(x.shape[dim], world, layout, f"x.shape[{dim}]")
    if error:
        raise ValueError(error)
    parts = [x.narrow(dim, a, b - a) for a, b in local_indices(x.shape[dim], rank, world, layout)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def unshard_sequence(x: torch.Tensor, group=None, *, dim: int, layout: str = "zigzag") -> torch.Tensor:
    """All ranks' parts back into the full sequence along ``dim`` (an all-gather; every rank gets
    it). Differentiable: the gradient is reduce-scattered back to the parts' owners."""
    from . import comm

    layout = check_layout(layout)
    dim = _check_dim(x, dim)
    rank, world = _group_info(group)
    if world == 1:
        return x
    comm.agree(group, "", ("unshard_sequence", x.dim(), dim, *x.shape, str(x.dtype), layout), x.device)
    local_len = x.shape[dim]
    gathered = comm.all_gather(x.contiguous(), comm.group_name(group))  # (P, *x.shape)
    pieces = {}
    for r in range(world):
        for seg in segments(r, world, local_len, layout):
            pieces[seg.start] = gathered[r].narrow(dim, seg.local, seg.length)
    return torch.cat([pieces[s] for s in sorted(pieces)], dim)


def sequence_positions(seq_len: int, group=None, *, layout: str = "zigzag", device=None) -> torch.Tensor:
    """Global positions (int64) of this rank's tokens, in local order: feed them to RoPE."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 0:
        raise ValueError(f"seq_len must be a non-negative int, got {seq_len!r}")
    return shard_sequence(torch.arange(seq_len, device=device), group, dim=0, layout=layout)
