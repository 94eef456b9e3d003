"""Top-k attention: the CPU kernel against the float64 reference, the tie rule, top_k >= S
as dense attention, the op contract (opcheck, torch.compile) and bad input."""

from __future__ import annotations

import math

import pytest
import torch

import attnkern
from attnkern import dispatch, reference, topk as topk_module
from attnkern._semantics import band_mask
from conftest import TOLERANCE, assert_close, forced_isa_env

needs_cpu_kernel = pytest.mark.skipif(topk_module.topk_fwd is None, reason="C++ extension not built")

# scores spread wide enough that the k-th and (k+1)-th best of a row are rarely near-tied;
# _inputs also redraws the query rows whose boundary gap is below MIN_GAP
SPREAD = 3.0
MIN_GAP = 1e-3


def _allowed_scores(q, k, mask, scale, left, right, offset=0):
    """float64 (B, Hq, L, S) scores with -inf where a key may not be seen (a test-side oracle)."""
    group = q.shape[1] // k.shape[1]
    s = torch.matmul(q.double(), k.double().repeat_interleave(group, 1).transpose(-1, -2)) * scale
    allowed = band_mask(q.shape[2], k.shape[2], left, right, offset).expand_as(s)
    if mask is not None:
        if mask.dtype == torch.bool:
            allowed = allowed & mask
        else:
            s = s + mask.double()
    return torch.where(allowed, s, torch.tensor(float("-inf"), dtype=torch.float64))


def _inputs(shape, dtype, top_k, mask_kind=None, left=-1, right=-1, offset=0, tries=30):
    """Random q, k, v (and mask) where every row's k-th and (k+1)-th allowed scores are MIN_GAP apart.

    A row's scores depend on k, v, the mask and that row's query alone, so only the query rows
    with a near-tie are redrawn. Redrawing the whole draw failed in CI: with S=300 and top_k=64
    about 3% of rows have a gap under MIN_GAP, so only ~20% of whole draws were clean and 30 of them
    all failed about once in 500 runs; a single row stays near-tied 30 times running with
    probability ~0.03**30.
    """
    B, Hq, Hkv, L, S, E, Ev = shape
    q = (torch.randn(B, Hq, L, E) * SPREAD).to(dtype)
    k = torch.randn(B, Hkv, S, E).to(dtype)
    v = torch.randn(B, Hkv, S, Ev).to(dtype)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(B, Hq, L, S) > 0.3
        mask[:, :, 0] = False  # a row that sees no key: zeros, -1 indices
    elif mask_kind == "bool-bcast":
        mask = (torch.rand(1, 1, L, S) > 0.3).expand(B, Hq, L, S)
    elif mask_kind == "float":
        mask = torch.randn(B, Hq, L, S).to(dtype)
        mask[..., 1] = float("-inf")  # -inf keys are never selected
    if top_k >= S:
        return q, k, v, mask
    for _ in range(tries):
        scores = _allowed_scores(q, k, mask, 1.0 / math.sqrt(E), left, right, offset)
        ordered = scores.topk(top_k + 1, dim=-1).values
        kth, next_ = ordered[..., top_k - 1], ordered[..., top_k]
        near_tie = torch.isfinite(next_) & (kth - next_ <= MIN_GAP)
        if not near_tie.any():
            return q, k, v, mask
        q[near_tie] = (torch.randn(int(near_tie.sum()), E) * SPREAD).to(dtype)
    pytest.fail("could not draw inputs without near-ties")


def assert_same_selection(idx, ref_idx, scores):
    """The same set of keys per row as the reference, listed best first.

    Only the set decides the output (``_inputs`` keeps the k-th and (k+1)-th scores MIN_GAP apart,
    so the set is exact). Within the set, two scores closer than the kernel's rounding may come in
    either order: each slot must hold a key whose float64 score equals the reference's key's score
    to well below MIN_GAP. Exact ties (same float64 score) still go to the lower key index, which
    test_exact_ties_go_to_the_lower_key_index checks on its own.
    """
    assert idx.shape == ref_idx.shape
    assert torch.equal(idx.sort(-1).values, ref_idx.sort(-1).values), "selected keys differ from the reference"
    assert torch.equal(idx == -1, ref_idx == -1), "empty slots differ from the reference"
    picked = scores.gather(-1, idx.clamp(min=0))
    wanted = scores.gather(-1, ref_idx.clamp(min=0))
    swapped = idx != ref_idx
    gap = (picked - wanted)[swapped].abs()
    assert gap.numel() == 0 or gap.max() < MIN_GAP / 10, (
        f"slot order differs from the reference beyond rounding (score gap {gap.max().item():.3g})")


