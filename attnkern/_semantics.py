"""Argument checking and normalisation: the one place that defines what a call means.

Every public entry point reduces its arguments to canonical 4-D views
``q (B, Hq, L, E)``, ``k (B, Hkv, S, E)``, ``v (B, Hkv, S, Ev)``, an optional mask
expanded (without copying) to ``(B, Hq, L, S)``, and a frozen :class:`Problem`.
Backends receive only these; none of them re-interprets the user's arguments.

The attention band. Query row ``i`` sits at position ``i + offset`` where
``offset = 0`` (top-left alignment, torch's ``is_causal``) or ``offset = S - L``
(bottom-right alignment, flash-attn's ``causal``). Key ``j`` takes part iff

    (left  < 0 or j >= i + offset - left) and
    (right < 0 or j <= i + offset + right)

and the mask (if any) lets it. ``is_causal`` is the window ``(-1, 0)`` intersected
with the user's window. A row that attends no key yields output 0 and LSE -inf.

Top-k selection (``attnkern.topk_attention``). Among the keys row ``i`` may see (band,
mask, and a float mask's -inf as above) it keeps the ``top_k`` with the highest scores,
ties going to the lower key index; with fewer allowed keys it keeps them all, so
``top_k >= S`` is dense attention. The output is the softmax over the kept scores times
their values. Indices come in selection order (score descending, then key index), shape
``(..., L, min(top_k, S))``, -1 in the slots of rows that keep fewer keys. Gradients flow
through the softmax over the kept keys; the selection is piecewise constant and carries
none (backends reuse the forward's indices, so forward and backward agree exactly).

Score modifiers (each optional; all compose with windows, masks, GQA, dropout and LSE).
With ``s = scale * q . k``:

1. softcap ``c > 0``: ``s <- c * tanh(s / c)``, before the position bias and the masks;
2. ALiBi ``slope`` (``(H,)`` or ``(B, H)`` fp32): ``s <- s - slope * |pos_q - j|`` with
   ``pos_q = i + offset`` the query's aligned key position;
3. then the float mask is added and the band/bool mask exclude keys;
4. sinks (``(H,)``, raw logits, never scaled, capped or masked): each head's sink joins the
   softmax denominator once, ``LSE = logaddexp(LSE_keys, sink_h)``, and contributes no value.
   A row that sees no key outputs 0 with LSE = sink. The sink's gradient is
   ``d sink_h = -sum_{b,i} exp(sink_h - LSE_bhi) * (rowsum(dO * O)_bhi - dLSE_bhi)``.
"""

from __future__ import annotations

import math
import numbers
import sys
from dataclasses import dataclass, replace
from typing import Optional, Sequence, Tuple

import torch

BACKENDS = ("auto", "cpu", "triton", "cuda", "math")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# A query row whose |LSE| exceeds this has an fp32 LSE too coarse for the fused backward's
# P = exp(s - LSE) (next to a huge max, e.g. a row all at a -1e9 or finfo.min mask, log(sum) is
# lost outright); the backward recomputes such rows' max and sum (csrc/mask.h kHugeLse, the same
# value, explains the choice).
HUGE_LSE = 1024.0

# The fused kernels hold a softcap in this range (csrc/mask.h kSoftcapMin / kSoftcapMax explain
# why no fp32 result changes); the Triton launcher applies it, the C++ op boundary likewise.
SOFTCAP_RANGE = (2.0 ** -100, 2.0 ** 100)
# tanh of the softcap: |y| < TANH_POLY_BOUND takes y + y^3 P(y^2) with these coefficients of P
# (lowest first), the rest 1 - 2 / (1 + e^(2y)); csrc/mask.h softcap_tanh, whose comment gives the
# accuracy, holds the same numbers for the C++ and CUDA kernels
TANH_POLY_BOUND = 0.625
TANH_POLY = (-3.3333281942e-01, 1.3331442184e-01, -5.3739713875e-02, 2.0639083091e-02, -5.7049821214e-03)


