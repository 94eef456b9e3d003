"""torch.library ops: schemas, fake (meta) kernels and autograd, for every fused backend.

* ``attnkern::fwd`` / ``attnkern::bwd`` are defined in C++ (csrc/bindings.cpp) with CPU
  kernels, and CUDA kernels when the CUDA extension is built.
* ``attnkern::triton_fwd`` / ``attnkern::triton_bwd`` have the same signatures and are
  implemented in Python by the Triton launchers (attnkern/triton/).

Both pairs share one fake implementation and one autograd formula, so every backend
traces through ``torch.compile(fullgraph=True)`` the same way.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch

FWD_ARGS = (
    "(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? rng_seed, float scale, int window_left, "
    "int window_right, bool bottom_right, float dropout_p, float softcap=0., Tensor? sinks=None, "
    "Tensor? alibi_slopes=None) -> (Tensor out, Tensor lse)"
)
# no sinks: the saved lse holds them, and their gradient is taken here (sink_grad)
BWD_ARGS = (
    "(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? mask, "
    "Tensor? rng_seed, float scale, int window_left, int window_right, bool bottom_right, float dropout_p, "
    "bool mask_needs_grad, float softcap=0., Tensor? alibi_slopes=None) -> (Tensor grad_q, Tensor grad_k, "
    "Tensor grad_v, Tensor grad_mask)"
)


def _load_extension(name: str):
    try:
        return importlib.import_module(name), None
    except ImportError as exc:  # not built, or built against another torch
        return None, f"{name} could not be imported: {exc}"


_C, C_IMPORT_ERROR = _load_extension("attnkern._C")
_C_cuda, CUDA_IMPORT_ERROR = (None, "attnkern._C_cuda not loaded")
if _C is not None:
    _C_cuda, CUDA_IMPORT_ERROR = _load_extension("attnkern._C_cuda")


# ---------------------------------------------------------------------------------------
# fake kernels: shapes, dtypes and strides exactly as the real kernels produce them


def empty_rows_like(like: torch.Tensor, last: int, dtype: torch.dtype) -> torch.Tensor:
    """Same rule as csrc/torch_params.h: keep a (B, rows, H, D) memory order if ``like`` has one."""
    b, h, rows = like.shape[0], like.shape[1], like.shape[2]
    if like.stride(1) < like.stride(2):
        return like.new_empty((b, rows, h, last), dtype=dtype).transpose(1, 2)
    return like.new_empty((b, h, rows, last), dtype=dtype)


def _check_devices(q: torch.Tensor, **tensors) -> None:
    """Every tensor argument on the query's device. The fake kernels run for real whenever one
    argument is a meta tensor (Meta outranks CPU in dispatch), and would hand back empty CPU
    memory for a call no real kernel accepts."""
    for name, t in tensors.items():
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} must be on the query's device {q.device}, got {t.device}")


def _fake_fwd(q, k, v, mask, rng_seed, scale, window_left, window_right, bottom_right, dropout_p, softcap=0.0,
              sinks=None, alibi_slopes=None):
    _check_devices(q, key=k, value=v, attn_mask=mask, sinks=sinks, alibi_slopes=alibi_slopes)
    out = empty_rows_like(q, v.shape[3], q.dtype)
    lse = q.new_empty((q.shape[0], q.shape[1], q.shape[2]), dtype=torch.float32)
    return out, lse


def _fake_bwd(grad_out, grad_lse, q, k, v, out, lse, mask, rng_seed, scale, window_left, window_right,
              bottom_right, dropout_p, mask_needs_grad, softcap=0.0, alibi_slopes=None):
    _check_devices(q, grad_out=grad_out, grad_lse=grad_lse, key=k, value=v, out=out, lse=lse, attn_mask=mask,
                   alibi_slopes=alibi_slopes)
    dq = empty_rows_like(q, q.shape[3], q.dtype)
    dk = empty_rows_like(k, k.shape[3], q.dtype)
    dv = empty_rows_like(v, v.shape[3], q.dtype)
    if mask_needs_grad:
        dmask = q.new_empty((q.shape[0], q.shape[1], q.shape[2], k.shape[2]), dtype=torch.float32)
    else:
        dmask = q.new_empty((0,), dtype=torch.float32)
    return dq, dk, dv, dmask


# ---------------------------------------------------------------------------------------
# autograd: one formula for every backend pair


SINKS_INPUT = 11  # position of `sinks` in FWD_ARGS


def sink_grad(grad_out, grad_lse, out, lse, sinks):
    """d sink_h = -sum_{b,i} exp(sink_h - lse_bhi) * (rowsum(dO * O)_bhi - dLSE_bhi).

    The sink's softmax weight is exp(sink - lse); raising the sink scales every key's weight by
    (1 - that), so O shrinks by it and lse grows by it. A plain tensor reduction: deterministic."""
    delta = (grad_out.float() * out.float()).sum(-1)
    if grad_lse is not None:
        delta = delta - grad_lse.float()
    sink = sinks.float().view(1, -1, 1)
    # a -inf sink has no weight, also in rows without keys, whose lse is -inf too (exp(-inf - -inf) is NaN)
    weight = torch.where(sink == float("-inf"), 0.0, torch.exp(sink - lse))
    return -(weight * delta).sum(dim=(0, 2)).to(sinks.dtype)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, rng_seed, scale, window_left, window_right, bottom_right, dropout_p = inputs[:10]
    softcap, sinks, alibi_slopes = inputs[10:13] if len(inputs) > 10 else (0.0, None, None)
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, rng_seed, sinks, alibi_slopes)
    ctx.semantics = (scale, window_left, window_right, bottom_right, dropout_p)
    ctx.softcap = softcap
    ctx.mask_needs_grad = bool(mask is not None and mask.is_floating_point() and ctx.needs_input_grad[3])


def _make_backward(bwd_op):
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, mask, rng_seed, sinks, alibi_slopes = ctx.saved_tensors
        dq, dk, dv, dmask = bwd_op(
            grad_out, grad_lse, q, k, v, out, lse, mask, rng_seed, *ctx.semantics, ctx.mask_needs_grad,
            ctx.softcap, alibi_slopes,
        )
        grad_mask = dmask.to(mask.dtype) if ctx.mask_needs_grad else None
        grad_sinks = None
        if sinks is not None and ctx.needs_input_grad[SINKS_INPUT]:
            grad_sinks = sink_grad(grad_out, grad_lse, out, lse, sinks)
        return dq, dk, dv, grad_mask, None, None, None, None, None, None, None, grad_sinks, None

    return backward


def _no_double_backward(ctx, *grads):
    raise NotImplementedError(
        "attnkern's fused backward is not differentiable (no double backward / gradients of gradients); "
        "use backend='math' for higher-order gradients"
    )


def register_pair(fwd_name: str, bwd_name: str, fake_fwd=_fake_fwd, fake_bwd=_fake_bwd,
                  make_backward=_make_backward, setup_context=_setup_context):
    """Fake kernels and autograd of a forward/backward op pair (the dense ones by default; the
    packed ops pass theirs, attnkern/ops_varlen.py)."""
    fwd = getattr(torch.ops.attnkern, fwd_name).default
    bwd = getattr(torch.ops.attnkern, bwd_name).default
    torch.library.register_fake(f"attnkern::{fwd_name}")(fake_fwd)
    torch.library.register_fake(f"attnkern::{bwd_name}")(fake_bwd)
    torch.library.register_autograd(f"attnkern::{fwd_name}", make_backward(bwd), setup_context=setup_context)
    # the backward op's own autograd: without it torch would only warn and return zeros
    torch.library.register_autograd(
        f"attnkern::{bwd_name}", _no_double_backward, setup_context=lambda ctx, inputs, output: None
    )
    return fwd, bwd


# ---------------------------------------------------------------------------------------
# the dropout seed: an op of its own, so torch.compile calls it as eager does (a plain
# torch.randint would be replaced by Inductor's own RNG and draw other masks than eager for the
# same torch.manual_seed). Tagged nondeterministic_seeded so no graph pass merges two calls.


@torch.library.custom_op("attnkern::rng_seed", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def rng_seed() -> torch.Tensor:
    """A fresh 64-bit dropout seed drawn from torch's default CPU generator, shape (1,) int64."""
    return torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64)


