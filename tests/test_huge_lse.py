"""Rows whose fp32 LSE is huge (issue 11): a query row whose scores all sit at a huge finite
value, e.g. a float mask row all at ``finfo(float32).min`` (Hugging Face's padding) or at -1e9.
Its fp32 LSE = max + log(sum) has lost log(sum), so a backward that takes P = exp(s - LSE) got
about 1 per key instead of 1 / n (the CPU returned zero gradients). The fused backwards now
recompute such rows' max and sum (csrc/mask.h, kHugeLse).

The oracle is the float64 reference. It must see the same scores as fp32 does: at finfo.min a
float64 sum also loses q.k (half an ulp there is 2e22), so the reference takes the mask as it
is; at -1e9 fp32 loses q.k (an ulp is 64) but float64 would keep it, so the reference takes
those entries at -1e18, where float64 loses it too (an ulp is 128). Both then weigh a row's
keys at the top level equally, as torch's math SDPA in fp32 does (test_matches_torch_math).

``check_huge_rows`` is shared: test_triton_interp.py runs it on the Triton kernels under the
interpreter, test_cuda.py on the CUDA kernels in the CPU emulator.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import attnkern
from attnkern import dispatch, reference
from conftest import TOLERANCE, assert_close, rel_err

LOWEST = torch.finfo(torch.float32).min
# the huge mask levels tested, and the float64 value that loses q.k as fp32 does at each
LEVELS = {"finfo.min": (LOWEST, LOWEST), "-1e9": (-1e9, -1e18)}


def huge_mask(batch, heads, len_q, len_k, level: float):
    """A float mask (randn elsewhere) whose rows exercise the rare path, and which rows are huge.

    Per head, rows: 0 all at `level`; 1 at `level` with a few keys -inf; 2 half at `level`, half
    at level / 2 (P uniform over the latter); 3 half normal, half at `level` (an ordinary LSE:
    the huge keys weigh 0); the others normal. Every head gets them, at rows shifted by the head
    index, so GQA groups hold huge and plain rows side by side."""
    mask = torch.randn(batch, heads, len_q, len_k)
    huge_rows = torch.zeros(batch, heads, len_q, dtype=torch.bool)
    for h in range(heads):
        r = [(h + i) % len_q for i in range(4)]
        mask[:, h, r[0]] = level
        mask[:, h, r[1]] = level
        mask[:, h, r[1], 1::3] = float("-inf")
        mask[:, h, r[2], : len_k // 2] = level
        mask[:, h, r[2], len_k // 2 :] = level / 2
        mask[:, h, r[3], ::2] = level
        huge_rows[:, h, r[:3]] = True
    return mask, huge_rows


def check_huge_rows(fwd, bwd, dtype, level_name, heads=(4, 2), window=(-1, -1), bottom_right=False, dropout_p=0.0,
                    grad_lse=False, mask_grad=False, len_q=9, len_k=40, head_dim=16):
    """fwd/bwd with the signatures of torch.ops.attnkern.fwd/bwd; outputs and gradients against the
    float64 reference."""
    level, level64 = LEVELS[level_name]
    heads_q, heads_kv = heads
    q = torch.randn(2, heads_q, len_q, head_dim).to(dtype)
    k = torch.randn(2, heads_kv, len_k, head_dim).to(dtype)
    v = torch.randn(2, heads_kv, len_k, head_dim).to(dtype)
    mask, huge_rows = huge_mask(2, heads_q, len_q, len_k, level)
    scale = head_dim**-0.5
    rng = dispatch.new_rng_seed() if dropout_p > 0 else None
    sem = (scale, *window, bottom_right, dropout_p)
    out, lse = fwd(q, k, v, mask, rng, *sem)
    g_out = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    g_lse = torch.randn(lse.shape) if grad_lse else None
    grads = bwd(g_out, g_lse, q, k, v, out, lse, mask, rng, *sem, mask_grad)

    m64 = mask.double().where(mask != level, level64).where(mask != level / 2, level64 / 2)
    inputs = [t.double().requires_grad_(True) for t in (q, k, v)]
    if mask_grad:
        inputs.append(m64.requires_grad_(True))
    seed64 = None if rng is None else int(rng.item()) & 0xFFFFFFFFFFFFFFFF
    want, want_lse = reference.attention(*inputs[:3], m64, *sem, seed64)
    loss = (want * g_out.double()).sum() + ((want_lse * g_lse.double()).sum() if grad_lse else 0)
    want_grads = torch.autograd.grad(loss, inputs)

    tol = TOLERANCE[dtype]
    assert_close(out, want, dtype, f"{level_name}: out")
    # huge rows' LSE: huge (the reference's level differs at -1e9); the others match
    assert torch.isfinite(lse).all() and (lse[huge_rows] < -1e8).all(), f"{level_name}: huge rows' LSE"
    assert_close(lse[~huge_rows], want_lse[~huge_rows], torch.float32 if dtype == torch.float32 else dtype, "lse")
    for name, got, ref in zip(("dq", "dk", "dv", "dmask"), grads, want_grads):
        err = rel_err(got, ref)
        assert err <= 2 * tol, f"{level_name}: {name} error {err:.2e} > {2 * tol:.0e}"
        if name == "dq":  # the huge rows' own gradient, held apart from the rest
            err = rel_err(got[huge_rows], ref[huge_rows])
            assert err <= 2 * tol, f"{level_name}: dq of the huge rows, error {err:.2e}"


def _cpu_ops():
    return torch.ops.attnkern.fwd, torch.ops.attnkern.bwd


needs_cpu = pytest.mark.skipif("cpu" not in attnkern.available_backends("cpu"), reason="CPU extension not built")


@needs_cpu
@pytest.mark.parametrize("level", list(LEVELS))
@pytest.mark.parametrize(
    "variant",
    [dict(), dict(heads=(3, 3), grad_lse=True, mask_grad=True), dict(window=(5, 3), bottom_right=True),
     dict(dropout_p=0.25), dict(len_q=70, len_k=150, window=(40, 0))],
    ids=["gqa", "mha-lse-mask-grad", "window", "dropout", "two-tiles-causal-window"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cpu_backward_of_huge_rows(dtype, variant, level, seed):
    check_huge_rows(*_cpu_ops(), dtype, level, **variant)


@needs_cpu
@pytest.mark.parametrize("level", list(LEVELS))
def test_matches_torch_math(level, seed):
    """The public API against torch's math SDPA in fp32 (both lose q.k next to the mask level)."""
    q, k, v = (torch.randn(2, 4, 9, 16, requires_grad=True) for _ in range(3))
    mask, _ = huge_mask(2, 4, 9, 9, LEVELS[level][0])
    g = torch.randn(2, 4, 9, 16)
    with sdpa_kernel(SDPBackend.MATH):
        want = F.scaled_dot_product_attention(q, k, v, mask)
    want_grads = torch.autograd.grad(want, (q, k, v), g)
    out = attnkern.scaled_dot_product_attention(q, k, v, mask, backend="cpu")
    grads = torch.autograd.grad(out, (q, k, v), g)
    assert_close(out, want, torch.float32, "out")
    for name, got, ref in zip(("dq", "dk", "dv"), grads, want_grads):
        assert_close(got, ref, torch.float32, name)


