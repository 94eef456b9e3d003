"""Argument checking for packed (varlen) and KV-cache calls: the sibling of ``_semantics``.

A packed batch holds B sequences back to back: ``q`` is ``(total_q, Hq, E)`` and sequence b
owns rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``; ``k``/``v`` are ``(total_k, Hkv, *)``
packed by ``cu_seqlens_k`` or, with ``block_table``, pages ``(num_blocks, page_size, Hkv, *)``
of a cache in which key j of sequence b is row ``j % page_size`` of page
``block_table[b, j // page_size]``. ``seqused_k[b]`` (if given) keeps only the first keys.

Each sequence is one dense problem with flash-attn's bottom-right alignment: query i of
sequence b sits at key position ``i + Lk_b - Lq_b``, the window and ``causal`` (which caps the
right side at 0) are the dense ones (:mod:`attnkern._semantics`). Rows past
``cu_seqlens_q[-1]`` belong to no sequence: output 0, LSE -inf, gradient 0. A row that sees
no key outputs 0 with LSE -inf (flash-attn 2 writes +inf there), or LSE = the sink with sinks.
The score modifiers (softcap, sinks ``s_aux`` (Hq,), ``alibi_slopes`` (Hq,) or (B, Hq) with B
the number of sequences) are the dense ones applied per sequence: sequence b uses slope row b,
and ALiBi distances use the bottom-right aligned positions of its own problem. Dropout: sequence
b uses the dense pattern (reference.dropout_keep_mask) of a batch of one keyed by ``seed + b``.

Values (cu_seqlens, seqused_k, block_table) are checked here on every eager call, and again by
the C++ op before a kernel reads through them (the op is also what runs under torch.compile,
where reading values would break the graph).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from ._semantics import _check_scale, _check_tensor, _is_int, check_dropout, normalize_window


@dataclass(frozen=True)
class VarlenProblem:
    """Shapes and options of one packed call, after normalisation."""

    batch: int
    heads_q: int
    heads_kv: int
    total_q: int
    head_dim: int
    head_dim_v: int
    scale: float
    window_left: int  # -1: unbounded
    window_right: int  # -1: unbounded (causal folded in)
    page_size: int  # 0: k/v packed by cu_seqlens_k; else pages read through block_table
    dtype: torch.dtype
    device_type: str
    # the score modifiers, set by _semantics.with_modifiers (batch = the number of sequences)
    softcap: float = 0.0  # 0: none
    has_sinks: bool = False
    has_alibi: bool = False
    dropout_p: float = 0.0  # packed calls only (flash_attn_with_kvcache has none); 1.0: see dispatch.run_packed

    @property
    def paged(self) -> bool:
        return self.page_size > 0


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def check_bool(x, name: str) -> bool:
    if not isinstance(x, bool):
        raise TypeError(f"{name} must be a bool, got {type(x).__name__}")
    return x


def check_max_seqlen(x, name: str) -> Optional[int]:
    """An int or a 0-d integer tensor (Hugging Face passes a tensor); None under torch.compile."""
    if isinstance(x, torch.Tensor):
        if x.dim() != 0 or x.is_floating_point() or x.dtype == torch.bool:
            raise TypeError(f"{name} must be an int or a 0-d integer tensor, got a {x.dtype} tensor of shape {tuple(x.shape)}")
        if _compiling():
            return None
        x = int(x.item())
    elif not _is_int(x):
        raise TypeError(f"{name} must be an int or a 0-d integer tensor, got {type(x).__name__}")
    if x < 0:
        raise ValueError(f"{name} must be >= 0, got {x}")
    return int(x)


def _int32_vector(t, name: str, device, length: Optional[int] = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be an int32 torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {t.dtype}")
    if t.dim() != 1 or (length is not None and t.shape[0] != length):
        want = f"(batch,) = ({length},)" if length is not None else "(batch + 1,)"
        raise ValueError(f"{name} must be 1-D of shape {want}, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {t.device}")
    return t


def cu_seqlens_values(cu: torch.Tensor, name: str, rows: Optional[int], rows_name: str) -> List[int]:
    vals = cu.tolist()
    if not vals or vals[0] != 0:
        raise ValueError(f"{name} must start at 0, got {vals[:1]}")
    for b in range(len(vals) - 1):
        if vals[b + 1] < vals[b]:
            raise ValueError(f"{name} must be non-decreasing, got {name}[{b}] = {vals[b]} > {name}[{b + 1}] = {vals[b + 1]}")
    if rows is not None and vals[-1] > rows:
        raise ValueError(f"{name}[-1] = {vals[-1]} points past the {rows} rows of {rows_name}")
    return vals


def table_rows_contiguous(block_table):
    """The kernels read each row of ``block_table`` as one run of int32s (csrc/varlen_layout.h):
    a table laid out otherwise (a transposed copy, a column slice) is copied into that layout
    before anything reads it. Anything that is not such a table is returned as it is, for the
    checks to name."""
    if isinstance(block_table, torch.Tensor) and block_table.dim() == 2 and block_table.shape[1] > 1 \
            and block_table.stride(1) != 1:
        return block_table.contiguous()
    return block_table


def check_block_table(block_table, batch: int, device, num_blocks: int, page_size: int, len_k: Optional[List[int]]):
    """block_table (B, max_blocks) int32; every page a sequence uses must exist in the cache."""
    if not isinstance(block_table, torch.Tensor):
        raise TypeError(f"block_table must be an int32 torch.Tensor, got {type(block_table).__name__}")
    if block_table.dtype != torch.int32:
        raise TypeError(f"block_table must be int32, got {block_table.dtype}")
    if block_table.dim() != 2 or block_table.shape[0] != batch:
        raise ValueError(f"block_table must be (batch, max_blocks) = ({batch}, max_blocks), got shape {tuple(block_table.shape)}")
    if block_table.device != device:
        raise ValueError(f"block_table must be on q's device {device}, got {block_table.device}")
    if page_size < 1:
        raise ValueError(f"page_size (k_cache dim 1) must be >= 1 with a block_table, got {page_size}")
    if len_k is None:
        return
    coverage = block_table.shape[1] * page_size
    for b, lk in enumerate(len_k):
        if lk > coverage:
            raise ValueError(
                f"sequence {b} needs {lk} keys, beyond the block_table's coverage of {block_table.shape[1]} pages "
                f"x page size {page_size} = {coverage} keys"
            )
    # the entries the sequences use, checked as one tensor (a decode step's table can hold many pages)
    table = block_table.cpu()
    pages = torch.tensor([-(-lk // page_size) for lk in len_k], dtype=torch.int64)
    used = torch.arange(table.shape[1]) < pages[:, None]
    bad = (used & ((table < 0) | (table >= num_blocks))).nonzero()
    if len(bad):
        b, j = bad[0].tolist()  # the first in row-major order
        raise ValueError(f"block_table[{b}, {j}] = {int(table[b, j])} is outside the cache's {num_blocks} blocks")


def packed_lengths(q, k, cu_seqlens_q, cu_seqlens_k, seqused_k, paged: bool):
    """The values of cu_seqlens_q/k (checked against q's and, unpaged, k's rows) and each
    sequence's query and key counts (key counts cut to seqused_k): ``(cq, ck, len_q, len_k)``."""
    cq = cu_seqlens_values(cu_seqlens_q, "cu_seqlens_q", q.shape[0], "q")
    ck = cu_seqlens_values(cu_seqlens_k, "cu_seqlens_k", None if paged else k.shape[0], "k")
    batch = len(cq) - 1
    len_q = [cq[b + 1] - cq[b] for b in range(batch)]
    len_k = [ck[b + 1] - ck[b] for b in range(batch)]
    if seqused_k is not None:
        for b, (used, lk) in enumerate(zip(seqused_k.tolist(), len_k)):
            if not 0 <= used <= lk:
                raise ValueError(f"seqused_k[{b}] = {used} must be in [0, cu_seqlens_k[{b + 1}] - cu_seqlens_k[{b}]] = [0, {lk}]")
            len_k[b] = used
    return cq, ck, len_q, len_k


