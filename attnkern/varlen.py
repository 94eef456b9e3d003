"""flash-attn 2's packed (varlen) and KV-cache entry points.

Positional order follows flash-attn 2 exactly; attnkern's extras (``seqused_k``,
``s_aux``, ``return_lse``, ``backend``) are keyword-only. Semantics: :mod:`attnkern._varlen_semantics`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple, Union

import torch

from . import dispatch
from ._semantics import check_backend, with_modifiers
from ._varlen_semantics import VarlenProblem, check_bool, check_not_implemented, normalize_kvcache, normalize_varlen

Tensor = torch.Tensor


def _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
            window_size, softcap, alibi_slopes, deterministic, return_attn_probs, block_table, seqused_k, return_lse,
            backend, s_aux):
    backend = check_backend(backend)
    check_not_implemented(dropout_p)
    check_bool(deterministic, "deterministic")  # always deterministic
    check_bool(return_attn_probs, "return_attn_probs")
    check_bool(return_lse, "return_lse")
    problem = normalize_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                               causal, window_size, block_table, seqused_k)
    problem, sinks, alibi = with_modifiers(problem, q, softcap, s_aux, alibi_slopes, "s_aux")
    out, lse = dispatch.run_packed(problem, q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, block_table, backend,
                                   sinks, alibi)
    if return_attn_probs:
        # flash-attn returns (out, lse, S_dmask); attnkern never materialises the probabilities
        return out, lse, None
    return (out, lse) if return_lse else out


def flash_attn_varlen_func(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
    max_seqlen_q: Union[int, Tensor], max_seqlen_k: Union[int, Tensor], dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None, causal: bool = False, window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
    return_attn_probs: bool = False, block_table: Optional[Tensor] = None, *, seqused_k: Optional[Tensor] = None,
    s_aux: Optional[Tensor] = None, return_lse: bool = False, backend: str = "auto",
):
    """Attention over sequences packed back to back (flash-attn 2's ``flash_attn_varlen_func``).

    q ``(total_q, H, D)``, k/v ``(total_k, Hk, D)`` (GQA: ``H % Hk == 0``), ``cu_seqlens_q/k``
    int32 ``(B + 1,)`` offsets starting at 0. Each sequence is bottom-right aligned (query i of
    sequence b at key position ``i + Lk_b - Lq_b``); ``causal`` caps the window's right side at 0.
    ``max_seqlen_*``: int or 0-d tensor. With ``block_table`` (B, max_blocks) int32, k/v are cache
    pages ``(num_blocks, page_size, Hk, D)`` (any page size; forward only) and ``cu_seqlens_k``
    gives the key counts. ``seqused_k`` (B,) int32 keeps only the first keys of each sequence.
    ``return_lse=True`` returns ``(out, lse)`` with lse ``(H, total_q)`` fp32; a row that sees no
    key gives 0 and LSE -inf (flash-attn: +inf). Rows past ``cu_seqlens_q[-1]`` output 0.
    ``softcap``, ``alibi_slopes`` (``(H,)`` or ``(B, H)`` fp32, row b for sequence b) and
    ``s_aux`` (attention sinks, ``(H,)`` logits) as in ``flash_attn_func``, per sequence.
    Full backward (dq, dk, dv, and the sinks' gradient), deterministic.
    """
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
                   window_size, softcap, alibi_slopes, deterministic, return_attn_probs, block_table, seqused_k,
                   return_lse, backend, s_aux)


def flash_attn_varlen_qkvpacked_func(
    qkv: Tensor, cu_seqlens: Tensor, max_seqlen: Union[int, Tensor], dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None, causal: bool = False, window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
    return_attn_probs: bool = False, *, s_aux: Optional[Tensor] = None, return_lse: bool = False,
    backend: str = "auto",
):
    """``flash_attn_varlen_func`` on qkv ``(total, 3, H, D)`` (self-attention, one cu_seqlens)."""
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 4 or qkv.shape[1] != 3:
        raise ValueError(f"qkv must be a (total, 3, heads, head_dim) tensor, got {getattr(qkv, 'shape', type(qkv).__name__)}")
    q, k, v = qkv.unbind(1)
    return _varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale, causal,
                   window_size, softcap, alibi_slopes, deterministic, return_attn_probs, None, None, return_lse,
                   backend, s_aux)


def flash_attn_varlen_kvpacked_func(
    q: Tensor, kv: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: Union[int, Tensor],
    max_seqlen_k: Union[int, Tensor], dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
    causal: bool = False, window_size: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None, deterministic: bool = False, return_attn_probs: bool = False, *,
    s_aux: Optional[Tensor] = None, return_lse: bool = False, backend: str = "auto",
):
    """``flash_attn_varlen_func`` with kv ``(total_k, 2, Hk, D)``."""
    if not isinstance(kv, torch.Tensor) or kv.dim() != 4 or kv.shape[1] != 2:
        raise ValueError(f"kv must be a (total_k, 2, heads_k, head_dim) tensor, got {getattr(kv, 'shape', type(kv).__name__)}")
    k, v = kv.unbind(1)
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
                   window_size, softcap, alibi_slopes, deterministic, return_attn_probs, None, None, return_lse,
                   backend, s_aux)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, interleaved: bool) -> Tensor:
    """x (B, L, H, D) rotated at positions (B, L): pairs (2i, 2i+1) if interleaved, else (i, i + rd/2)."""
    rd = 2 * cos.shape[1]
    c = cos[positions].to(x.dtype)[:, :, None, :]
    s = sin[positions].to(x.dtype)[:, :, None, :]
    if interleaved:
        x1, x2 = x[..., 0:rd:2], x[..., 1:rd:2]
    else:
        x1, x2 = x[..., : rd // 2], x[..., rd // 2: rd]
    r1, r2 = x1 * c - x2 * s, x1 * s + x2 * c
    rot = torch.stack((r1, r2), dim=-1).flatten(-2) if interleaved else torch.cat((r1, r2), dim=-1)
    return torch.cat((rot, x[..., rd:]), dim=-1)


def _cache_rows(cache: Tensor) -> Tuple[Tensor, int]:
    """Every row of a 4-D cache (pages or batch rows, rows, heads, dim) as one (N, heads, dim) view
    whose row i lies at ``i * cache.stride(1)``, and the row index step between pages (rows of a
    page, or of a batch row, stay consecutive). Overlapping views are fine: the kernels only read
    them. A layout that has no such view is copied (after the append, so reads see the new keys)."""
    row, page = cache.stride(1), cache.stride(0)
    if row <= 0 or page % row != 0:
        cache = cache.contiguous()
        row, page = cache.stride(1), cache.stride(0)
    step = page // row
    count = (cache.shape[0] - 1) * step + cache.shape[1]
    view = cache.as_strided((count, cache.shape[2], cache.shape[3]), (row, cache.stride(2), cache.stride(3)))
    return view, step


def _leftpad_keys(k_cache: Tensor, v_cache: Tensor, call, block_table: Optional[Tensor]):
    """K/V operands for a call with ``cache_leftpad``: sequence b's keys are cache positions
    ``leftpad[b] .. cache_seqlens[b] + L_new``. Returns ``(k, v, cu_seqlens_k, seqused_k, table)``.

    A contiguous cache whose sequences lie in ascending rows runs as a plain packed call over the
    rows view (cu_seqlens_k = each sequence's first row, seqused_k its key count): the kernels
    read the keys in place. Anything else (cache_batch_idx in another order, paged caches) reads
    through a table of single-row pages, one entry per key."""
    B, device = call.batch, call.cache_seqlens.device
    lens = call.cache_seqlens + call.len_new - call.leftpad  # (B,) keys per sequence
    k_rows, step = _cache_rows(k_cache)
    v_rows, v_step = _cache_rows(v_cache)
    if v_step != step:  # one table must serve both: give them one layout
        (k_rows, step), (v_rows, _) = _cache_rows(k_cache.contiguous()), _cache_rows(v_cache.contiguous())
    if block_table is None:
        cache_row = call.cache_rows if call.cache_rows is not None else torch.arange(B, dtype=torch.int32, device=device)
        first = cache_row * step + call.leftpad
        # (reading the order is a sync: under torch.compile the table below serves every call)
        if not torch.compiler.is_compiling() and B and bool(((first + lens)[:-1] <= first[1:]).all()):
            start = int(first[0])  # cu_seqlens_k starts at 0: the view starts at the first sequence's row
            cu_k = torch.cat((first, torch.tensor([k_rows.shape[0]], dtype=torch.int32, device=device))) - start
            return k_rows[start:], v_rows[start:], cu_k.to(torch.int32), lens.to(torch.int32), None
    # one entry per key a sequence can have (the table's width is static: no sync)
    longest = max(k_cache.shape[1] if block_table is None else block_table.shape[1] * k_cache.shape[1], 1)
    pos = call.leftpad[:, None].long() + torch.arange(longest, device=device)  # (B, longest) cache positions
    pos = torch.minimum(pos, (call.leftpad + lens - 1).clamp_min(call.leftpad)[:, None].long())
    if block_table is None:
        table = cache_row[:, None].long() * step + pos
    else:
        page = k_cache.shape[1]
        table = block_table.long().gather(1, (pos // page).clamp_max(block_table.shape[1] - 1)) * step + pos % page
    cu_k = torch.cat((torch.zeros(1, dtype=torch.int32, device=device), torch.cumsum(lens, 0, dtype=torch.int32)))
    return k_rows[:, None], v_rows[:, None], cu_k, None, table.to(torch.int32)


def flash_attn_with_kvcache(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Optional[Tensor] = None, v: Optional[Tensor] = None,
    rotary_cos: Optional[Tensor] = None, rotary_sin: Optional[Tensor] = None,
    cache_seqlens: Optional[Union[int, Tensor]] = None, cache_batch_idx: Optional[Tensor] = None,
    cache_leftpad: Optional[Tensor] = None, block_table: Optional[Tensor] = None,
    softmax_scale: Optional[float] = None, causal: bool = False, window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0, rotary_interleaved: bool = True, alibi_slopes: Optional[Tensor] = None,
    num_splits: int = 0, return_softmax_lse: bool = False, *, s_aux: Optional[Tensor] = None, backend: str = "auto",
):
    """Decoding against a KV cache (flash-attn 2's ``flash_attn_with_kvcache``); forward only.

    q ``(B, Lq, H, D)``. The cache is ``(B_cache, S, Hk, D)`` (rows chosen by ``cache_batch_idx``)
    or, with ``block_table`` (B, max_blocks) int32, pages ``(num_blocks, page_size, Hk, D)`` of any
    page size. ``k``/``v`` ``(B, L_new, Hk, D)`` are written in place at ``cache_seqlens[b]``, then
    sequence b attends its ``cache_seqlens[b] + L_new`` keys, bottom-right aligned.
    ``cache_leftpad`` (B,) int32 (as flash-attn): sequence b's keys start at cache position
    ``cache_leftpad[b]`` (<= ``cache_seqlens[b]``); the keys before it are never read and the
    alignment counts only the rest, while appends and rotary positions stay absolute. With
    ``rotary_cos/sin`` (seqlen_ro, rotary_dim / 2), the new k is rotated at positions
    ``cache_seqlens + t``, and q too: at ``cache_seqlens + t`` under a causal/local band, else at
    ``cache_seqlens`` for every query (as flash-attn). ``num_splits`` 0 (automatic) or a hint the
    CPU kernels ignore (they choose their own split). ``softcap``, ``alibi_slopes`` (``(H,)`` or
    ``(B, H)`` fp32) and ``s_aux`` (sinks, ``(H,)``) as in ``flash_attn_func``. Returns out ``(B, Lq, H, D)``, and
    lse ``(B, H, Lq)`` with ``return_softmax_lse``.
    """
    backend = check_backend(backend)
    check_bool(return_softmax_lse, "return_softmax_lse")
    call = normalize_kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                             cache_leftpad, block_table, softmax_scale, causal, window_size, rotary_interleaved,
                             num_splits)
    B, Lq, H, _ = q.shape
    problem = VarlenProblem(
        batch=B, heads_q=H, heads_kv=k_cache.shape[2], total_q=B * Lq, head_dim=q.shape[3],
        head_dim_v=v_cache.shape[3], scale=call.scale, window_left=call.window_left,
        window_right=call.window_right, page_size=k_cache.shape[1], dtype=q.dtype, device_type=q.device.type,
    )
    # checked before the append below writes into the caches
    problem, sinks, alibi = with_modifiers(problem, q, softcap, s_aux, alibi_slopes, "s_aux")
    seqlens = call.cache_seqlens.long()
    if call.rotary_dim:
        band = call.window_left >= 0 or call.window_right >= 0
        steps = torch.arange(Lq, device=q.device) if band else torch.zeros(Lq, dtype=torch.long, device=q.device)
        q = apply_rotary(q, rotary_cos, rotary_sin, seqlens[:, None] + steps, rotary_interleaved)
    if call.len_new:
        pos = seqlens[:, None] + torch.arange(call.len_new, device=q.device)  # (B, L_new) key positions
        if call.rotary_dim:
            k = apply_rotary(k, rotary_cos, rotary_sin, pos, rotary_interleaved)
        with torch.no_grad():
            if block_table is None:
                rows = call.cache_rows.long() if call.cache_rows is not None else torch.arange(B, device=q.device)
                index = (rows[:, None].expand_as(pos), pos)
            else:
                page = k_cache.shape[1]
                index = (block_table.long().gather(1, pos // page), pos % page)
            k_cache.index_put_(index, k)
            v_cache.index_put_(index, v)
    cu_q = torch.arange(B + 1, dtype=torch.int32, device=q.device) * Lq
    if call.leftpad is None:
        # one packed call: every sequence's Lq queries, its keys read from the cache as pages (a
        # contiguous cache is one page of S rows per cache row)
        if block_table is None:
            rows = call.cache_rows if call.cache_rows is not None else torch.arange(B, dtype=torch.int32, device=q.device)
            table = rows.to(torch.int32).view(B, 1)
        else:
            table = block_table
        zero = torch.zeros(1, dtype=torch.int32, device=q.device)
        cu_k = torch.cat((zero, torch.cumsum(call.cache_seqlens + call.len_new, 0, dtype=torch.int32)))
        keys, values, used = k_cache, v_cache, None
    else:
        keys, values, cu_k, used, table = _leftpad_keys(k_cache, v_cache, call, block_table)
        problem = dataclasses.replace(problem, page_size=0 if table is None else 1)
    out, lse = dispatch.run_packed(problem, q.reshape(B * Lq, H, q.shape[3]), keys, values, cu_q, cu_k, used,
                                   table, backend, sinks, alibi)
    out = out.view(B, Lq, H, -1)
    if return_softmax_lse:
        return out, lse.view(H, B, Lq).permute(1, 0, 2)
    return out