def _reference(q, k, v, mask, top_k, scale, left, right, bottom_right=False, grad_out=None):
    """float64 (out, indices, grads of q, k, v and of a float mask)."""
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    m64 = mask if mask is None or mask.dtype == torch.bool else mask.detach().double().requires_grad_(True)
    out, _, idx = reference.topk_attention(q64, k64, v64, m64, top_k, scale, left, right, bottom_right)
    inputs = (q64, k64, v64) + ((m64,) if m64 is not None and m64.is_floating_point() else ())
    grads = torch.autograd.grad(out, inputs, grad_out.double()) if grad_out is not None else None
    return out, idx, grads


PARITY = [
    # (B, Hq, Hkv, L, S, E, Ev), top_k, mask, (left, right), causal
    ((2, 2, 2, 37, 53, 64, 64), 1, None, (-1, -1), False),
    ((1, 4, 2, 70, 300, 32, 48), 7, None, (-1, -1), True),  # GQA, 2 query and 3 key blocks
    ((2, 2, 1, 70, 90, 16, 16), 2, "bool", (20, 5), False),
    ((1, 2, 2, 33, 300, 80, 24), 64, "float", (-1, -1), False),  # with the mask's gradient
    ((2, 2, 2, 29, 53, 64, 32), 64, "bool-bcast", (-1, -1), True),  # top_k >= S
    ((1, 3, 3, 16, 40, 128, 128), 7, None, (3, 3), False),  # rows with fewer than top_k keys
]


def check_parity(case, dtype, backend, seed):
    """Output, indices and the gradients of q, k, v (and of a float mask) against the float64 reference."""
    shape, top_k, mask_kind, (left, right), causal = case
    right_eff = 0 if causal else right
    q, k, v, mask = _inputs(shape, dtype, top_k, mask_kind, left, right_eff)
    window = None if (left, right) == (-1, -1) else (left, right)
    inputs = (q, k, v) + ((mask,) if mask is not None and mask.is_floating_point() else ())
    for t in inputs:
        t.requires_grad_(True)
    out, idx = attnkern.topk_attention(q, k, v, top_k, is_causal=causal, window_size=window, attn_mask=mask,
                                       enable_gqa=shape[1] != shape[2], return_indices=True, backend=backend)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad_out)
    ref_out, ref_idx, ref_grads = _reference(q, k, v, mask, top_k, 1.0 / math.sqrt(shape[5]), left, right_eff,
                                             grad_out=grad_out)
    assert out.dtype == dtype and idx.dtype == torch.int64
    assert idx.shape == out.shape[:-1] + (min(top_k, shape[4]),)
    scores = _allowed_scores(q.detach(), k.detach(), None if mask is None else mask.detach(),
                             1.0 / math.sqrt(shape[5]), left, right_eff)
    assert_same_selection(idx, ref_idx, scores)
    assert_close(out, ref_out, dtype, "out")
    assert len(grads) == len(ref_grads)
    for g, r, name in zip(grads, ref_grads, ("q", "k", "v", "mask")):
        assert g.dtype == dtype
        assert_close(g, r, dtype, f"d{name}")


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", PARITY, ids=lambda c: f"{c[0]}-k{c[1]}-{c[2]}-w{c[3]}-c{c[4]}")
def test_parity_with_reference(case, dtype, seed):
    check_parity(case, dtype, "cpu", seed)


def check_bottom_right_alignment(op):
    """The op itself also takes flash-attn's alignment (query i at key position i + S - L)."""
    shape = (1, 2, 2, 20, 75, 32, 32)
    q, k, v, _ = _inputs(shape, torch.float32, 5, None, 10, 0, offset=55)
    out, lse, idx = op(q, k, v, None, 5, 0.3, 10, 0, True)
    ref_out, ref_lse, ref_idx = reference.topk_attention(q.double(), k.double(), v.double(), None, 5, 0.3, 10, 0,
                                                         True)
    assert_same_selection(idx, ref_idx, 0.3 * _allowed_scores(q, k, None, 1.0, 10, 0, offset=55))
    assert_close(out, ref_out, torch.float32, "out")
    assert_close(lse, ref_lse, torch.float32, "lse")