@rng_seed.register_fake
def _fake_rng_seed() -> torch.Tensor:
    return torch.empty((1,), dtype=torch.int64)


# ---------------------------------------------------------------------------------------
# the Triton pair: same schema, Python implementation

_triton_lib = torch.library.Library("attnkern", "FRAGMENT")


def define_triton_pair(fwd_name: str, fwd_args: str, bwd_name: str, bwd_args: str, launcher: str) -> None:
    """Define ``attnkern::<fwd_name>`` / ``<bwd_name>`` implemented by ``attnkern.triton.<launcher>``'s
    ``forward`` / ``backward``, imported on the first call (importing it fixes whether Triton
    compiles or interprets). CPU tensors run under TRITON_INTERPRET=1."""
    _triton_lib.define(fwd_name + fwd_args)
    _triton_lib.define(bwd_name + bwd_args)

    def implementation(function: str):
        def run(*args):
            return getattr(importlib.import_module(f"attnkern.triton.{launcher}"), function)(*args)

        return run

    for key in ("CPU", "CUDA"):
        _triton_lib.impl(fwd_name, implementation("forward"), key)
        _triton_lib.impl(bwd_name, implementation("backward"), key)


define_triton_pair("triton_fwd", FWD_ARGS, "triton_bwd", BWD_ARGS, "launch")

native_fwd: Optional[object] = None
native_bwd: Optional[object] = None
if _C is not None:
    native_fwd, native_bwd = register_pair("fwd", "bwd")
triton_fwd, triton_bwd = register_pair("triton_fwd", "triton_bwd")


def native_schema_matches_triton() -> bool:
    """True if the C++ schemas and the Triton schemas agree (they must: one op signature)."""
    if _C is None:
        return True
    a = str(torch.ops.attnkern.fwd.default._schema).split("(", 1)[1]
    b = str(torch.ops.attnkern.triton_fwd.default._schema).split("(", 1)[1]
    c = str(torch.ops.attnkern.bwd.default._schema).split("(", 1)[1]
    d = str(torch.ops.attnkern.triton_bwd.default._schema).split("(", 1)[1]
    return a == b and c == d
