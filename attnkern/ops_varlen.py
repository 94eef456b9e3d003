"""torch.library registration of the packed ops ``attnkern::varlen_fwd`` / ``varlen_bwd`` and their
Triton twins ``attnkern::triton_varlen_fwd`` / ``triton_varlen_bwd`` (same schemas).

The C++ schemas and CPU kernels are in csrc/bindings_varlen.cpp; the Triton pair is defined here
and launched by attnkern/triton/launch_varlen.py. Both pairs share the fake kernels (shapes
and strides as the C++ kernels produce them: contiguous out (total_q, Hq, Ev), lse (Hq, total_q)
fp32, gradients shaped like their inputs) and the autograd formula, so torch.compile traces
the packed calls like the dense ones. Paged calls (block_table) have no backward. The score
modifiers trail as in the dense op; the backward takes no sinks (the saved lse holds them) and
the sinks' gradient is the dense op's reduction (:func:`attnkern.ops.sink_grad`).
"""

from __future__ import annotations

from typing import Optional

import torch

from .ops import _C, define_triton_pair, register_pair, sink_grad

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


def _make_backward(bwd_op):
    def backward(ctx, grad_out, grad_lse):
        if ctx.paged:
            raise NotImplementedError(NO_PAGED_BACKWARD)
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k, sinks, alibi_slopes = ctx.saved_tensors
        dq, dk, dv = bwd_op(
            grad_out, grad_lse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k, *ctx.semantics,
            alibi_slopes
        )
        grad_sinks = None
        if sinks is not None and ctx.needs_input_grad[SINKS_INPUT]:
            # rows past cu_seqlens_q[-1] keep lse -inf (no sequence, no sink): +inf gives them weight 0
            lse_rows = lse.masked_fill(lse == float("-inf"), float("inf"))
            grad_sinks = sink_grad(grad_out.transpose(0, 1)[None], None if grad_lse is None else grad_lse[None],
                                   out.transpose(0, 1)[None], lse_rows[None], sinks)
        return dq, dk, dv, None, None, None, None, None, None, None, None, grad_sinks, None

    return backward


def _register_pair(fwd_name: str, bwd_name: str):
    return register_pair(fwd_name, bwd_name, _fake_fwd, _fake_bwd, _make_backward, _setup_context)


varlen_fwd: Optional[object] = None
varlen_bwd: Optional[object] = None
if _C is not None and hasattr(torch.ops.attnkern, "varlen_fwd"):
    varlen_fwd, varlen_bwd = _register_pair("varlen_fwd", "varlen_bwd")


# the Triton pair: csrc/bindings_varlen.cpp's schemas, Python implementations (CPU tensors run
# under TRITON_INTERPRET=1)
VARLEN_FWD_ARGS = (
    "(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, Tensor? seqused_k, "
    "Tensor? block_table, float scale, int window_left, int window_right, float softcap=0., Tensor? sinks=None, "
    "Tensor? alibi_slopes=None) -> (Tensor out, Tensor lse)"
)
VARLEN_BWD_ARGS = (
    "(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
    "Tensor cu_seqlens_q, Tensor cu_seqlens_k, Tensor? seqused_k, float scale, int window_left, "
    "int window_right, float softcap=0., Tensor? alibi_slopes=None) -> (Tensor grad_q, Tensor grad_k, "
    "Tensor grad_v)"
)
define_triton_pair("triton_varlen_fwd", VARLEN_FWD_ARGS, "triton_varlen_bwd", VARLEN_BWD_ARGS, "launch_varlen")
triton_varlen_fwd, triton_varlen_bwd = _register_pair("triton_varlen_fwd", "triton_varlen_bwd")


def schemas_match() -> bool:
    """True if the C++ packed schemas and the Triton ones agree (they must: one op signature)."""
    if varlen_fwd is None:
        return True
    return all(str(getattr(torch.ops.attnkern, a).default._schema).split("(", 1)[1]
               == str(getattr(torch.ops.attnkern, "triton_" + a).default._schema).split("(", 1)[1]
               for a in ("varlen_fwd", "varlen_bwd"))