def check_packed_shapes(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, paged: bool) -> int:
    """Shapes of packed q/k/v (k/v paged with a block table) and of the index vectors; returns B."""
    if q.dim() != 3:
        raise ValueError(f"q must be 3-D (total_q, heads, head_dim), got shape {tuple(q.shape)}")
    kdim, kshape = (4, "(num_blocks, page_size, heads_k, head_dim)") if paged else (3, "(total_k, heads_k, head_dim)")
    for t, name in ((k, "k"), (v, "v")):
        if t.dim() != kdim:
            raise ValueError(f"{name} must be {kdim}-D {kshape}, got shape {tuple(t.shape)}")
    if tuple(v.shape[:-1]) != tuple(k.shape[:-1]):
        raise ValueError(f"v shape {tuple(v.shape)} does not match k shape {tuple(k.shape)} before the head dim")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k head dim {k.shape[-1]} does not match q head dim {q.shape[-1]}")
    heads_q, heads_kv = q.shape[1], k.shape[-2]
    if heads_kv == 0 or heads_q % heads_kv != 0:
        raise ValueError(f"q heads {heads_q} must be a multiple of k/v heads {heads_kv}")
    _int32_vector(cu_seqlens_q, "cu_seqlens_q", q.device)
    batch = cu_seqlens_q.shape[0] - 1
    if batch < 0:
        raise ValueError("cu_seqlens_q must have at least one entry (0)")
    _int32_vector(cu_seqlens_k, "cu_seqlens_k", q.device)
    if cu_seqlens_k.shape[0] != batch + 1:
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must give the same number of sequences, got {batch} and {cu_seqlens_k.shape[0] - 1}"
        )
    if seqused_k is not None:
        _int32_vector(seqused_k, "seqused_k", q.device, batch)
    return batch