@needs_cpu_kernel
def test_bottom_right_alignment_through_the_op(seed):
    check_bottom_right_alignment(torch.ops.attnkern.topk_fwd)


def tied_scores(q, distinct, repeats):
    """float64 scores of q against `distinct` keys repeated `repeats` times, as nested lists: each
    distinct key's score computed once, so repeats tie exactly (a float64 GEMM over the repeated
    keys need not sum every column in one order; on an AMD EPYC's MKL they differed by ~1e-15)"""
    return (q.double() @ distinct.double().transpose(-1, -2)).repeat(1, 1, 1, repeats).tolist()


@pytest.mark.parametrize("backend", ["cpu", "math"])
def test_exact_ties_go_to_the_lower_key_index(backend, seed):
    if backend == "cpu" and topk_module.topk_fwd is None:
        pytest.skip("C++ extension not built")
    # keys repeat with period 5, so every score appears S / 5 times exactly
    B, H, L, S, E = 1, 2, 9, 40, 16
    q = torch.randn(B, H, L, E)
    distinct = torch.randn(B, H, 5, E)
    k = distinct.repeat(1, 1, S // 5, 1)
    v = torch.randn(B, H, S, E)
    scores = tied_scores(q, distinct, S // 5)
    for top_k in (1, 3, 7, 12):
        out, idx = attnkern.topk_attention(q, k, v, top_k, return_indices=True, backend=backend)
        for b in range(B):
            for h in range(H):
                for i in range(L):
                    row = scores[b][h][i]
                    want = sorted(range(S), key=lambda j: (-row[j], j))[:top_k]
                    assert idx[b, h, i].tolist() == want
        ref_out, _, _ = reference.topk_attention(q.double(), k.double(), v.double(), None, top_k, E**-0.5)
        assert_close(out, ref_out, torch.float32, f"out, top_k={top_k}")


# top_k >= 8 runs the AVX-512 row scan (a row's candidates compress-stored per 16 keys, keys made
# at compaction); smaller top_k and the other ISAs run the lane scan. Several key tiles (128) with
# a tail that is not a multiple of 16, and rows that see fewer than top_k keys.
ROW_SCAN = [
    ((1, 2, 2, 64, 410, 64, 64), 64, "bool", (40, 30), False),  # 71 keys in the band, ~30% masked: < 64
    ((1, 4, 2, 70, 520, 32, 32), 20, None, (-1, -1), True),  # GQA, causal: the first 20 rows see < 20 keys
    ((1, 2, 2, 40, 300, 16, 24), 9, "float", (-1, -1), False),  # with the mask's gradient
]


@needs_cpu_kernel
@pytest.mark.parametrize("case", ROW_SCAN, ids=lambda c: f"{c[0]}-k{c[1]}-{c[2]}-w{c[3]}-c{c[4]}")
def test_row_scan_parity(case, seed):
    check_parity(case, torch.float32, "cpu", seed)


@needs_cpu_kernel
def test_row_scan_ties_at_the_threshold(seed):
    """30 distinct keys repeated over 690 keys (6 key tiles): every score appears 23 times, so a
    row's threshold (its k-th best so far) is tied with keys in later tiles and compactions cut
    inside a group of equal scores; the lower key index must win every tie. top_k 8 and 20 fall
    inside the best score's group, 64 inside the third, 200 inside the ninth."""
    B, H, L, S, E = 1, 2, 6, 690, 16
    q = torch.randn(B, H, L, E)
    distinct = torch.randn(B, H, 30, E)
    k = distinct.repeat(1, 1, S // 30, 1)
    v = torch.randn(B, H, S, E)
    scores = tied_scores(q, distinct, S // 30)
    for top_k in (8, 20, 64, 200):
        out, idx = attnkern.topk_attention(q, k, v, top_k, return_indices=True, backend="cpu")
        for h in range(H):
            for i in range(L):
                row = scores[0][h][i]
                assert idx[0, h, i].tolist() == sorted(range(S), key=lambda j: (-row[j], j))[:top_k]
        ref_out, _, _ = reference.topk_attention(q.double(), k.double(), v.double(), None, top_k, E**-0.5)
        assert_close(out, ref_out, torch.float32, f"out, top_k={top_k}")


@pytest.mark.parametrize("backend", ["cpu", "math"])
@pytest.mark.parametrize("len_k,top_k", [(53, 53), (53, 60), (300, 300), (300, 1000), (53, 2**63), (53, 10**30)])
def test_top_k_at_least_s_is_dense_attention(backend, len_k, top_k, seed):
    if backend == "cpu" and topk_module.topk_fwd is None:
        pytest.skip("C++ extension not built")
    q, k, v = torch.randn(2, 2, 31, 32), torch.randn(2, 2, len_k, 32), torch.randn(2, 2, len_k, 24)
    mask = torch.rand(2, 1, 31, len_k) > 0.2
    for t in (q, k, v):
        t.requires_grad_(True)
    out = attnkern.topk_attention(q, k, v, top_k, is_causal=True, attn_mask=mask, backend=backend)
    dense = attnkern.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True, backend=backend)
    assert_close(out, dense, torch.float32, "top-k vs dense")
    g = torch.randn_like(out)
    for a, b, name in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(dense, (q, k, v), g), "qkv"):
        assert_close(a, b, torch.float32, f"d{name}")
    # the float64 reference: top_k >= S is the dense reference, to float64 rounding
    q64, k64, v64 = (t.detach().double() for t in (q, k, v))
    full = mask.expand(2, 2, 31, len_k)
    ref_topk = reference.topk_attention(q64, k64, v64, full, top_k, 0.2, -1, 0)
    ref_dense = reference.attention(q64, k64, v64, full, 0.2, -1, 0)
    assert_close(ref_topk[0], ref_dense[0], torch.float64, "reference out")
    empty = torch.isinf(ref_dense[1])  # rows whose only causal key the mask hides
    assert torch.equal(torch.isinf(ref_topk[1]), empty)
    assert_close(ref_topk[1][~empty], ref_dense[1][~empty], torch.float64, "reference lse")


@needs_cpu_kernel
def test_auto_uses_the_cpu_kernel_and_falls_back(monkeypatch):
    q, k, v = torch.randn(1, 1, 8, 16), torch.randn(1, 1, 400, 16), torch.randn(1, 1, 400, 16)
    problem = attnkern._semantics.normalize_torch_layout(q, k, v, None, 0.0, False, None, False, None)[4]
    assert dispatch.choose_topk(problem, "auto", 16, True) == "cpu"
    assert dispatch.choose_topk(problem, "auto", 300, True) == "math"  # more than 256 kept keys
    assert "no top-k kernel" in dispatch.topk_why_not("cuda", problem, 16, False)


def test_bad_input():
    q, k, v = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 300, 16), torch.randn(1, 2, 300, 16)
    for bad in (0, -3):
        with pytest.raises(ValueError, match="top_k"):
            attnkern.topk_attention(q, k, v, bad)
    for bad in (2.0, True, "3", None, torch.tensor(2)):
        with pytest.raises(TypeError, match="top_k"):
            attnkern.topk_attention(q, k, v, bad)
    with pytest.raises(TypeError, match="return_indices"):
        attnkern.topk_attention(q, k, v, 2, return_indices=1)
    # top_k >= S > 256 runs the dense kernel on the cpu backend, which has no indices to give
    if topk_module.topk_fwd is not None:
        with pytest.raises(RuntimeError, match="indices"):
            attnkern.topk_attention(q, k, v, 300, return_indices=True, backend="cpu")
        with pytest.raises(RuntimeError, match="at most 256"):
            attnkern.topk_attention(q, k, v, 257, backend="cpu")
    with pytest.raises(RuntimeError, match="no top-k kernel"):
        attnkern.topk_attention(q, k, v, 2, backend="cuda")
    # (one kv head broadcasts against every query head, as in torch's SDPA; two against four do not)
    with pytest.raises(ValueError, match="enable_gqa"):
        attnkern.topk_attention(q.repeat(1, 2, 1, 1), k, v, 2)
    with pytest.raises(ValueError, match="backend"):
        attnkern.topk_attention(q, k, v, 2, backend="fast")
    if topk_module.topk_fwd is not None:  # the op's own checks
        with pytest.raises(ValueError, match="top_k"):
            torch.ops.attnkern.topk_fwd(q, k, v, None, 0, 0.25, -1, -1, False)
        out, lse, idx = torch.ops.attnkern.topk_fwd(q, k, v, None, 3, 0.25, -1, -1, False)
        with pytest.raises(ValueError, match="indices"):
            torch.ops.attnkern.topk_bwd(out, q, k, v, lse, idx + 300, None, 0.25, -1, -1, False, False)


@needs_cpu_kernel
@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_opcheck(mask, seed):
    B, Hq, Hkv, L, S, E = 2, 4, 2, 19, 45, 24
    q, k, v = torch.randn(B, Hq, L, E), torch.randn(B, Hkv, S, E), torch.randn(B, Hkv, S, 16)
    m = None
    if mask == "bool":
        m = (torch.rand(1, 1, L, S) > 0.3).expand(B, Hq, L, S)
    elif mask == "float":
        m = torch.randn(B, 1, L, S).expand(B, Hq, L, S)
    for t in (q, k, v):
        t.requires_grad_(True)
    args = (q, k, v, m, 5, 0.2, 6, 0, False)
    torch.library.opcheck(torch.ops.attnkern.topk_fwd.default, args)
    out, lse, idx = torch.ops.attnkern.topk_fwd(q.detach(), k.detach(), v.detach(), m, 5, 0.2, 6, 0, False)
    bargs = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), lse, idx, m, 0.2, 6, 0, False, mask == "float")
    torch.library.opcheck(torch.ops.attnkern.topk_bwd.default, bargs)