@needs_cpu
def test_bf16_mask_at_its_own_lowest(seed):
    """A bfloat16 model pads with finfo(bfloat16).min (-3.39e38): huge too."""
    q, k, v = (torch.randn(1, 2, 6, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    mask = torch.randn(1, 2, 6, 6, dtype=torch.bfloat16)
    mask[:, :, 2] = torch.finfo(torch.bfloat16).min
    out = attnkern.scaled_dot_product_attention(q, k, v, mask, backend="cpu")
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    want, _ = reference.attention(q64, k64, v64, mask.double(), 16**-0.5)
    want_grads = torch.autograd.grad(want, (q64, k64, v64), torch.ones_like(want))
    for name, got, ref in zip(("dq", "dk", "dv"), grads, want_grads):
        assert_close(got, ref, torch.bfloat16, name)


@needs_cpu
@pytest.mark.parametrize("level", list(LEVELS))
def test_split_kv_merge_of_huge_rows(level, seed):
    """The CPU forward's key splits (decoding: few rows, long keys, 2+ threads) merge by each
    split's (max, sum), not its fp32 LSE, which next to a huge max has lost log(sum): splits with
    unequal key counts at the same level must still weigh by their counts."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(threads, 4))
    try:
        q, k, v = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 3000, 16), torch.randn(1, 1, 3000, 16)
        mask = torch.full((1, 1, 1, 3000), LEVELS[level][0])
        mask[..., 2000:2600] = float("-inf")  # the splits see different numbers of keys at the level
        plan = attnkern._C.cpu_work_plan(1, 1, 1, 1, 3000, 16, -1, -1, torch.get_num_threads())
        assert plan["forward_key_splits"] > 1, plan
        out = attnkern.scaled_dot_product_attention(q, k, v, mask, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    keep = torch.isfinite(mask[0, 0, 0])
    assert_close(out[0, 0, 0], v[0, 0, keep].double().mean(0), torch.float32, "mean of the attended v")


@needs_cpu
@pytest.mark.parametrize("level", list(LEVELS))
def test_topk_backward_of_huge_rows(level, seed):
    """The top-k backward normalises the kept keys' softmax from their own max: from the saved
    LSE, which next to a huge max has lost log(sum), exp(score - lse) underflowed to 0 / 0."""
    q = torch.randn(1, 2, 9, 16, requires_grad=True)
    k, v = (torch.randn(1, 2, 30, 16, requires_grad=True) for _ in range(2))
    mask, _ = huge_mask(1, 2, 9, 30, LEVELS[level][0])
    out = attnkern.topk_attention(q, k, v, 5, attn_mask=mask, backend="cpu")
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    m64 = mask.double().where(mask != LEVELS[level][0], LEVELS[level][1])
    m64 = m64.where(mask != LEVELS[level][0] / 2, LEVELS[level][1] / 2)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    want, _, _ = reference.topk_attention(q64, k64, v64, m64, 5, 16**-0.5)
    want_grads = torch.autograd.grad(want, (q64, k64, v64), torch.ones_like(want))
    assert_close(out, want, torch.float32, "out")
    for name, got, ref in zip(("dq", "dk", "dv"), grads, want_grads):
        assert_close(got, ref, torch.float32, name)


def _tied_huge(shape_q, shape_k):
    """q and k whose every score is exactly 1e8 * E (1e4 in every entry: exact products, exact
    fp32 sums in any order), so every key of a row ties at a huge max, without a mask."""
    return torch.full(shape_q, 1e4), torch.full(shape_k, 1e4)


def _check_tied_grads(grads, want_grads, what):
    """dk, dv against float64; dq = k * sum_j dS_j is 0 for tied keys, so in fp32 it is the
    cancellation noise of 1e4-sized terms, held to an absolute bound (a wrong P makes it ~1e4)."""
    dq, dk, dv = grads
    assert dq.abs().max() <= 1e-2, f"{what}: dq of tied keys must vanish, got {dq.abs().max():.2e}"
    assert_close(dk, want_grads[1], torch.float32, f"{what}: dk")
    assert_close(dv, want_grads[2], torch.float32, f"{what}: dv")


@needs_cpu
def test_huge_tied_scores_without_mask(seed):
    """|max| huge from q.k itself (no mask): a decoding row over 3000 tied keys, split over
    threads, and a prefill block; forward (merge of the splits) and backward against float64."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(threads, 4))
    try:
        for len_q in (1, 20):
            q, k = _tied_huge((1, 4, len_q, 16), (1, 2, 3000, 16))
            v = torch.randn(1, 2, 3000, 16)
            q, k, v = (t.requires_grad_(True) for t in (q, k, v))
            out = attnkern.scaled_dot_product_attention(q, k, v, scale=1.0, enable_gqa=True, backend="cpu")
            g = torch.randn_like(out)
            grads = torch.autograd.grad(out, (q, k, v), g)
            inputs = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
            want, _ = reference.attention(*inputs, None, 1.0)
            assert_close(out, want, torch.float32, f"L={len_q}: out")
            _check_tied_grads(grads, torch.autograd.grad(want, inputs, g.double()), f"L={len_q}")
    finally:
        torch.set_num_threads(threads)


@needs_cpu
def test_varlen_backward_of_huge_tied_scores(seed):
    """Packed sequences take the rare path per sequence."""
    from attnkern import reference_varlen

    cu_q = torch.tensor([0, 3, 8], dtype=torch.int32)
    cu_k = torch.tensor([0, 40, 70], dtype=torch.int32)
    q, k = _tied_huge((8, 2, 16), (70, 2, 16))
    q[3:], k[40:] = torch.randn(5, 2, 16), torch.randn(30, 2, 16)  # the second sequence is ordinary
    v = torch.randn(70, 2, 16)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    out = attnkern.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 40, softmax_scale=1.0, backend="cpu")
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    inputs = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    want, _ = reference_varlen.varlen_attention(*inputs, cu_q, cu_k, 1.0)
    assert_close(out, want, torch.float32, "out")
    want_grads = torch.autograd.grad(want, inputs, g.double())
    _check_tied_grads([t[:3] for t in grads], [t[:3] for t in want_grads], "tied sequence")
    for name, got, ref in zip(("dq", "dk", "dv"), grads, want_grads):
        assert_close(got[3:] if name == "dq" else got[40:], ref[3:] if name == "dq" else ref[40:], torch.float32, name)