def normalize_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                     window_size, block_table=None, seqused_k=None, dropout_p=0.0) -> VarlenProblem:
    dropout_p = check_dropout(dropout_p)
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        _check_tensor(t, name)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    paged = block_table is not None
    batch = check_packed_shapes(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, paged)
    heads_q, heads_kv = q.shape[1], k.shape[-2]
    mq = check_max_seqlen(max_seqlen_q, "max_seqlen_q")
    mk = check_max_seqlen(max_seqlen_k, "max_seqlen_k")
    left, right = normalize_window(window_size, causal, "window_size")
    scale = _check_scale(softmax_scale, q.shape[-1])
    page_size = k.shape[1] if paged else 0

    len_k = None
    if not _compiling():
        _, _, len_q, len_k = packed_lengths(q, k, cu_seqlens_q, cu_seqlens_k, seqused_k, paged)
        for name, given, lens in (("max_seqlen_q", mq, len_q), ("max_seqlen_k", mk, len_k)):
            if given is not None and lens and given < max(lens):
                raise ValueError(f"{name} = {given} is less than the longest sequence's {max(lens)}")
    if paged:
        check_block_table(block_table, batch, q.device, k.shape[0], page_size, len_k)
    return VarlenProblem(
        batch=batch, heads_q=heads_q, heads_kv=heads_kv, total_q=q.shape[0], head_dim=q.shape[-1],
        head_dim_v=v.shape[-1], scale=scale, window_left=left, window_right=right, page_size=page_size,
        dtype=q.dtype, device_type=q.device.type, dropout_p=dropout_p,
    )


@dataclass(frozen=True)
class KVCacheCall:
    """A normalised ``flash_attn_with_kvcache`` call."""

    batch: int
    len_q: int
    len_new: int  # rows of k/v to append (0: none)
    cache_seqlens: torch.Tensor  # (B,) int32, before the append
    cache_rows: Optional[torch.Tensor]  # (B,) int32 cache_batch_idx, contiguous caches only
    leftpad: Optional[torch.Tensor]  # (B,) int32 cache_leftpad: sequence b's keys start at cache row leftpad[b]
    rotary_dim: int  # 0: no rotary
    window_left: int
    window_right: int
    scale: float
    host_lens: Optional[Tuple[int, ...]] = None  # cache_seqlens read to the host (None under torch.compile)


