"""torch.library contract: opcheck on every op, and torch.compile(fullgraph=True) without graph breaks."""

from __future__ import annotations

import pytest
import torch

import attnkern
from attnkern import ops
from conftest import TOLERANCE, rel_err

pytestmark = pytest.mark.skipif(ops.native_fwd is None, reason="C++ extension not built")


def _inputs(dtype=torch.float32, transposed=False, mask=None, gqa=False, requires_grad=True):
    B, Hq, L, S, E, Ev = 2, 4, 37, 45, 24, 16
    Hkv = 2 if gqa else Hq
    q, k, v = torch.randn(B, Hq, L, E, dtype=dtype), torch.randn(B, Hkv, S, E, dtype=dtype), torch.randn(
        B, Hkv, S, Ev, dtype=dtype)
    if transposed:
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    m = None
    if mask == "bool":
        m = (torch.rand(1, 1, L, S) > 0.3).expand(B, Hq, L, S)
    elif mask == "float":
        m = torch.randn(B, 1, L, S, dtype=dtype).expand(B, Hq, L, S).requires_grad_(False)
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    return q, k, v, m


OPCHECK_CASES = [
    dict(),
    dict(mask="bool", window=(5, 3)),
    dict(mask="float", causal=True, gqa=True),
    dict(transposed=True, bottom_right=True, causal=True),
    dict(dtype=torch.bfloat16, window=(8, -1)),
    dict(dropout=0.2, gqa=True),
]


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "dense")
def test_opcheck(case):
    q, k, v, m = _inputs(case.get("dtype", torch.float32), case.get("transposed", False), case.get("mask"),
                         case.get("gqa", False))
    left, right = case.get("window", (-1, -1))
    if case.get("causal"):
        right = 0
    p = case.get("dropout", 0.0)
    seed = torch.tensor([1234567], dtype=torch.int64) if p > 0 else None
    args = (q, k, v, m, seed, 0.2, left, right, case.get("bottom_right", False), p)
    torch.library.opcheck(torch.ops.attnkern.fwd.default, args)
    out, lse = torch.ops.attnkern.fwd(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
    grad_out = torch.randn_like(out)
    grad_lse = torch.randn_like(lse)
    mask_grad = m is not None and m.is_floating_point()
    bargs = (grad_out, grad_lse, q.detach(), k.detach(), v.detach(), out, lse, m, seed, 0.2, left, right,
             case.get("bottom_right", False), p, mask_grad)
    torch.library.opcheck(torch.ops.attnkern.bwd.default, bargs)


def test_triton_schema_matches_native():
    assert ops.native_schema_matches_triton()


def _model(backend, **kw):
    def f(q, k, v, mask=None):
        out = attnkern.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=backend, **kw)
        return (out.float() * 1.5).sum(dim=-1)

    return f


@pytest.mark.parametrize(
    "kw,mask",
    [
        (dict(is_causal=True), None),
        (dict(window_size=(7, 2), enable_gqa=True), None),
        (dict(), "float"),
        (dict(dropout_p=0.3), "bool"),
    ],
    ids=["causal", "window-gqa", "float-mask", "dropout-bool-mask"],
)
def test_compile_fullgraph_matches_eager(kw, mask, seed):
    gqa = kw.get("enable_gqa", False)
    q, k, v, m = _inputs(mask=mask, gqa=gqa)
    f = _model("cpu", **kw)
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.manual_seed(seed)
    ref = f(q, k, v, m)
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    torch.manual_seed(seed)
    out = cf(q, k, v, m)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert rel_err(out, ref) <= TOLERANCE[torch.float32]
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) <= TOLERANCE[torch.float32]


def test_compile_inductor_dynamic_shapes(seed):
    """Inductor with dynamic shapes: one graph serves several lengths, flash layout included."""
    torch._dynamo.reset()

    def f(q, k, v):
        return attnkern.flash_attn_func(q, k, v, causal=True, window_size=(16, 0), backend="cpu").relu()

    cf = torch.compile(f, fullgraph=True, dynamic=True)
    for L in (33, 70):
        q, k, v = (torch.randn(2, L, 4, 32, requires_grad=True) for _ in range(3))
        out = cf(q, k, v)
        ref = f(q, k, v)
        assert rel_err(out, ref) <= TOLERANCE[torch.float32]
        g = torch.autograd.grad(out.sum(), q)[0]
        gr = torch.autograd.grad(ref.sum(), q)[0]
        assert rel_err(g, gr) <= TOLERANCE[torch.float32]
