"""Launchers of the packed (varlen) and paged Triton kernels: the ops ``attnkern::triton_varlen_fwd``
and ``attnkern::triton_varlen_bwd`` (schemas, fake kernels and autograd in attnkern/ops_varlen.py).

Each op checks its tensors and every index value (cu_seqlens, seqused_k, block_table) before a
kernel reads through them (the op is what runs under torch.compile, where the front end cannot
read values); on a GPU that costs one device-to-host copy of those small tensors. Outputs follow
the fake kernels: contiguous out ``(total_q, Hq, Ev)``, lse ``(Hq, total_q)`` fp32, gradients
shaped like q, k, v (contiguous). Rows past ``cu_seqlens_q[-1]`` get output 0 and LSE -inf,
keys no query sees gradient 0.

Split-KV (forward): when the (query tile, head) programs cannot fill the GPU's SMs (decoding:
one query tile per sequence) and the keys are long, each tile's key blocks are split over
``grid[2]`` programs that write normalised partials, merged here by their LSE (the sinks join
once, in the merge).
"""

from __future__ import annotations

import math

import torch
import triton

from .._limits import TRITON_MAX_GRID_DIM, TRITON_MAX_HEAD_DIM
from .._limits import triton_interpreting as _interpreting
from .._semantics import HUGE_LSE
from .._varlen_semantics import check_block_table, check_packed_shapes, packed_lengths
from . import configs
from .launch import (LOG2E, _band_args, _check_dropout, _check_dtypes_devices, _dropout_args, _head_blocks, _launch,
                     _modifier_args, _unit_last_stride)

MAX_SPLITS = 64
# under TRITON_INTERPRET=1 there are no SMs: a small count sends small decode tests down the split path
INTERPRETER_SMS = 8
# the tile sizes the split heuristic assumes (the autotuner picks the real ones after the split)
NOMINAL_BLOCK_M, NOMINAL_BLOCK_N = 64, 64


def _kernels():
    from . import backward, varlen

    return varlen, backward


def _check_packed(op, q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, block_table, scale, window_left,
                  window_right, dropout_p, rng_seed):
    """Tensor and value checks; returns ``(cq, ck, len_q, len_k)`` (see packed_lengths)."""
    paged = block_table is not None
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _check_dtypes_devices(op, q, k, v)
    batch = check_packed_shapes(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, paged)
    heads_q = q.shape[1]
    max_dim = TRITON_MAX_HEAD_DIM
    if max(q.shape[-1], v.shape[-1]) > max_dim or min(q.shape[-1], v.shape[-1]) < 1:
        raise ValueError(f"head dims ({q.shape[-1]}, {v.shape[-1]}) must be in [1, {max_dim}] for the Triton backend")
    if heads_q > TRITON_MAX_GRID_DIM:
        raise ValueError(f"the Triton backend supports at most {TRITON_MAX_GRID_DIM} query heads, got {heads_q}")
    if window_left < -1 or window_right < -1:
        raise ValueError(f"window_left/window_right must be >= -1, got ({window_left}, {window_right})")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    _check_dropout(dropout_p, rng_seed)
    lengths = packed_lengths(q, k, cu_seqlens_q, cu_seqlens_k, seqused_k, paged)
    if paged:
        check_block_table(block_table, batch, q.device, k.shape[0], k.shape[1], lengths[3])
    return lengths