@needs_cpu_kernel
def test_torch_compile_fullgraph(seed):
    torch._dynamo.reset()

    def f(q, k, v):
        out, idx = attnkern.topk_attention(q, k, v, 4, is_causal=True, return_indices=True, backend="cpu")
        return out.sum(-1) * 2.0, idx

    q, k, v = (torch.randn(2, 2, 23, 16, requires_grad=True) for _ in range(3))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out, idx = compiled(q, k, v)
    ref_out, ref_idx = f(q, k, v)
    assert torch.equal(idx, ref_idx)
    assert_close(out, ref_out, torch.float32, "compiled out")
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref_out, (q, k, v), g)):
        assert_close(a, b, torch.float32, "compiled grad")


@needs_cpu_kernel
@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_parity_under_each_isa(isa):
    """The kernel is compiled once per ISA (topk_impl.inc in kernels_<isa>.cpp): force the others."""
    import os
    import subprocess
    import sys

    env = forced_isa_env(isa)
    here = os.path.dirname(os.path.abspath(__file__))
    script = f"import sys; sys.path.insert(0, {here!r}); import test_topk; test_topk.parity_subset(); print('ok')"
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout[-3000:] + run.stderr[-3000:]


def parity_subset(seed=0):
    """The float32 parity cases and the tie rule, outside pytest (for a forced ISA)."""
    for n, case in enumerate(PARITY):
        torch.manual_seed(seed + n)
        test_parity_with_reference(case, torch.float32, seed + n)
    test_exact_ties_go_to_the_lower_key_index("cpu", seed)