@dataclass(frozen=True)
class Problem:
    """Shapes and options of one attention call, after normalisation."""

    batch: int
    heads_q: int
    heads_kv: int
    len_q: int
    len_k: int
    head_dim: int
    head_dim_v: int
    scale: float
    window_left: int  # -1: unbounded
    window_right: int  # -1: unbounded (causal already folded in)
    bottom_right: bool
    dropout_p: float
    mask_kind: Optional[str]  # None, "bool" or "float"
    dtype: torch.dtype
    device_type: str
    # score modifiers (see the module docstring); the tensors travel beside the Problem
    softcap: float = 0.0  # 0: none
    has_sinks: bool = False
    has_alibi: bool = False

    @property
    def has_modifiers(self) -> bool:
        return self.softcap > 0 or self.has_sinks or self.has_alibi

    @property
    def offset(self) -> int:
        """Position of query row 0 on the key axis."""
        return self.len_k - self.len_q if self.bottom_right else 0

    @property
    def has_window(self) -> bool:
        return self.window_left >= 0 or self.window_right >= 0

    @property
    def group_size(self) -> int:
        return self.heads_q // self.heads_kv if self.heads_kv else 1


# ---------------------------------------------------------------------------
# the band: one definition, used by the reference, FLOP accounting and tests


def attended_pairs(len_q: int, len_k: int, window_left: int, window_right: int, offset: int) -> int:
    """Exact number of (query, key) pairs inside the band (the pairs :func:`band_mask` marks).

    Used for FLOP accounting: dense attention is ``len_q * len_k``; causal about half.
    """
    pos = torch.arange(len_q, dtype=torch.int64) + offset
    lo = torch.zeros_like(pos) if window_left < 0 else (pos - window_left).clamp(min=0)
    hi = torch.full_like(pos, len_k) if window_right < 0 else (pos + window_right + 1).clamp(max=len_k)
    return int((hi - lo).clamp(min=0).sum())


def band_mask(len_q: int, len_k: int, window_left: int, window_right: int, offset: int, device=None) -> torch.Tensor:
    """Boolean ``(L, S)`` tensor: True where key j is inside query i's band."""
    rows = torch.arange(len_q, device=device).unsqueeze(1) + offset
    cols = torch.arange(len_k, device=device).unsqueeze(0)
    allowed = torch.ones(len_q, len_k, dtype=torch.bool, device=device)
    if window_left >= 0:
        allowed &= cols >= rows - window_left
    if window_right >= 0:
        allowed &= cols <= rows + window_right
    return allowed


# ---------------------------------------------------------------------------
# argument checks


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _window_entry(x):
    """An int, or (as flash-attn accepts) a 0-d integer tensor, as a Python int; else x unchanged."""
    if isinstance(x, torch.Tensor) and x.dim() == 0 and not x.is_floating_point() and x.dtype != torch.bool:
        return int(x.item())
    return x


def normalize_window(window_size, is_causal: bool, name: str = "window_size") -> Tuple[int, int]:
    """Return ``(left, right)`` with -1 for unbounded and causality folded into ``right``.

    ``window_size`` is a pair of ints; flash-attn's callers may also pass a 1-D integer tensor
    of two elements or a pair of 0-d integer tensors. Sides larger than the sequences are
    clamped to unbounded by :func:`_finish`, which knows the lengths.
    """
    if window_size is None:
        left, right = -1, -1
    else:
        if isinstance(window_size, torch.Tensor) and window_size.dim() == 1:
            window_size = tuple(window_size.unbind())
        if isinstance(window_size, torch.Tensor) or not isinstance(window_size, Sequence) or isinstance(window_size, str):
            raise TypeError(f"{name} must be a pair of ints (left, right), got {type(window_size).__name__}")
        if len(window_size) != 2:
            raise ValueError(f"{name} must be a pair of ints (left, right), got {len(window_size)} values")
        left, right = (_window_entry(x) for x in window_size)
        if not (_is_int(left) and _is_int(right)):
            raise TypeError(f"{name} must be a pair of ints (left, right), got ({left!r}, {right!r})")
        left, right = int(left), int(right)
        if left < -1 or right < -1:
            raise ValueError(f"{name} entries must be >= -1 (-1 means unbounded), got ({left}, {right})")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal/causal must be a bool, got {type(is_causal).__name__}")
    if is_causal:
        right = 0
    return left, right


