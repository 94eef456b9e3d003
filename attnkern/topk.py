"""Top-k attention: each query attends only to its ``top_k`` highest-scoring keys.

The semantics are written once in :mod:`attnkern._semantics` ("Top-k selection") and in
:func:`attnkern.reference.topk_attention`. The fused CPU kernel is the op
``attnkern::topk_fwd`` / ``attnkern::topk_bwd`` (csrc/cpu/topk.cpp); this module registers
its fake kernels and autograd, and :func:`topk_attention` picks a backend through
:func:`attnkern.dispatch.choose_topk`.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from . import dispatch, ops, reference
from ._semantics import check_backend, check_top_k, normalize_torch_layout, topk_slots

# ---------------------------------------------------------------------------------------
# the op: fake kernels and autograd (the schemas are defined in csrc/cpu/topk.cpp)


def _fake_topk_fwd(q, k, v, mask, top_k, scale, window_left, window_right, bottom_right):
    b, h, rows = q.shape[0], q.shape[1], q.shape[2]
    out = q.new_empty((b, h, rows, v.shape[3]))
    lse = q.new_empty((b, h, rows), dtype=torch.float32)
    indices = q.new_empty((b, h, rows, torch.sym_min(top_k, k.shape[2])), dtype=torch.int64)
    return out, lse, indices


def _fake_topk_bwd(grad_out, q, k, v, lse, indices, mask, scale, window_left, window_right, bottom_right):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _topk_setup_context(ctx, inputs, output):
    q, k, v, mask, top_k, scale, window_left, window_right, bottom_right = inputs
    _, lse, indices = output
    ctx.save_for_backward(q, k, v, lse, indices, mask)
    ctx.semantics = (scale, window_left, window_right, bottom_right)
    ctx.mark_non_differentiable(lse, indices)


def _topk_backward(ctx, grad_out, grad_lse, grad_indices):
    # lse and indices are non-differentiable outputs; the mask gets no gradient
    # (dispatch.topk_why_not sends a mask that needs one to the math backend)
    q, k, v, lse, indices, mask = ctx.saved_tensors
    dq, dk, dv = torch.ops.attnkern.topk_bwd(grad_out, q, k, v, lse, indices, mask, *ctx.semantics)
    return dq, dk, dv, None, None, None, None, None, None


topk_fwd = None
if ops._C is not None:
    torch.library.register_fake("attnkern::topk_fwd")(_fake_topk_fwd)
    torch.library.register_fake("attnkern::topk_bwd")(_fake_topk_bwd)
    torch.library.register_autograd("attnkern::topk_fwd", _topk_backward, setup_context=_topk_setup_context)
    topk_fwd = torch.ops.attnkern.topk_fwd.default


def _math(q, k, v, mask, top_k, problem):
    dtype = q.dtype
    compute = torch.float32 if dtype in dispatch.HALF_DTYPES else dtype
    out, _, indices = reference.topk_attention(
        q.to(compute), k.to(compute), v.to(compute),
        mask if mask is None or mask.dtype == torch.bool else mask.to(compute),
        top_k, problem.scale, problem.window_left, problem.window_right, problem.bottom_right,
    )
    return out.to(dtype), indices


# ---------------------------------------------------------------------------------------
# the public function


def topk_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    top_k: int,
    *,
    is_causal: bool = False,
    window_size: Optional[Tuple[int, int]] = None,
    attn_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    return_indices: bool = False,
    backend: str = "auto",
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Top-k attention in torch's layout ``(..., H, L, E)``: each query attends only to the
    ``top_k`` keys with the highest scores among those it may see (``is_causal``,
    ``window_size`` and ``attn_mask`` exactly as in :func:`attnkern.scaled_dot_product_attention`),
    with a softmax over those scores. Ties go to the lower key index; ``top_k >= S`` is dense
    attention; ``top_k=1`` is hard attention.

    With ``return_indices=True`` returns ``(out, indices)``, indices int64 of shape
    ``(..., H, L, min(top_k, S))`` in selection order (score descending), -1 in empty slots.
    Gradients flow through the softmax over the selected keys; the selection has none.
    Memory: O(L * top_k) beyond inputs and outputs on the CPU kernel (``min(top_k, S) <= 256``).
    """
    backend = check_backend(backend)
    top_k = check_top_k(top_k)
    if not isinstance(return_indices, bool):
        raise TypeError(f"return_indices must be a bool, got {type(return_indices).__name__}")
    q, k, v, mask, problem, out_shape = normalize_torch_layout(
        query, key, value, attn_mask, 0.0, is_causal, scale, enable_gqa, window_size
    )
    slots = topk_slots(top_k, problem.len_k)
    mask_needs_grad = mask is not None and mask.is_floating_point() and mask.requires_grad
    name = dispatch.choose_topk(problem, backend, slots, return_indices, mask_needs_grad)
    indices = None
    if name == "math":
        out, indices = _math(q, k, v, mask, top_k, problem)
    elif slots > dispatch.TOPK_CPU_MAX_SLOTS:  # top_k >= S: dense attention (choose_topk checked)
        out, _ = dispatch.run(problem, q, k, v, mask, name)
    else:
        out, _, indices = topk_fwd(
            q, k, v, mask, top_k, problem.scale, problem.window_left, problem.window_right, problem.bottom_right
        )
    out = out.reshape(out_shape)
    if return_indices:
        return out, indices.reshape(out_shape[:-1] + (slots,))
    return out
