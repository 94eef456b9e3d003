"""Launchers behind ``attnkern::triton_fwd`` / ``attnkern::triton_bwd`` (schemas in attnkern/ops.py).

They check the op's arguments (the op can be called directly, so this is an edge), allocate
outputs with the same stride rule as the fake kernels, and launch the kernels of
forward.py / backward.py: autotuned on a GPU (configs.py), one fixed small tile under
TRITON_INTERPRET=1, where they run on CPU tensors.

The kernel modules are imported on the first launch, not with this module: Triton decides
between compiling and interpreting when a kernel is decorated, so importing this module
(as the capability check in attnkern/dispatch.py does) must not fix that choice.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton

from .. import _semantics, ops, reference
from .._limits import TRITON_MAX_GRID_DIM, TRITON_MAX_HEAD_DIM
from .._limits import triton_interpreting as _interpreting
from . import configs

LOG2E = math.log2(math.e)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _kernels():
    from . import backward, forward

    return forward, backward


# ---------------------------------------------------------------------------------------
# argument checks


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """The kernels read the head dim with unit stride; anything else is copied once."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _check_device(q: torch.Tensor, op: str) -> None:
    if q.device.type == "cuda":
        return
    if q.device.type == "cpu" and _interpreting():
        return
    raise RuntimeError(
        f"attnkern::{op} runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1; got {q.device}"
    )


def _check_dtypes_devices(op, q, k, v) -> None:
    if q.dtype not in _DTYPES:
        raise TypeError(f"q must be float16, bfloat16 or float32 for the Triton backend, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    _check_device(q, op)


def _check_dropout(dropout_p, rng_seed) -> None:
    if not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0 and (rng_seed is None or rng_seed.numel() < 1 or rng_seed.dtype != torch.int64
                          or rng_seed.device.type != "cpu"):
        raise ValueError("rng_seed must be a CPU int64 tensor with at least one element when dropout_p > 0")


def _check_inputs(op, q, k, v, mask, rng_seed, scale, window_left, window_right, dropout_p) -> Optional[str]:
    """Validate the forward arguments; return the mask kind (None, "bool" or "float")."""
    for t, name, want in ((q, "q", "(B, Hq, L, E)"), (k, "k", "(B, Hkv, S, E)"), (v, "v", "(B, Hkv, S, Ev)")):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor {want}, got {getattr(t, 'shape', type(t).__name__)}")
    _check_dtypes_devices(op, q, k, v)
    B, Hq, L, E = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {B}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[3] != E:
        raise ValueError(f"k head dim {k.shape[3]} does not match q head dim {E}")
    if v.shape[1] != Hkv or v.shape[2] != S:
        raise ValueError(f"v shape {tuple(v.shape)} does not match k heads/length ({Hkv}, {S})")
    if (Hkv == 0 and Hq != 0) or (Hkv > 0 and Hq % Hkv != 0):
        raise ValueError(f"q heads {Hq} must be a multiple of k/v heads {Hkv}")
    max_dim = TRITON_MAX_HEAD_DIM
    if max(E, v.shape[3]) > max_dim or min(E, v.shape[3]) < 1:
        raise ValueError(f"head dims ({E}, {v.shape[3]}) must be in [1, {max_dim}] for the Triton backend")
    if max(Hq, B) > TRITON_MAX_GRID_DIM:
        raise ValueError(f"the Triton backend supports at most {TRITON_MAX_GRID_DIM} query heads and batch entries, "
                         f"got {Hq} heads, batch {B}")
    if window_left < -1 or window_right < -1:
        raise ValueError(f"window_left/window_right must be >= -1, got ({window_left}, {window_right})")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    _check_dropout(dropout_p, rng_seed)
    if mask is None:
        return None
    if tuple(mask.shape) != (B, Hq, L, S):
        raise ValueError(f"mask must have shape (B, Hq, L, S) = {(B, Hq, L, S)}, got {tuple(mask.shape)}")
    if mask.device != q.device:
        raise ValueError(f"mask must be on the query's device {q.device}, got {mask.device}")
    if mask.dtype == torch.bool:
        return "bool"
    if mask.dtype not in (torch.float32, q.dtype):
        raise TypeError(f"mask must be bool, float32 or the query's dtype {q.dtype}, got {mask.dtype}")
    return "float"


def _check_backward(q, grad_out, out, lse, grad_lse, mask_kind, mask_needs_grad, Ev) -> None:
    B, Hq, L = q.shape[:3]
    o_shape = (B, Hq, L, Ev)
    for t, name in ((out, "out"), (grad_out, "grad_out")):
        if tuple(t.shape) != o_shape:
            raise ValueError(f"{name} must have shape {o_shape}, got {tuple(t.shape)}")
        if t.dtype != q.dtype or t.device != q.device:
            raise TypeError(f"{name} must be {q.dtype} on {q.device}, got {t.dtype} on {t.device}")
    if tuple(lse.shape) != (B, Hq, L) or lse.dtype != torch.float32 or lse.device != q.device:
        raise ValueError(f"lse must be float32 of shape {(B, Hq, L)} on {q.device}, got {lse.dtype} "
                         f"{tuple(lse.shape)} on {lse.device}")
    if grad_lse is not None and (tuple(grad_lse.shape) != (B, Hq, L) or grad_lse.device != q.device):
        raise ValueError(f"grad_lse must have shape {(B, Hq, L)} on {q.device}, got {tuple(grad_lse.shape)}")
    if mask_needs_grad and mask_kind != "float":
        raise ValueError("mask_needs_grad requires a floating mask")


# ---------------------------------------------------------------------------------------
# shared launch arguments


def _window_side(side: int, L: int, S: int) -> int:
    """A window side of L + S or more reaches every key: unbounded (-1), as csrc/torch_params.h
    window_side does, so no side near 2**63 reaches the kernels' index arithmetic."""
    return -1 if side >= L + S else side


def _band_args(L, S, window_left, window_right, bottom_right):
    """offset, and the window with -1 replaced by L + S (a bound no row reaches)."""
    unbounded = L + S
    left = window_left if window_left >= 0 else unbounded
    right = window_right if window_right >= 0 else unbounded
    return (S - L if bottom_right else 0), left, right


def _dropout_args(rng_seed, dropout_p):
    """(seed_lo, seed_hi, threshold, 1 / (1 - p)) with the reference's threshold rule."""
    if dropout_p <= 0:
        return 0, 0, 0, 1.0
    seed = int(rng_seed.reshape(-1)[0]) & 0xFFFFFFFFFFFFFFFF
    return seed & 0xFFFFFFFF, seed >> 32, reference.dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p)