def normalize_kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                      cache_leftpad, block_table, softmax_scale, causal, window_size, rotary_interleaved,
                      num_splits) -> KVCacheCall:
    for t, name in ((q, "q"), (k_cache, "k_cache"), (v_cache, "v_cache")):
        _check_tensor(t, name)
    if q.dim() != 4:
        raise ValueError(f"q must be 4-D (batch, seqlen_q, heads, head_dim), got shape {tuple(q.shape)}")
    for t, name in ((k_cache, "k_cache"), (v_cache, "v_cache")):
        if t.dim() != 4:
            what = "(num_blocks, page_size, heads_k, head_dim)" if block_table is not None else "(batch_cache, seqlen_cache, heads_k, head_dim)"
            raise ValueError(f"{name} must be 4-D {what}, got shape {tuple(t.shape)}")
        if t.dtype != q.dtype or t.device != q.device:
            raise TypeError(f"{name} must have q's dtype {q.dtype} and device {q.device}, got {t.dtype} on {t.device}")
    if tuple(v_cache.shape[:-1]) != tuple(k_cache.shape[:-1]):
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} does not match k_cache shape {tuple(k_cache.shape)} before the head dim")
    B, Lq, Hq, E = q.shape
    Hk = k_cache.shape[2]
    if k_cache.shape[3] != E:
        raise ValueError(f"k_cache head dim {k_cache.shape[3]} does not match q head dim {E}")
    if Hk == 0 or Hq % Hk != 0:
        raise ValueError(f"q heads {Hq} must be a multiple of k_cache/v_cache heads {Hk}")
    if not (_is_int(num_splits) and num_splits >= 0):
        raise ValueError(f"num_splits must be an int >= 0 (0: automatic), got {num_splits!r}")
    check_bool(rotary_interleaved, "rotary_interleaved")
    left, right = normalize_window(window_size, causal, "window_size")
    scale = _check_scale(softmax_scale, E)

    len_new = 0
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (or neither)")
    if k is not None:
        for t, name, last in ((k, "k", E), (v, "v", v_cache.shape[3])):
            _check_tensor(t, name)
            if t.dim() != 4 or t.shape[0] != B or t.shape[2] != Hk or t.shape[3] != last:
                raise ValueError(f"{name} must be (batch, seqlen_new, heads_k, head_dim) = ({B}, L_new, {Hk}, {last}), got shape {tuple(t.shape)}")
            if t.dtype != q.dtype or t.device != q.device:
                raise TypeError(f"{name} must have q's dtype {q.dtype} and device {q.device}, got {t.dtype} on {t.device}")
        if v.shape[1] != k.shape[1]:
            raise ValueError(f"v seqlen {v.shape[1]} does not match k seqlen {k.shape[1]}")
        len_new = k.shape[1]

    if cache_seqlens is None:
        seqlens = torch.full((B,), k_cache.shape[1] if block_table is None else 0, dtype=torch.int32, device=q.device)
        if block_table is not None:
            raise ValueError("cache_seqlens is required with a block_table")
    elif _is_int(cache_seqlens):
        seqlens = torch.full((B,), int(cache_seqlens), dtype=torch.int32, device=q.device)
    else:
        seqlens = _int32_vector(cache_seqlens, "cache_seqlens", q.device, B)

    rows = None
    if block_table is not None:
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx cannot be combined with block_table (the table selects the pages)")
        capacity = None
    else:
        capacity = k_cache.shape[1]
        if capacity == 0:
            raise ValueError(f"k_cache has no positions (dim 1 is 0, shape {tuple(k_cache.shape)}): a cache holds "
                             "at least one key per row")
        if cache_batch_idx is not None:
            rows = _int32_vector(cache_batch_idx, "cache_batch_idx", q.device, B)
            if not _compiling():
                bad = [(b, r) for b, r in enumerate(rows.tolist()) if not 0 <= r < k_cache.shape[0]]
                if bad:
                    raise ValueError(f"cache_batch_idx[{bad[0][0]}] = {bad[0][1]} is outside the cache's {k_cache.shape[0]} rows")
        elif k_cache.shape[0] < B:
            raise ValueError(f"k_cache has {k_cache.shape[0]} rows for a batch of {B}; pass cache_batch_idx")

    rotary_dim = 0
    if rotary_cos is not None or rotary_sin is not None:
        if rotary_cos is None or rotary_sin is None:
            raise ValueError("rotary_cos and rotary_sin must be given together")
        for t, name in ((rotary_cos, "rotary_cos"), (rotary_sin, "rotary_sin")):
            _check_tensor(t, name)
            if t.device != q.device:
                raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
            if t.dim() != 2 or tuple(t.shape) != tuple(rotary_cos.shape):
                raise ValueError(f"{name} must be (seqlen_ro, rotary_dim / 2) like rotary_cos, got shape {tuple(t.shape)}")
        if k is None:
            raise ValueError("rotary_cos/rotary_sin rotate the new k (and q) and need k and v (as in flash-attn)")
        rotary_dim = 2 * rotary_cos.shape[1]
        if not 0 < rotary_dim <= E:
            raise ValueError(f"rotary_dim = 2 * rotary_cos.shape[1] = {rotary_dim} must be in [2, head_dim = {E}]")

    leftpad = None if cache_leftpad is None else _int32_vector(cache_leftpad, "cache_leftpad", q.device, B)
    if not _compiling():
        lens = seqlens.tolist()
        pads = [0] * B if leftpad is None else leftpad.tolist()
        for b, n in enumerate(lens):
            if n < 0:
                raise ValueError(f"cache_seqlens[{b}] = {n} must be >= 0")
            if not 0 <= pads[b] <= n:
                raise ValueError(f"cache_leftpad[{b}] = {pads[b]} must be in [0, cache_seqlens[{b}]] = [0, {n}]")
            if capacity is not None and n + len_new > capacity:
                raise ValueError(f"cache_seqlens[{b}] + L_new = {n} + {len_new} = {n + len_new} is beyond the cache's {capacity} rows")
            if rotary_dim and n + max(len_new, Lq) > rotary_cos.shape[0]:
                raise ValueError(f"rotary_cos/rotary_sin have {rotary_cos.shape[0]} positions; sequence {b} needs {n + max(len_new, Lq)}")
        if block_table is not None:
            check_block_table(block_table, B, q.device, k_cache.shape[0], k_cache.shape[1], [n + len_new for n in lens])
    return KVCacheCall(batch=B, len_q=Lq, len_new=len_new, cache_seqlens=seqlens, cache_rows=rows, leftpad=leftpad,
                       rotary_dim=rotary_dim, window_left=left, window_right=right, scale=scale,
                       host_lens=None if _compiling() else tuple(lens))