@pytest.mark.parametrize("backend", ["cpu", "math"])
@pytest.mark.parametrize("shape", [(0, 5, 8, 8), (4, 0, 8, 8), (4, 5, 8, 0), (4, 5, 0, 8)], ids=str)
def test_empty_shapes(backend, shape, seed):
    """L, S, E or Ev of 0: shaped results; S = 0 gives zero rows and no indices."""
    if backend == "cpu" and topk_module.topk_fwd is None:
        pytest.skip("C++ extension not built")
    L, S, E, Ev = shape
    q, k, v = torch.randn(1, 2, L, E), torch.randn(1, 2, S, E), torch.randn(1, 2, S, Ev)
    for t in (q, k, v):
        t.requires_grad_(True)
    out, idx = attnkern.topk_attention(q, k, v, 3, scale=1.0, return_indices=True, backend=backend)
    assert out.shape == (1, 2, L, Ev) and idx.shape == (1, 2, L, min(3, S))
    grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True, materialize_grads=True)
    ref_out, _, ref_idx = reference.topk_attention(q.double(), k.double(), v.double(), None, 3, 1.0)
    assert torch.equal(idx, ref_idx)
    assert_close(out, ref_out, torch.float32, "out")
    assert all(g.shape == t.shape and torch.isfinite(g).all() for g, t in zip(grads, (q, k, v)))