def _mask_arg(mask, fallback):
    """The mask as the kernels read it (bool as bytes) and its four strides (0 where broadcast)."""
    if mask is None:
        return fallback, (0, 0, 0, 0)
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    return mask, tuple(mask.stride())


def _head_blocks(E, Ev):
    # power-of-two tiles, at least 16 (tl.dot's minimum); loads mask the padding
    return max(16, triton.next_power_of_2(max(E, 1))), max(16, triton.next_power_of_2(max(Ev, 1)))


_tuned_cache = {}


def _launcher(kernel, kind: str, device: torch.device, meta):
    """Autotuned launcher for a CUDA device (one per kernel, architecture and head-dim class)."""
    props = torch.cuda.get_device_properties(device)
    arch = configs.arch_name((props.major, props.minor))
    smem = getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024
    head = configs.head_class(meta["BLOCK_D"], meta["BLOCK_DV"])
    tune = configs.tuning_enabled()
    key = (kernel, kind, arch, head, smem, tune)
    if key not in _tuned_cache:
        _tuned_cache[key] = configs.autotuned(kernel, kind, arch, head, smem, tune)
    return _tuned_cache[key]


def _launch(kernel, kind: str, device, grid, *args, **meta):
    """Launch with a fixed tile under the interpreter, through the autotuner on a GPU."""
    if _interpreting():
        fixed = dict(configs.INTERPRETER)
        kernel[grid(fixed)](*args, **meta, **fixed)
    else:
        with torch.cuda.device(device):
            _launcher(kernel, kind, device, meta)[grid](*args, **meta)


