"""The math oracle for packed (varlen) and KV-cache calls, built on :func:`reference.attention`.

Each sequence is cut out of the packed tensors (or gathered from its cache pages) and run as a
dense bottom-right-aligned problem; the results are concatenated back. Differentiable by
autograd: rows past ``cu_seqlens_q[-1]`` and keys no sequence uses get zero gradients.
Also ``backend="math"`` for these calls.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import reference


def sequence_keys(k: torch.Tensor, b: int, start: int, length: int, block_table: Optional[torch.Tensor]) -> torch.Tensor:
    """Keys of sequence b as (length, Hkv, D): rows start.. of packed k, or pages of block_table[b]."""
    if block_table is None:
        return k[start:start + length]
    page = k.shape[1]
    pages = block_table[b, : -(-length // page)].long()
    return k[pages].flatten(0, 1)[:length]


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, scale: float, window_left: int = -1, window_right: int = -1,
                     seqused_k: Optional[torch.Tensor] = None, block_table: Optional[torch.Tensor] = None,
                     softcap: float = 0.0, sinks: Optional[torch.Tensor] = None,
                     alibi_slopes: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                     seed: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """q (total_q, Hq, E); k, v packed (total_k, Hkv, *) or paged (num_blocks, page, Hkv, *).

    Modifiers as in :func:`reference.attention`, per sequence: sinks (Hq,), alibi_slopes (Hq,)
    or (B, Hq) (row b for sequence b). Dropout: sequence b drops as the dense reference does for
    a batch of one with the 64-bit seed ``seed + b``. Returns out (total_q, Hq, Ev) and lse (Hq, total_q)
    (float64 for float64 inputs, else fp32).
    """
    if alibi_slopes is not None and alibi_slopes.dim() == 1:
        alibi_slopes = alibi_slopes.expand(len(cu_seqlens_q) - 1, -1)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    used = seqused_k.tolist() if seqused_k is not None else None
    heads, ev = q.shape[1], v.shape[-1]
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    outs, lses = [], []
    for b in range(len(cq) - 1):
        lq = cq[b + 1] - cq[b]
        lk = used[b] if used is not None else ck[b + 1] - ck[b]
        qb = q[cq[b]:cq[b + 1]]
        if lq == 0 or (lk == 0 and sinks is None):  # no key: output 0, LSE -inf (and no score matrix to reduce)
            outs.append(qb.new_zeros(lq, heads, ev) + 0 * qb.sum())
            lses.append(torch.full((heads, lq), float("-inf"), dtype=lse_dtype, device=q.device))
            continue
        kb = sequence_keys(k, b, ck[b], lk, block_table)
        vb = sequence_keys(v, b, ck[b], lk, block_table)
        o, lse = reference.attention(
            qb.transpose(0, 1)[None], kb.transpose(0, 1)[None], vb.transpose(0, 1)[None], None, scale,
            window_left, window_right, bottom_right=True, dropout_p=dropout_p,
            seed=None if seed is None else (seed + b) & 0xFFFFFFFFFFFFFFFF, softcap=softcap, sinks=sinks,
            alibi_slopes=None if alibi_slopes is None else alibi_slopes[b:b + 1],
        )
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0].to(lse_dtype))
    rest = q.shape[0] - cq[-1]
    outs.append(q.new_zeros(rest, heads, ev))
    lses.append(torch.full((heads, rest), float("-inf"), dtype=lse_dtype, device=q.device))
    return torch.cat(outs, 0), torch.cat(lses, 1)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotary embedding of x (B, L, H, D) at integer positions (B, L), as complex rotations.

    The first rotary_dim = 2 * cos.shape[1] features are rotated in pairs: (2i, 2i+1) when
    interleaved (GPT-J), (i, i + rotary_dim / 2) otherwise (GPT-NeoX); the rest pass through.
    """
    rd = 2 * cos.shape[1]
    xr = x[..., :rd].double()
    if interleaved:
        z = torch.complex(xr[..., 0::2], xr[..., 1::2])
    else:
        z = torch.complex(xr[..., : rd // 2], xr[..., rd // 2:])
    turn = torch.complex(cos[positions].double(), sin[positions].double())
    z = z * turn[:, :, None, :]
    if interleaved:
        rot = torch.stack((z.real, z.imag), dim=-1).flatten(-2)
    else:
        rot = torch.cat((z.real, z.imag), dim=-1)
    return torch.cat((rot.to(x.dtype), x[..., rd:]), dim=-1)


def kvcache_attention(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
                      cache_batch_idx=None, block_table=None, scale: float = 1.0, window_left: int = -1,
                      window_right: int = -1, rotary_interleaved: bool = True, softcap: float = 0.0, sinks=None,
                      alibi_slopes=None, cache_leftpad=None):
    """What flash_attn_with_kvcache computes, without touching its inputs.

    With ``cache_leftpad``, sequence b's keys are cache positions ``cache_leftpad[b]`` to
    ``cache_seqlens[b] + L_new`` (the ones before are padding, never seen), and the bottom-right
    alignment counts only those; appends and rotary positions stay absolute cache positions.

    Returns (out (B, Lq, H, Ev), lse (B, H, Lq), k_cache', v_cache'): the caches after the append.
    """
    B, Lq, H, _ = q.shape
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    seqlens = cache_seqlens.long()
    if rotary_cos is not None:
        local = window_left >= 0 or window_right >= 0
        # flash-attn: with a causal/local band each query has its own position, else all sit at cache_seqlens
        steps = torch.arange(Lq, device=q.device) if local else torch.zeros(Lq, dtype=torch.long, device=q.device)
        q = rotary(q, rotary_cos, rotary_sin, seqlens[:, None] + steps, rotary_interleaved)
    len_new = 0 if k is None else k.shape[1]
    if k is not None:
        if rotary_cos is not None:
            pos = seqlens[:, None] + torch.arange(len_new, device=q.device)
            k = rotary(k, rotary_cos, rotary_sin, pos, rotary_interleaved)
        for b in range(B):
            for t in range(len_new):
                j = int(seqlens[b]) + t
                if block_table is None:
                    row = b if cache_batch_idx is None else int(cache_batch_idx[b])
                    k_cache[row, j], v_cache[row, j] = k[b, t], v[b, t]
                else:
                    page = int(block_table[b, j // k_cache.shape[1]])
                    k_cache[page, j % k_cache.shape[1]], v_cache[page, j % k_cache.shape[1]] = k[b, t], v[b, t]
    outs, lses = [], []
    for b in range(B):
        lk = int(seqlens[b]) + len_new
        pad = 0 if cache_leftpad is None else int(cache_leftpad[b])
        if block_table is None:
            row = b if cache_batch_idx is None else int(cache_batch_idx[b])
            kb, vb = k_cache[row, :lk], v_cache[row, :lk]
        else:
            kb = sequence_keys(k_cache, b, 0, lk, block_table)
            vb = sequence_keys(v_cache, b, 0, lk, block_table)
        kb, vb, lk = kb[pad:], vb[pad:], lk - pad
        cu_q = torch.tensor([0, Lq], dtype=torch.int32)
        cu_k = torch.tensor([0, lk], dtype=torch.int32)
        slopes = None if alibi_slopes is None else alibi_slopes.expand(B, H)[b:b + 1]
        o, lse = varlen_attention(q[b], kb, vb, cu_q, cu_k, scale, window_left, window_right, softcap=softcap,
                                  sinks=sinks, alibi_slopes=slopes)
        outs.append(o)
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses), k_cache, v_cache