def num_splits(len_q, len_k, heads_q, sm_count, block_m=NOMINAL_BLOCK_M, block_n=NOMINAL_BLOCK_N) -> int:
    """Split-KV count: > 1 only when the (query tile, head) programs leave SMs idle, and then no
    more than keeps two key blocks per split of the longest sequence."""
    programs = heads_q * sum(-(-n // block_m) for n in len_q)
    if programs == 0 or programs >= sm_count:
        return 1
    longest = max(len_k, default=0)
    return max(1, min(-(-sm_count // programs), -(-longest // (2 * block_n)), MAX_SPLITS))


def _merge_splits(out_part, lse_part, sinks):
    """Normalised partials (splits, T, Hq, Ev) fp32 and their LSE (splits, Hq, T) -> out (T, Hq, Ev), lse (Hq, T)."""
    top = lse_part.amax(0)
    if sinks is not None:
        top = torch.maximum(top, sinks[:, None])
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # rows with nothing at all
    weight = torch.exp(lse_part - top)  # 0 for an empty split (LSE -inf)
    denom = weight.sum(0)
    if sinks is not None:
        denom = denom + torch.exp(sinks[:, None] - top)
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    out = torch.einsum("sht,sthd->thd", weight / safe, out_part)
    lse = torch.where(denom > 0, top + torch.log(safe), torch.full_like(top, float("-inf")))
    return out, lse


def _shared_args(q, k, v, window_left, window_right, batch, len_q, len_k, paged):
    """Scalars, autotune keys and constexprs every varlen kernel takes."""
    total_q, heads_q, E = q.shape
    heads_kv, Ev = k.shape[-2], v.shape[-1]
    key_rows = k.shape[0] * (k.shape[1] if paged else 1)
    _, left, right = _band_args(total_q, key_rows, window_left, window_right, True)
    block_d, block_dv = _head_blocks(E, Ev)
    shape_args = (batch, max(1, batch.bit_length()), total_q, heads_q, heads_q // heads_kv, E, Ev, left, right)
    mean = lambda lens: sum(lens) // max(1, len(lens))  # noqa: E731
    key_args = (configs.band_kind(window_left, window_right), configs.length_bucket(mean(len_q)),
                configs.length_bucket(mean(len_k)))
    meta = dict(BLOCK_D=block_d, BLOCK_DV=block_dv, PAD_D=block_d != E, PAD_DV=block_dv != Ev, MASK_KIND=0,
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    return shape_args, key_args, meta


def _strides2(t):
    return t.stride(0), t.stride(1)


def forward(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, block_table, scale, window_left, window_right,
            softcap=0.0, sinks=None, alibi_slopes=None, dropout_p=0.0, rng_seed=None):
    paged = block_table is not None
    cq, _, len_q, len_k = _check_packed("triton_varlen_fwd", q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k,
                                        block_table, scale, window_left, window_right, dropout_p, rng_seed)
    batch = len(len_q)
    sinks_arg, alibi_arg, softcap2, mod_meta = _modifier_args(q, softcap, sinks, alibi_slopes, batch)
    total_q, heads_q, _ = q.shape
    out = q.new_empty((total_q, heads_q, v.shape[-1]))
    lse = torch.empty((heads_q, total_q), dtype=torch.float32, device=q.device)
    end = cq[-1]
    out[end:].zero_()  # rows of no sequence
    lse[:, end:] = float("-inf")
    if end == 0 or heads_q == 0:
        return out, lse

    qc, kc, vc = (_unit_last_stride(t) for t in (q, k, v))
    varlen, _ = _kernels()
    shape_args, key_args, meta = _shared_args(qc, kc, vc, window_left, window_right, batch, len_q, len_k, paged)
    if _interpreting():
        sms, bm, bn = INTERPRETER_SMS, configs.INTERPRETER["BLOCK_M"], configs.INTERPRETER["BLOCK_N"]
    else:
        sms, bm, bn = torch.cuda.get_device_properties(q.device).multi_processor_count, NOMINAL_BLOCK_M, NOMINAL_BLOCK_N
    splits = num_splits(len_q, len_k, heads_q, sms, bm, bn)
    if splits > 1:
        out_t = torch.empty((splits, total_q, heads_q, v.shape[-1]), dtype=torch.float32, device=q.device)
        lse_t = torch.empty((splits, heads_q, total_q), dtype=torch.float32, device=q.device)
        split_strides = (out_t.stride(0), lse_t.stride(0))
    else:
        out_t, lse_t, split_strides = out, lse, (0, 0)
    if paged:  # (num_blocks, page_size, Hkv, D): pages, rows in a page, heads
        k_strides = (kc.stride(1), kc.stride(2), kc.stride(0))
        v_strides = (vc.stride(1), vc.stride(2), vc.stride(0))
        table = block_table.contiguous()
        page_size = kc.shape[1]
    else:
        k_strides, v_strides = (*_strides2(kc), 0), (*_strides2(vc), 0)
        table, page_size = cu_seqlens_q, 1
    o_strides = (out_t.stride(-3), out_t.stride(-2))
    seqused = seqused_k.contiguous() if seqused_k is not None else cu_seqlens_k
    _launch(
        varlen.varlen_fwd_kernel, "fwd", q.device, lambda c: (end // c["BLOCK_M"] + batch, heads_q, splits),
        qc, kc, vc, out_t, lse_t, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), seqused, table,
        *_strides2(qc), *k_strides, *v_strides, *o_strides, *split_strides, table.stride(0),
        *shape_args, page_size, splits, scale * LOG2E, *_dropout_args(rng_seed, dropout_p), sinks_arg, alibi_arg,
        softcap2, *key_args, HAS_DROPOUT=dropout_p > 0, HAS_SINKS=sinks is not None and splits == 1,
        HAS_SEQUSED=seqused_k is not None, PAGED=paged,
        SPLIT=splits > 1, **mod_meta, **meta,
    )
    if splits > 1:
        merged, merged_lse = _merge_splits(out_t[:, :end], lse_t[:, :, :end], sinks)
        out[:end] = merged.to(out.dtype)
        lse[:, :end] = merged_lse
    return out, lse


def backward(grad_out, grad_lse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k, scale, window_left,
             window_right, softcap=0.0, alibi_slopes=None, dropout_p=0.0, rng_seed=None):
    # the dense Triton backward's rare path for rows with a huge LSE (csrc/mask.h
    # backward_row_stats) has no packed variant yet: refuse rather than return wrong gradients
    if bool(((lse.abs() > HUGE_LSE) & lse.isfinite()).any()):
        raise NotImplementedError(
            f"attnkern::triton_varlen_bwd: some row's |LSE| exceeds {HUGE_LSE:g} (scores that large lose "
            "log(sum) in an fp32 LSE); the Triton packed backward has no rare path for them yet, "
            "backend='cpu' has")
    cq, ck, len_q, len_k = _check_packed("triton_varlen_bwd", q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, None,
                                         scale, window_left, window_right, dropout_p, rng_seed)
    batch = len(len_q)
    _, alibi_arg, softcap2, mod_meta = _modifier_args(q, softcap, None, alibi_slopes, batch)
    total_q, heads_q, _ = q.shape
    heads_kv, Ev = k.shape[1], v.shape[2]
    o_shape = (total_q, heads_q, Ev)
    for t, name in ((out, "out"), (grad_out, "grad_out")):
        if tuple(t.shape) != o_shape or t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} must be {q.dtype} of shape (total_q, heads, head_dim_v) = {o_shape} on "
                             f"{q.device}, got {t.dtype} {tuple(t.shape)} on {t.device}")
    if tuple(lse.shape) != (heads_q, total_q) or lse.dtype != torch.float32 or lse.device != q.device:
        raise ValueError(f"lse must be float32 of shape (heads, total_q) = {(heads_q, total_q)}, got {lse.dtype} "
                         f"{tuple(lse.shape)}")
    if grad_lse is not None and (tuple(grad_lse.shape) != (heads_q, total_q) or grad_lse.device != q.device):
        raise ValueError(f"grad_lse must have shape {(heads_q, total_q)} on {q.device}, got {tuple(grad_lse.shape)}")
    # rows of no sequence and keys no query sees (past seqused_k, or in no sequence) keep 0
    dq, dk, dv = (torch.zeros(t.shape, dtype=q.dtype, device=q.device) for t in (q, k, v))
    if cq[-1] == 0 or ck[-1] == 0 or heads_q == 0:
        return dq, dk, dv

    qc, kc, vc, oc, doc = (_unit_last_stride(t) for t in (q, k, v, out, grad_out))
    varlen, bwd = _kernels()
    shape_args, key_args, meta = _shared_args(qc, kc, vc, window_left, window_right, batch, len_q, len_k, False)
    lse_c = lse.contiguous()
    delta = torch.empty((heads_q, total_q), dtype=torch.float32, device=q.device)
    glse = None if grad_lse is None else grad_lse.to(torch.float32).contiguous()
    # the dense preprocess on a batch of one: (Hq, total_q) is its (1, Hq, L) delta layout
    block_m = configs.PREPROCESS["BLOCK_M"]
    pre_meta = {} if _interpreting() else {"num_warps": configs.PREPROCESS["num_warps"]}
    bwd.preprocess_kernel[(triton.cdiv(total_q, block_m), heads_q, 1)](
        oc, doc, glse if glse is not None else delta, delta, 0, oc.stride(1), oc.stride(0), 0, doc.stride(1),
        doc.stride(0), heads_q, total_q, Ev,
        BLOCK_DV=meta["BLOCK_DV"], PAD_DV=meta["PAD_DV"], HAS_GRAD_LSE=glse is not None, BLOCK_M=block_m,
        **pre_meta,
    )
    cu_q, cu_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    seqused = seqused_k.contiguous() if seqused_k is not None else cu_k
    common = (*_strides2(qc), *_strides2(kc), *_strides2(vc), *_strides2(doc))
    scalars = (*shape_args, scale, scale * LOG2E, *_dropout_args(rng_seed, dropout_p), alibi_arg, softcap2, *key_args)
    flags = dict(HAS_SEQUSED=seqused_k is not None, HAS_DROPOUT=dropout_p > 0, SOFTCAP=mod_meta["SOFTCAP"],
                 HAS_ALIBI=mod_meta["HAS_ALIBI"], **meta)
    _launch(
        varlen.varlen_dkdv_kernel, "dkdv", q.device, lambda c: (ck[-1] // c["BLOCK_N"] + batch, heads_kv),
        qc, kc, vc, doc, lse_c, delta, dk, dv, cu_q, cu_k, seqused, *common, *_strides2(dk), *_strides2(dv),
        *scalars, **flags,
    )
    _launch(
        varlen.varlen_dq_kernel, "dq", q.device, lambda c: (cq[-1] // c["BLOCK_M"] + batch, heads_q),
        qc, kc, vc, doc, lse_c, delta, dq, cu_q, cu_k, seqused, *common, *_strides2(dq), *scalars, **flags,
    )
    return dq, dk, dv