def _common(forward_kernels, q, k, v, mask_kind, window_left, window_right, bottom_right):
    """Shape arguments, autotune-key arguments and constexprs shared by the attention kernels."""
    B, Hq, L, E = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    window_left, window_right = _window_side(window_left, L, S), _window_side(window_right, L, S)
    offset, left, right = _band_args(L, S, window_left, window_right, bottom_right)
    block_d, block_dv = _head_blocks(E, Ev)
    shape_args = (Hq, Hq // Hkv, L, S, E, Ev, offset, left, right)
    key_args = (configs.band_kind(window_left, window_right), configs.length_bucket(L), configs.length_bucket(S))
    meta = dict(BLOCK_D=block_d, BLOCK_DV=block_dv, PAD_D=block_d != E, PAD_DV=block_dv != Ev,
                MASK_KIND=forward_kernels.MASK_KINDS[mask_kind],
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    return shape_args, key_args, meta


def _strides3(t):
    return t.stride(0), t.stride(1), t.stride(2)


# ---------------------------------------------------------------------------------------
# the ops


def _modifier_args(q, softcap, sinks, alibi_slopes, batch=None):
    """Pointers, the log2-domain cap and the constexprs of the score modifiers (ops' checks done here).
    ``batch``: rows of alibi_slopes (q.shape[0] for the dense op; the sequence count when packed)."""
    B, Hq = q.shape[0] if batch is None else batch, q.shape[1]
    if not (0.0 <= softcap < math.inf):
        raise ValueError(f"softcap must be finite and >= 0, got {softcap}")
    for t, name, shape in ((sinks, "sinks", (Hq,)), (alibi_slopes, "alibi_slopes", (B, Hq))):
        if t is not None and (t.dtype != torch.float32 or tuple(t.shape) != shape or t.device != q.device):
            raise ValueError(f"{name} must be float32 of shape {shape} on {q.device}, got {t.dtype} "
                             f"{tuple(t.shape)} on {t.device}")
    sinks_arg = q if sinks is None else sinks.contiguous()
    alibi_arg = q if alibi_slopes is None else alibi_slopes.contiguous()
    meta = dict(SOFTCAP=softcap > 0, HAS_ALIBI=alibi_slopes is not None)
    lo, hi = _semantics.SOFTCAP_RANGE  # (no fp32 result changes: csrc/mask.h kSoftcapMax)
    return sinks_arg, alibi_arg, min(max(softcap, lo), hi) * LOG2E if softcap > 0 else 1.0, meta


def forward(q, k, v, mask, rng_seed, scale, window_left, window_right, bottom_right, dropout_p, softcap=0.0,
            sinks=None, alibi_slopes=None):
    mask_kind = _check_inputs("triton_fwd", q, k, v, mask, rng_seed, scale, window_left, window_right, dropout_p)
    return _forward(q, k, v, mask, mask_kind, rng_seed, scale, window_left, window_right, bottom_right, dropout_p,
                    softcap, sinks, alibi_slopes)


def _forward(q, k, v, mask, mask_kind, rng_seed, scale, window_left, window_right, bottom_right, dropout_p, softcap,
             sinks, alibi_slopes, row_stats=None):
    """The checked forward; with ``row_stats`` ((B, Hq, L, 2) fp32) it also writes every row's
    (max, log2 sum) there (the backward's rare path, _huge_row_stats)."""
    sinks_arg, alibi_arg, softcap2, mod_meta = _modifier_args(q, softcap, sinks, alibi_slopes)
    B, Hq, L, _ = q.shape
    S, Ev = k.shape[2], v.shape[3]
    out = ops.empty_rows_like(q, Ev, q.dtype)
    lse = torch.empty((B, Hq, L), dtype=torch.float32, device=q.device)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    if S == 0:  # every row attends nothing: output 0 (NaN under a NaN sink), LSE the sink or -inf
        out.zero_()
        if sinks is not None:
            out.copy_(torch.where(sinks.isnan(), float("nan"), 0.0).view(1, Hq, 1, 1).expand(out.shape))
        lse.copy_(sinks.view(1, Hq, 1).expand(B, Hq, L) if sinks is not None else torch.full_like(lse, float("-inf")))
        return out, lse
    qc, kc, vc = (_unit_last_stride(t) for t in (q, k, v))
    forward_kernels, _ = _kernels()
    mask_arg, mask_strides = _mask_arg(mask, qc)
    shape_args, key_args, meta = _common(forward_kernels, qc, kc, vc, mask_kind, window_left, window_right,
                                         bottom_right)
    seed_lo, seed_hi, threshold, drop_scale = _dropout_args(rng_seed, dropout_p)
    _launch(
        forward_kernels.fwd_kernel, "fwd", q.device, lambda c: (triton.cdiv(L, c["BLOCK_M"]), Hq, B),
        qc, kc, vc, mask_arg, out, lse, lse if row_stats is None else row_stats,
        *_strides3(qc), *_strides3(kc), *_strides3(vc), *mask_strides, *_strides3(out),
        *shape_args, scale * LOG2E, seed_lo, seed_hi, threshold, drop_scale, sinks_arg, alibi_arg, softcap2,
        *key_args,
        HAS_DROPOUT=dropout_p > 0, HAS_SINKS=sinks is not None, WRITE_STATS=row_stats is not None, **mod_meta,
        **meta,
    )
    return out, lse


def _huge_row_stats(q, k, v, lse, mask, mask_kind, rng_seed, scale, window_left, window_right, bottom_right,
                    dropout_p, softcap, alibi_slopes):
    """The backward's rare path (csrc/mask.h kHugeLse): when some row's fp32 LSE is huge it has lost
    log(sum), so the forward runs once more and writes every row's (max, log2 sum), which the
    backward kernels (HUGE_ROWS) take for those rows. None when no row needs it, so the plain
    backward pays one reduction over the LSE (on a GPU, also a host sync)."""
    huge = (lse.abs() > _semantics.HUGE_LSE) & lse.isfinite()
    if not bool(huge.any()):
        return None
    row_stats = torch.empty(lse.shape + (2,), dtype=torch.float32, device=lse.device)
    _forward(q, k, v, mask, mask_kind, rng_seed, scale, window_left, window_right, bottom_right, dropout_p, softcap,
             None, alibi_slopes, row_stats)
    return row_stats


def backward(grad_out, grad_lse, q, k, v, out, lse, mask, rng_seed, scale, window_left, window_right, bottom_right,
             dropout_p, mask_needs_grad, softcap=0.0, alibi_slopes=None):
    mask_kind = _check_inputs("triton_bwd", q, k, v, mask, rng_seed, scale, window_left, window_right, dropout_p)
    _, alibi_arg, softcap2, mod_meta = _modifier_args(q, softcap, None, alibi_slopes)
    _check_backward(q, grad_out, out, lse, grad_lse, mask_kind, mask_needs_grad, v.shape[3])
    B, Hq, L, E = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    dq = ops.empty_rows_like(q, E, q.dtype)
    dk = ops.empty_rows_like(k, E, q.dtype)
    dv = ops.empty_rows_like(v, Ev, q.dtype)
    if mask_needs_grad:  # keys outside the band are never visited: their gradient is 0
        dmask = torch.zeros((B, Hq, L, S), dtype=torch.float32, device=q.device)
    else:
        dmask = torch.empty((0,), dtype=torch.float32, device=q.device)
    if B * Hq * L == 0 or S == 0:  # no (query, key) pair: every gradient is 0
        for t in (dq, dk, dv):
            t.zero_()
        return dq, dk, dv, dmask

    qc, kc, vc, oc, doc = (_unit_last_stride(t) for t in (q, k, v, out, grad_out))
    forward_kernels, bwd = _kernels()
    mask_arg, mask_strides = _mask_arg(mask, qc)
    shape_args, key_args, meta = _common(forward_kernels, qc, kc, vc, mask_kind, window_left, window_right,
                                         bottom_right)
    seed_lo, seed_hi, threshold, drop_scale = _dropout_args(rng_seed, dropout_p)
    lse_c = lse.contiguous()
    row_stats = _huge_row_stats(q, k, v, lse_c, mask, mask_kind, rng_seed, scale, window_left, window_right,
                                bottom_right, dropout_p, softcap, alibi_slopes)
    delta = torch.empty((B, Hq, L), dtype=torch.float32, device=q.device)
    glse = None if grad_lse is None else grad_lse.to(torch.float32).contiguous()

    block_m = configs.PREPROCESS["BLOCK_M"]
    pre_meta = {} if _interpreting() else {"num_warps": configs.PREPROCESS["num_warps"]}
    bwd.preprocess_kernel[(triton.cdiv(L, block_m), Hq, B)](
        oc, doc, glse if glse is not None else delta, delta, *_strides3(oc), *_strides3(doc), Hq, L, Ev,
        BLOCK_DV=meta["BLOCK_DV"], PAD_DV=meta["PAD_DV"], HAS_GRAD_LSE=glse is not None, BLOCK_M=block_m,
        **pre_meta,
    )
    common = (*_strides3(qc), *_strides3(kc), *_strides3(vc), *_strides3(doc), *mask_strides)
    scalars = (*shape_args, scale, scale * LOG2E, seed_lo, seed_hi, threshold, drop_scale, alibi_arg, softcap2,
               *key_args)
    _launch(
        bwd.dkdv_kernel, "dkdv", q.device, lambda c: (triton.cdiv(S, c["BLOCK_N"]), Hkv, B),
        qc, kc, vc, doc, mask_arg, lse_c, delta, delta if row_stats is None else row_stats, dk, dv, *common,
        *_strides3(dk), *_strides3(dv), *scalars,
        HAS_DROPOUT=dropout_p > 0, HUGE_ROWS=row_stats is not None, **mod_meta, **meta,
    )
    _launch(
        bwd.dq_kernel, "dq", q.device, lambda c: (triton.cdiv(L, c["BLOCK_M"]), Hq, B),
        qc, kc, vc, doc, mask_arg, lse_c, delta, delta if row_stats is None else row_stats, dq,
        dmask if mask_needs_grad else delta, *common, *_strides3(dq), *scalars,
        HAS_DROPOUT=dropout_p > 0, MASK_GRAD=mask_needs_grad, HUGE_ROWS=row_stats is not None, **mod_meta, **meta,
    )
    return dq, dk, dv, dmask
