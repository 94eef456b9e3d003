"""Top-k attention: each query attends only to its ``top_k`` highest-scoring keys.

The semantics are written once in :mod:`attnkern._semantics` ("Top-k selection") and in
:func:`attnkern.reference.topk_attention`. The fused kernels are the ops
``attnkern::topk_fwd`` / ``attnkern::topk_bwd`` (CPU, csrc/cpu/topk.cpp) and
``attnkern::triton_topk_fwd`` / ``triton_topk_bwd`` (attnkern/triton/topk.py); this module
defines the Triton pair and registers both pairs' fake kernels and autograd, and
:func:`topk_attention` picks a backend through :func:`attnkern.dispatch.choose_topk`.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from . import dispatch, ops, reference
from ._semantics import check_backend, check_top_k, normalize_torch_layout, topk_slots

# ---------------------------------------------------------------------------------------
# the ops: attnkern::topk_fwd / topk_bwd (CPU kernel; schemas defined in csrc/cpu/topk.cpp) and
# attnkern::triton_topk_fwd / triton_topk_bwd (attnkern/triton/topk.py) share one signature, one
# fake kernel and one autograd formula

TOPK_FWD_ARGS = (
    "(Tensor q, Tensor k, Tensor v, Tensor? mask, int top_k, float scale, int window_left, int window_right, "
    "bool bottom_right) -> (Tensor out, Tensor lse, Tensor indices)"
)
TOPK_BWD_ARGS = (
    "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor lse, Tensor indices, Tensor? mask, float scale, "
    "int window_left, int window_right, bool bottom_right, bool mask_needs_grad) -> (Tensor grad_q, Tensor grad_k, "
    "Tensor grad_v, Tensor grad_mask)"
)


def _fake_topk_fwd(q, k, v, mask, top_k, scale, window_left, window_right, bottom_right):
    b, h, rows = q.shape[0], q.shape[1], q.shape[2]
    out = q.new_empty((b, h, rows, v.shape[3]))
    lse = q.new_empty((b, h, rows), dtype=torch.float32)
    indices = q.new_empty((b, h, rows, torch.sym_min(top_k, k.shape[2])), dtype=torch.int64)
    return out, lse, indices


def _fake_topk_bwd(grad_out, q, k, v, lse, indices, mask, scale, window_left, window_right, bottom_right,
                   mask_needs_grad):
    dmask_shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2]) if mask_needs_grad else (0,)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            q.new_empty(dmask_shape, dtype=torch.float32))


def _topk_setup_context(ctx, inputs, output):
    q, k, v, mask, top_k, scale, window_left, window_right, bottom_right = inputs
    _, lse, indices = output
    ctx.save_for_backward(q, k, v, lse, indices, mask)
    ctx.semantics = (scale, window_left, window_right, bottom_right)
    ctx.mask_needs_grad = bool(mask is not None and mask.is_floating_point() and ctx.needs_input_grad[3])
    ctx.mark_non_differentiable(lse, indices)


def _make_topk_backward(bwd_op):
    def backward(ctx, grad_out, grad_lse, grad_indices):
        # lse and indices are non-differentiable outputs: the backward reuses the forward's indices
        q, k, v, lse, indices, mask = ctx.saved_tensors
        dq, dk, dv, dmask = bwd_op(grad_out, q, k, v, lse, indices, mask, *ctx.semantics, ctx.mask_needs_grad)
        grad_mask = dmask.to(mask.dtype) if ctx.mask_needs_grad else None
        return dq, dk, dv, grad_mask, None, None, None, None, None

    return backward


def _register_topk_pair(fwd_name: str, bwd_name: str):
    fwd = getattr(torch.ops.attnkern, fwd_name).default
    torch.library.register_fake(f"attnkern::{fwd_name}")(_fake_topk_fwd)
    torch.library.register_fake(f"attnkern::{bwd_name}")(_fake_topk_bwd)
    torch.library.register_autograd(f"attnkern::{fwd_name}", _make_topk_backward(getattr(torch.ops.attnkern,
                                                                                         bwd_name).default),
                                    setup_context=_topk_setup_context)
    torch.library.register_autograd(f"attnkern::{bwd_name}", ops._no_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)
    return fwd


_triton_topk_lib = torch.library.Library("attnkern", "FRAGMENT")
_triton_topk_lib.define("triton_topk_fwd" + TOPK_FWD_ARGS)
_triton_topk_lib.define("triton_topk_bwd" + TOPK_BWD_ARGS)


def _triton_topk_fwd_impl(*args):
    from .triton import topk  # the kernels: imported on the first launch (see attnkern/triton/launch.py)

    return topk.forward(*args)


def _triton_topk_bwd_impl(*args):
    from .triton import topk

    return topk.backward(*args)


for _key in ("CPU", "CUDA"):  # CPU tensors run under TRITON_INTERPRET=1
    _triton_topk_lib.impl("triton_topk_fwd", _triton_topk_fwd_impl, _key)
    _triton_topk_lib.impl("triton_topk_bwd", _triton_topk_bwd_impl, _key)

topk_fwd = None
if ops._C is not None:
    topk_fwd = _register_topk_pair("topk_fwd", "topk_bwd")
triton_topk_fwd = _register_topk_pair("triton_topk_fwd", "triton_topk_bwd")


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
    Memory: O(L * top_k) beyond inputs and outputs on the fused kernels (CPU, Triton: ``min(top_k, S) <= 256``).
    """
    backend = check_backend(backend)
    top_k = check_top_k(top_k)
    if not isinstance(return_indices, bool):
        raise TypeError(f"return_indices must be a bool, got {type(return_indices).__name__}")
    q, k, v, mask, problem, out_shape = normalize_torch_layout(
        query, key, value, attn_mask, 0.0, is_causal, scale, enable_gqa, window_size
    )
    slots = topk_slots(top_k, problem.len_k)
    name = dispatch.choose_topk(problem, backend, slots, return_indices)
    indices = None
    if name == "math":
        out, indices = _math(q, k, v, mask, top_k, problem)
    elif slots > dispatch.TOPK_MAX_SLOTS:  # top_k >= S: dense attention (choose_topk checked)
        out, _ = dispatch.run(problem, q, k, v, mask, name)
    else:
        op = triton_topk_fwd if name == "triton" else topk_fwd
        # the op takes min(top_k, S) (at least 1, which it requires), the same selection: a Python
        # int past int64 fits no schema int
        out, _, indices = op(
            q, k, v, mask, max(slots, 1), problem.scale, problem.window_left, problem.window_right, problem.bottom_right
        )
    out = out.reshape(out_shape)
    if return_indices:
        return out, indices.reshape(out_shape[:-1] + (slots,))
    return out