def check_dropout(dropout_p) -> float:
    """dropout_p in [0, 1]; 1.0 drops every weight (output 0, as torch), see dispatch.run."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a float in [0, 1], got {type(dropout_p).__name__}")
    p = float(dropout_p)
    if not (0.0 <= p <= 1.0):
        raise ValueError(f"dropout_p must be in [0, 1], got {p}")
    return p


def check_softcap(softcap) -> float:
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a float (0 for none), got {type(softcap).__name__}")
    cap = float(softcap)
    # comparisons, not math.isfinite: under torch.compile(dynamic=True) the float may be symbolic;
    # NaN fails both
    if not (0.0 <= cap < math.inf):
        raise ValueError(f"softcap must be a finite float >= 0 (0 for none), got {cap}")
    return cap


def check_sinks(sinks, heads_q: int, query: torch.Tensor, name: str = "sinks") -> Optional[torch.Tensor]:
    """``(Hq,)`` fp32 or query-dtype logits; returned as fp32 (differentiably: a Parameter gets its grad)."""
    if sinks is None:
        return None
    if not isinstance(sinks, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape ({heads_q},) or None, got {type(sinks).__name__}")
    if sinks.dtype not in (torch.float32, query.dtype):
        raise TypeError(f"{name} must be float32 or the query's dtype {query.dtype}, got {sinks.dtype}")
    if sinks.device != query.device:
        raise ValueError(f"{name} must be on the query's device {query.device}, got {sinks.device}")
    if tuple(sinks.shape) != (heads_q,):
        raise ValueError(f"{name} must have shape (num_query_heads,) = ({heads_q},), got {tuple(sinks.shape)}")
    return sinks.to(torch.float32).contiguous()


def check_alibi(alibi_slopes, batch: int, heads_q: int, query: torch.Tensor) -> Optional[torch.Tensor]:
    """``(Hq,)`` or ``(B, Hq)`` fp32 slopes; returned as a contiguous ``(B, Hq)`` fp32 tensor."""
    if alibi_slopes is None:
        return None
    if not isinstance(alibi_slopes, torch.Tensor):
        raise TypeError(f"alibi_slopes must be a torch.Tensor or None, got {type(alibi_slopes).__name__}")
    if alibi_slopes.dtype != torch.float32:
        raise TypeError(f"alibi_slopes must be float32, got {alibi_slopes.dtype}")
    if alibi_slopes.device != query.device:
        raise ValueError(f"alibi_slopes must be on the query's device {query.device}, got {alibi_slopes.device}")
    if tuple(alibi_slopes.shape) not in ((heads_q,), (batch, heads_q)):
        raise ValueError(
            f"alibi_slopes must have shape (num_heads,) = ({heads_q},) or (batch, num_heads) = ({batch}, {heads_q}), "
            f"got {tuple(alibi_slopes.shape)}"
        )
    if alibi_slopes.requires_grad and torch.is_grad_enabled():
        raise ValueError("alibi_slopes must not require grad: attnkern does not differentiate the ALiBi slopes")
    return alibi_slopes.expand(batch, heads_q).contiguous()


def with_modifiers(problem: Problem, query: torch.Tensor, softcap=0.0, sinks=None, alibi_slopes=None,
                   sinks_name: str = "sinks"):
    """Checks the score modifiers against a normalised ``problem``; returns ``(problem, sinks, alibi)``
    with ``sinks`` fp32 ``(Hq,)`` and ``alibi`` fp32 ``(B, Hq)`` (or None)."""
    cap = check_softcap(softcap)
    sinks = check_sinks(sinks, problem.heads_q, query, sinks_name)
    alibi = check_alibi(alibi_slopes, problem.batch, problem.heads_q, query)
    if cap == 0 and sinks is None and alibi is None:
        return problem, None, None
    problem = replace(problem, softcap=cap, has_sinks=sinks is not None, has_alibi=alibi is not None)
    return problem, sinks, alibi


def check_backend(backend) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def _check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {t.dtype}")


def _check_qkv_common(query, key, value):
    for t, name in ((query, "query"), (key, "key"), (value, "value")):
        _check_tensor(t, name)
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(
            f"query, key and value must share a dtype, got query {query.dtype}, key {key.dtype}, value {value.dtype}"
        )
    if not (query.device == key.device == value.device):
        raise ValueError(
            f"query, key and value must be on one device, got query {query.device}, key {key.device}, value {value.device}"
        )


def _check_scale(scale, head_dim: int) -> float:
    if scale is None:
        # head dim 0: every score is 0 whatever the scale (torch returns the mean of v)
        return 1.0 / math.sqrt(head_dim) if head_dim else 1.0
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


def _plain_tensor(t: torch.Tensor) -> bool:
    """False for tensor subclasses with their own ``__torch_function__`` (their data may not be the values)."""
    handler = type(t).__torch_function__
    return getattr(handler, "__func__", handler) in (
        torch.Tensor.__torch_function__.__func__, torch._C._disabled_torch_function_impl
    )


def broadcast_shapes(*shapes) -> Tuple:
    """``torch.broadcast_shapes``, in plain Python when every size is an int: torch's imports
    torch.fx's symbolic shapes and sympy on first use, about 0.35-0.8 s of every process's first
    attention call (cProfile, 2026-11-30). Under torch.compile, and for symbolic sizes, torch's
    (Dynamo traces it natively; Dynamo of torch 2.11 rejects this function's Python). Raises
    RuntimeError when the shapes do not broadcast, as torch's does."""
    if torch.compiler.is_compiling() or not all(type(n) is int for shape in shapes for n in shape):
        return tuple(torch.broadcast_shapes(*shapes))
    rank = max((len(shape) for shape in shapes), default=0)
    out = [1] * rank
    for shape in shapes:
        for i, n in enumerate(shape, rank - len(shape)):
            if n != 1 and out[i] not in (1, n):
                raise RuntimeError(f"shapes {[tuple(x) for x in shapes]} do not broadcast")
            out[i] = n if n != 1 else out[i]
    return tuple(out)


def is_causal_bias(attn_mask) -> bool:
    """Whether ``attn_mask`` is torch's ``CausalBias``. Such an object can only exist once
    ``torch.nn.attention.bias`` is imported, so the module is looked up, never imported: importing
    it pulls in torch._dynamo, which made every process's first attention call 1.1-1.8 s slower
    (cProfile of a first call, 2026-11-30)."""
    bias = sys.modules.get("torch.nn.attention.bias")
    return bias is not None and isinstance(attn_mask, bias.CausalBias)


def causal_bias_alignment(attn_mask) -> Optional[bool]:
    """For torch's ``CausalBias`` (``torch.nn.attention.bias.causal_upper_left/lower_right``):
    False for upper-left (torch's ``is_causal``), True for lower-right (bottom-right) alignment;
    None for anything else. Its tensor data is not the mask, so it must never be read as one."""
    if not is_causal_bias(attn_mask):
        return None
    return attn_mask.variant == sys.modules["torch.nn.attention.bias"].CausalVariant.LOWER_RIGHT


def _check_mask(attn_mask, query: torch.Tensor, len_k: int, batch_shape, heads_q: int):
    """Validate ``attn_mask`` and expand it to ``(B, Hq, L, S)`` without copying where possible."""
    if attn_mask is None:
        return None, None
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if not torch.compiler.is_compiling() and not _plain_tensor(attn_mask):
        raise TypeError(
            f"attn_mask of type {type(attn_mask).__name__}: tensor subclasses are not supported as masks "
            "(torch's CausalBias is: pass it as attn_mask to attnkern.scaled_dot_product_attention)"
        )
    if attn_mask.device != query.device:
        raise ValueError(f"attn_mask must be on the query's device {query.device}, got {attn_mask.device}")
    if attn_mask.dtype == torch.bool:
        kind = "bool"
    elif attn_mask.dtype in FLOAT_DTYPES:
        kind = "float"
    else:
        raise TypeError(f"attn_mask must be bool or floating, got {attn_mask.dtype}")
    if kind == "float" and attn_mask.dtype not in (query.dtype, torch.float32):
        # kernels read float masks in the query's dtype or in float32; convert before
        # expanding so a broadcast mask is not materialised
        attn_mask = attn_mask.to(torch.float32)
    len_q = query.shape[-2]
    target = tuple(query.shape[:-1]) + (len_k,)
    try:
        expanded = attn_mask.expand(broadcast_shapes(attn_mask.shape, target))
    except RuntimeError:
        expanded = None
    if expanded is None or tuple(expanded.shape) != target:
        raise ValueError(
            f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to (..., L, S) = {target}"
        )
    batch = math.prod(batch_shape)
    mask4 = expanded.reshape(batch, heads_q, len_q, len_k)  # a view unless leading dims cannot merge
    return mask4, kind


def _expand(t: torch.Tensor, shape: Tuple) -> torch.Tensor:
    return t if tuple(t.shape) == shape else t.expand(shape)


def normalize_torch_layout(
    query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, window_size, bottom_right=False
):
    """Checks for the torch layout ``(..., H, L, E)`` (3-D inputs are ``(N, L, E)``).

    Returns ``(q, k, v, mask, problem, out_shape)``; ``out_shape`` restores the caller's leading dims.
    """
    _check_qkv_common(query, key, value)
    for t, name in ((query, "query"), (key, "key"), (value, "value")):
        if t.dim() < 2:
            raise ValueError(f"{name} must have at least 2 dimensions (..., L, E), got shape {tuple(t.shape)}")
    if not isinstance(enable_gqa, bool):
        raise TypeError(f"enable_gqa must be a bool, got {type(enable_gqa).__name__}")
    # Leading dims broadcast as in torch (whose math is batched matmuls): inputs of fewer
    # dims gain leading 1s, and size-1 dims expand (views, no copies). The heads dim (-3)
    # broadcasts too; key/value with one head against many query heads is GQA with one group.
    out_rank = max(query.dim(), key.dim(), value.dim())
    rank = max(3, out_rank)
    # (no-op reshapes and expands are skipped: a decoding-sized call spends its time here)
    query, key, value = (t if t.dim() == rank else t.reshape((1,) * (rank - t.dim()) + tuple(t.shape))
                         for t in (query, key, value))
    heads_q, len_q, head_dim = query.shape[-3:]
    heads_kv, len_k, head_dim_k = key.shape[-3:]
    if head_dim_k != head_dim:
        raise ValueError(f"key head dim {head_dim_k} does not match query head dim {head_dim}")
    if value.shape[-2] != len_k:
        raise ValueError(f"value length {value.shape[-2]} does not match key length {len_k} (dim -2)")
    if value.shape[-3] != heads_kv:
        if enable_gqa or 1 not in (heads_kv, value.shape[-3]):
            raise ValueError(f"value heads {value.shape[-3]} do not match key heads {heads_kv} (dim -3)")
        heads_kv = max(heads_kv, value.shape[-3])
    if heads_kv != heads_q:
        if enable_gqa:
            if heads_kv == 0 or heads_q % heads_kv != 0:
                raise ValueError(f"query heads {heads_q} must be a multiple of key/value heads {heads_kv} for GQA")
        elif heads_q == 1:
            heads_q = heads_kv  # one query head against many key/value heads
        elif heads_kv != 1:
            raise ValueError(
                f"query has {heads_q} heads but key/value have {heads_kv} (dim -3); pass enable_gqa=True for GQA"
            )
    try:
        batch_shape = broadcast_shapes(query.shape[:-3], key.shape[:-3], value.shape[:-3])
    except RuntimeError:
        raise ValueError(
            f"batch dims do not broadcast: query {tuple(query.shape[:-3])}, key {tuple(key.shape[:-3])}, "
            f"value {tuple(value.shape[:-3])}"
        ) from None
    query, key, value = (_expand(t, batch_shape + shape) for t, shape in (
        (query, (heads_q, len_q, head_dim)), (key, (heads_kv, len_k, head_dim)),
        (value, (heads_kv, len_k, value.shape[-1]))))
    q, k, v, mask, problem, out_shape = _finish(
        query, key, value, attn_mask, dropout_p, is_causal, scale, window_size, bottom_right, batch_shape
    )
    return q, k, v, mask, problem, out_shape[len(out_shape) - out_rank:]


def normalize_flash_layout(q, k, v, dropout_p, softmax_scale, causal, window_size):
    """Checks for flash-attn's layout ``(B, L, H, D)``; returns canonical views (no copies)."""
    _check_qkv_common(q, k, v)
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, seqlen, heads, headdim), got shape {tuple(t.shape)}")
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        raise ValueError(f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"k head dim {k.shape[3]} does not match q head dim {q.shape[3]}")
    if v.shape[1] != k.shape[1]:
        raise ValueError(f"v seqlen {v.shape[1]} does not match k seqlen {k.shape[1]}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"v heads {v.shape[2]} do not match k heads {k.shape[2]}")
    if (q.shape[2] % k.shape[2] != 0) if k.shape[2] else q.shape[2] != 0:
        raise ValueError(f"q heads {q.shape[2]} must be a multiple of k/v heads {k.shape[2]}")
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    return _finish(qt, kt, vt, None, dropout_p, causal, softmax_scale, window_size, True, (q.shape[0],))


def _finish(query, key, value, attn_mask, dropout_p, is_causal, scale, window_size, bottom_right, batch_shape):
    heads_q, len_q, head_dim = query.shape[-3:]
    heads_kv, len_k = key.shape[-3], key.shape[-2]
    head_dim_v = value.shape[-1]
    left, right = normalize_window(window_size, is_causal)
    # a side of L + S or more reaches past every key of every row (any alignment): unbounded
    left, right = (-1 if w >= len_q + len_k else w for w in (left, right))
    p = check_dropout(dropout_p)
    scale = _check_scale(scale, head_dim)
    batch = math.prod(batch_shape)
    q, k, v = (t if t.dim() == 4 else t.reshape(batch, *t.shape[-3:]) for t in (query, key, value))
    mask, mask_kind = _check_mask(attn_mask, query, len_k, batch_shape, heads_q)
    problem = Problem(
        batch=batch,
        heads_q=heads_q,
        heads_kv=heads_kv,
        len_q=len_q,
        len_k=len_k,
        head_dim=head_dim,
        head_dim_v=head_dim_v,
        scale=scale,
        window_left=left,
        window_right=right,
        bottom_right=bottom_right,
        dropout_p=p,
        mask_kind=mask_kind,
        dtype=query.dtype,
        device_type=query.device.type,
    )
    out_shape = tuple(batch_shape) + (heads_q, len_q, head_dim_v)
    return q, k, v, mask, problem, out_shape


def check_top_k(top_k) -> int:
    """``top_k`` of top-k attention: a Python int >= 1."""
    if not _is_int(top_k):
        raise TypeError(f"top_k must be an int >= 1, got {type(top_k).__name__}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    return int(top_k)


def topk_slots(top_k: int, len_k: int) -> int:
    """Keys a row of top-k attention can keep: the last dim of the returned indices."""
    return min(top_k, len_k)
