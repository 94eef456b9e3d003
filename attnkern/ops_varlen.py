"""torch.library registration of the packed ops ``attnkern::varlen_fwd`` / ``varlen_bwd``.

The schemas and CPU kernels are in csrc/bindings_varlen.cpp. Here: the fake kernels (shapes
and strides as the C++ kernels produce them: contiguous out (total_q, Hq, Ev), lse (Hq, total_q)
fp32, gradients shaped like their inputs) and the autograd formula, so torch.compile traces
the packed calls like the dense ones. Paged calls (block_table) have no backward. The score
modifiers trail as in the dense op; the backward takes no sinks (the saved lse holds them) and
the sinks' gradient is the dense op's reduction (:func:`attnkern.ops.sink_grad`).
"""

from __future__ import annotations

from typing import Optional

import torch

from .ops import _C, sink_grad

NO_PAGED_BACKWARD = (
    "attnkern: paged K/V (block_table) and flash_attn_with_kvcache calls have no backward; "
    "run the packed call with k/v packed by cu_seqlens_k to train"
)


SINKS_INPUT = 11  # position of `sinks` in varlen_fwd's schema


def _fake_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, block_table, scale, window_left, window_right,
              softcap=0.0, sinks=None, alibi_slopes=None):
    out = q.new_empty((q.shape[0], q.shape[1], v.shape[-1]))
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    return out, lse


def _fake_bwd(grad_out, grad_lse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k, scale, window_left,
              window_right, softcap=0.0, alibi_slopes=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, block_table, scale, window_left, window_right = inputs[:10]
    softcap, sinks, alibi_slopes = inputs[10:13] if len(inputs) > 10 else (0.0, None, None)
    out, lse = output
    ctx.paged = block_table is not None
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k, sinks, alibi_slopes)
    ctx.semantics = (scale, window_left, window_right, softcap)


def _backward(ctx, grad_out, grad_lse):
    if ctx.paged:
        raise NotImplementedError(NO_PAGED_BACKWARD)
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k, sinks, alibi_slopes = ctx.saved_tensors
    dq, dk, dv = torch.ops.attnkern.varlen_bwd(
        grad_out, grad_lse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k, *ctx.semantics, alibi_slopes
    )
    grad_sinks = None
    if sinks is not None and ctx.needs_input_grad[SINKS_INPUT]:
        # rows past cu_seqlens_q[-1] keep lse -inf (no sequence, no sink): +inf gives them weight 0
        lse_rows = lse.masked_fill(lse == float("-inf"), float("inf"))
        grad_sinks = sink_grad(grad_out.transpose(0, 1)[None], None if grad_lse is None else grad_lse[None],
                               out.transpose(0, 1)[None], lse_rows[None], sinks)
    return dq, dk, dv, None, None, None, None, None, None, None, None, grad_sinks, None


varlen_fwd: Optional[object] = None
varlen_bwd: Optional[object] = None
if _C is not None and hasattr(torch.ops.attnkern, "varlen_fwd"):
    varlen_fwd = torch.ops.attnkern.varlen_fwd.default
    varlen_bwd = torch.ops.attnkern.varlen_bwd.default
    torch.library.register_fake("attnkern::varlen_fwd")(_fake_fwd)
    torch.library.register_fake("attnkern::varlen_bwd")(_fake_bwd)
    torch.library.register_autograd("attnkern::varlen_fwd", _backward, setup_context=_setup_context)
