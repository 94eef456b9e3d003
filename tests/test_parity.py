"""The parity matrix: every fused backend against the float64 reference, forward and backward.

Backends are those available for CPU tensors here (the CPU kernels; Triton too under
TRITON_INTERPRET=1, see test_triton_interp.py for its reduced matrix). On a GPU machine the
same matrix runs for CUDA tensors (marked gpu).
"""

from __future__ import annotations

import pytest
import torch

import attnkern
from conftest import (
    Case,
    assert_close,
    assert_lse_close,
    case_attention,
    device_backends,
    make_inputs,
    reference_forward_backward,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

CASES = [
    Case(id="dense"),
    Case(len_q=33, len_k=100, id="L<S"),
    Case(len_q=100, len_k=33, id="L>S"),
    Case(len_q=1, len_k=77, id="L=1"),
    Case(len_q=1, len_k=1, id="L=S=1"),
    Case(causal=True, id="causal"),
    Case(causal=True, len_q=40, len_k=130, id="causal-L<S"),
    Case(causal=True, len_q=130, len_k=40, id="causal-L>S"),
    Case(window=(0, 0), len_q=150, len_k=150, id="window(0,0)"),
    Case(window=(3, 5), len_q=150, len_k=170, id="window(3,5)"),
    Case(window=(256, 0), len_q=300, len_k=300, batch=1, id="window(256,0)"),
    Case(window=(-1, 17), len_q=150, len_k=130, id="window(-1,17)"),
    Case(window=(3, 5), causal=True, len_q=150, len_k=150, id="window(3,5)+causal"),
    Case(mask="bool", len_q=70, len_k=90, id="mask-bool"),
    Case(mask="float", len_q=70, len_k=90, id="mask-float"),
    Case(mask="bool-bcast", len_q=70, len_k=90, id="mask-bool-bcast"),
    Case(mask="float-bcast", len_q=70, len_k=90, id="mask-float-bcast"),
    Case(mask="bool", window=(10, 10), causal=True, len_q=90, len_k=90, id="mask+window+causal"),
    Case(heads_q=4, heads_kv=2, id="gqa"),
    Case(heads_q=6, heads_kv=1, causal=True, len_q=50, len_k=90, id="mqa-causal"),
    Case(batch=1, three_d=True, heads_q=3, heads_kv=3, id="3d"),
    Case(layout="transposed", causal=True, id="transposed"),
    Case(layout="strided", heads_q=4, heads_kv=2, id="strided"),
    Case(head_dim=40, head_dim_v=72, id="E40-Ev72"),
]
# Decoding-sized queries: the CPU forward packs the rows of all query heads of a kv head into
# one tile (csrc/cpu/tiling.h forward_plan), and with few tiles (B * Hkv = 1 here, S > 1024)
# splits the keys across threads. Bottom-right is the decoding alignment.
DECODE_CASES = [
    Case(batch=1, heads_q=32, heads_kv=8, len_q=1, len_k=301, id="L1-gqa32/8"),
    Case(batch=1, heads_q=32, heads_kv=8, len_q=3, len_k=301, causal=True, bottom_right=True, id="L3-gqa-causal-br"),
    Case(batch=2, heads_q=32, heads_kv=8, len_q=16, len_k=257, window=(40, 0), bottom_right=True, id="L16-gqa-win-br"),
    Case(batch=1, heads_q=8, heads_kv=2, len_q=16, len_k=203, window=(3, 5), id="L16-gqa-win-tl"),
    Case(batch=1, heads_q=8, heads_kv=2, len_q=3, len_k=301, causal=True, id="L3-gqa-causal-tl"),
    Case(batch=1, heads_q=8, heads_kv=2, len_q=16, len_k=5, causal=True, bottom_right=True, id="L>S-causal-br"),
    Case(batch=1, heads_q=8, heads_kv=1, len_q=1, len_k=1537, id="L1-mqa-split"),
    Case(batch=1, heads_q=8, heads_kv=1, len_q=3, len_k=1537, causal=True, bottom_right=True, id="L3-mqa-split-br"),
    Case(batch=1, heads_q=8, heads_kv=1, len_q=16, len_k=1029, window=(100, 5), bottom_right=True, id="L16-mqa-win"),
    Case(batch=2, heads_q=4, heads_kv=4, len_q=1, len_k=77, id="L1-mha"),
    # items of at most 8 rows run query-major (kernels_impl.inc decode_tile): a band per row
    Case(batch=2, heads_q=8, heads_kv=2, len_q=2, len_k=190, window=(30, 0), bottom_right=True, id="L2-gqa-win-br"),
    Case(batch=1, heads_q=2, heads_kv=2, len_q=7, len_k=140, causal=True, mask="bool", id="L7-mha-causal-mask"),
    # groups of 17-32 rows take 32-row tiles (tiling.h forward_block_q): unpacked, and packed across heads
    Case(batch=2, heads_q=4, heads_kv=4, len_q=29, len_k=200, window=(40, 3), mask="float", id="L29-mha-win-mask"),
    Case(batch=1, heads_q=8, heads_kv=2, len_q=5, len_k=333, causal=True, bottom_right=True, id="L5-gqa4-causal-br"),
    Case(batch=1, heads_q=4, heads_kv=2, len_q=9, len_k=133, causal=True, bottom_right=True, id="L9-gqa2-unpacked"),
    Case(batch=1, heads_q=32, heads_kv=8, len_q=3, len_k=301, mask="bool", id="L3-gqa-mask-bool"),
    Case(batch=1, heads_q=32, heads_kv=8, len_q=1, len_k=301, mask="float-bcast", id="L1-gqa-mask-float-bcast"),
    Case(batch=1, heads_q=8, heads_kv=2, len_q=16, len_k=150, mask="bool-bcast", window=(20, 0), bottom_right=True,
         id="L16-gqa-mask-bool-bcast-win"),
    Case(batch=1, heads_q=8, heads_kv=1, len_q=3, len_k=1537, mask="float", id="L3-mqa-split-mask-float"),
    Case(batch=1, heads_q=8, heads_kv=1, len_q=3, len_k=1100, mask="bool", id="L3-mqa-split-mask-bool"),
    Case(batch=1, heads_q=8, heads_kv=2, len_q=3, len_k=301, dropout_p=0.2, causal=True, bottom_right=True,
         id="L3-gqa-dropout"),
    Case(batch=1, heads_q=8, heads_kv=1, len_q=1, len_k=1537, dropout_p=0.3, id="L1-mqa-split-dropout"),
    Case(batch=1, heads_q=8, heads_kv=2, len_q=1, len_k=301, layout="transposed", id="L1-gqa-transposed"),
]
HEAD_DIMS = [16, 17, 33, 40, 72, 80, 100, 128, 160, 256]


def run_case(case: Case, dtype, backend, seed, device="cpu", mask_grad=False, mask=None):
    """Forward and backward of `case` against the float64 reference; `mask`, if given, replaces
    the one make_inputs builds from case.mask."""
    q, k, v, made = make_inputs(case, dtype, device)
    mask = made if mask is None else mask
    if mask_grad:
        mask = mask.detach().requires_grad_(True)
    torch.manual_seed(seed)
    out = case_attention(case, q, k, v, mask, backend)
    grad_out = torch.randn_like(out)
    inputs = [q, k, v] + ([mask] if mask_grad else [])
    grads = torch.autograd.grad(out, inputs, grad_out)
    ref_out, ref_grads = reference_forward_backward(case, q, k, v, mask, grad_out, seed, mask_grad=mask_grad)
    assert_close(out, ref_out, dtype, "out")
    for name, g, r in zip(("dq", "dk", "dv", "dmask"), grads, ref_grads):
        assert g.dtype == inputs[0].dtype if name != "dmask" else True
        assert_close(g, r, dtype, name)
    return out, grads


@pytest.mark.parametrize("backend", device_backends("cpu"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_parity(case, dtype, backend, seed):
    run_case(case, dtype, backend, seed)


@pytest.mark.parametrize("backend", device_backends("cpu"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: c.id)
def test_decode(case, dtype, backend, seed):
    run_case(case, dtype, backend, seed)


# The CPU's query-major decode tiles (kernels_impl.inc decode_tile: items of at most 8 rows)
# read K and V rows in place, whole, kW keys or 2 at a time and a vector of the head dim at a
# time: head dims with a partial last vector, V narrower than K, rows in groups of 4 with a
# remainder (1, 3, 5, 8 rows), rows far apart in memory (BLHD: prefetched), key counts that leave
# a partial key group, and a key split over threads.
DECODE_TILE_CASES = [
    Case(batch=1, heads_q=8, heads_kv=2, len_q=1, len_k=300, head_dim=17, id="L1-gqa4-d17"),
    Case(batch=2, heads_q=8, heads_kv=2, len_q=2, len_k=150, head_dim=100, head_dim_v=40, layout="transposed",
         causal=True, bottom_right=True, id="L2-gqa4-d100-ev40-blhd-causal"),
    Case(batch=1, heads_q=6, heads_kv=2, len_q=1, len_k=141, head_dim=40, layout="transposed", id="L1-gqa3-d40-blhd"),
    Case(batch=1, heads_q=5, heads_kv=1, len_q=1, len_k=1030, head_dim=33, id="L1-mqa5-d33-split"),
    Case(batch=1, heads_q=1, heads_kv=1, len_q=1, len_k=9, head_dim=8, id="L1-mha-d8-9keys"),
    # one and two rows per item: the output in registers, in chunks of whole vectors, then single
    # vectors and a tail (150 and 83 columns: every part on AVX2's 8 and AVX-512's 16 lanes)
    Case(batch=2, heads_q=2, heads_kv=2, len_q=1, len_k=140, head_dim=150, id="L1-mha-d150"),
    Case(batch=1, heads_q=4, heads_kv=2, len_q=1, len_k=200, head_dim=83, id="L1-gqa2-d83"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", DECODE_TILE_CASES, ids=lambda c: c.id)
def test_cpu_decode_tile(case, dtype, seed):
    if "cpu" not in device_backends("cpu"):
        pytest.skip("the CPU extension is not built")
    run_case(case, dtype, "cpu", seed)


@pytest.mark.parametrize("backend", device_backends("cpu"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_head_dims(head_dim, dtype, backend, seed):
    run_case(Case(head_dim=head_dim, len_q=45, len_k=70, causal=head_dim % 2 == 0, id=""), dtype, backend, seed)


# Long key ranges: the CPU backward walks keys in superblocks of four 128-key blocks on its fp32
# and conversion paths (csrc/cpu/kernels_impl.inc backward_sub_blocks), sharing each query tile's
# packed operands; these cases span several superblocks, a tail block, query tiles that only some
# blocks of a superblock reach (causal, window), key parts (B * Hkv = 2: the dQ accumulators are
# split by keys), and the per-block dropout and mask-gradient addressing.
SUPERBLOCK_CASES = [
    Case(batch=2, heads_q=4, heads_kv=4, len_q=1100, len_k=1100, causal=True, id="causal-1100"),
    Case(batch=1, heads_q=4, heads_kv=2, len_q=700, len_k=1300, window=(150, 40), bottom_right=True,
         id="window-br-parts"),
    Case(batch=2, heads_q=4, heads_kv=4, len_q=640, len_k=700, dropout_p=0.2, causal=True, id="dropout-causal"),
    Case(batch=2, heads_q=2, heads_kv=1, len_q=200, len_k=1100, mask="float", id="mask-float-grad"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", SUPERBLOCK_CASES, ids=lambda c: c.id)
def test_backward_key_superblocks(case, dtype, seed):
    run_case(case, dtype, "cpu", seed, mask_grad=case.mask is not None)


# Score maxima that jump from key block to key block, by more and by less than the CPU forward's
# lazy-rescale threshold (2^8, csrc/cpu/kernels_impl.inc kLazyRescale): the keys of block j carry a
# component c_j along a direction every query leans into, so a row's block max passes its running
# max by more than 8 (log2) at blocks 1 and 4, by less at 2, 5 and 6, and falls at 3; the last
# block's 4 keys jump by over 128 (log2), where weights against a stale max would overflow fp32.
@pytest.mark.parametrize("backend", device_backends("cpu"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_running_max_jumps_between_key_blocks(causal, dtype, backend, seed):
    B, L, S, H, D = 2, 90, 900, 3, 64
    steps = torch.tensor([0.0, 14.0, 15.0, 3.0, 30.0, 31.0, 31.5, 300.0])  # per 128-key block
    u = torch.nn.functional.normalize(torch.randn(D, dtype=torch.float64), dim=0)
    q = torch.randn(B, L, H, D, dtype=torch.float64)
    q = q - (q @ u)[..., None] * u + 4.0 * u  # (no noise along u: a block's scores stay within a few units)
    c = steps[(torch.arange(S) // 128).clamp(max=len(steps) - 1)].double()
    k = torch.randn(B, S, H, D, dtype=torch.float64) + c[None, :, None, None] * u
    v = torch.randn(B, S, H, D, dtype=torch.float64)
    q, k, v = (t.to(dtype).requires_grad_(True) for t in (q, k, v))
    out, lse = attnkern.flash_attn_func(q, k, v, causal=causal, return_lse=True, backend=backend)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    want, want_lse = attnkern.flash_attn_func(q64, k64, v64, causal=causal, return_lse=True, backend="math")
    assert_close(out, want, dtype, "out")
    assert_lse_close(lse, want_lse, torch.float32 if dtype == torch.float32 else dtype)
    if dtype == torch.float32:
        # (in 16 bits, dq is ill-conditioned here: the keys' huge common component cancels in
        # sum_j dS_ij k_j only up to the rounding of the stored output, in every flash backward)
        grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        want_grads = torch.autograd.grad(want, (q64, k64, v64), grad_out.double())
        for name, g, r in zip(("dq", "dk", "dv"), grads, want_grads):
            assert_close(g, r, dtype, name)


@pytest.mark.parametrize("backend", device_backends("cpu"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", ["full", "bcast"])
def test_float_mask_gradient(shape, dtype, backend, seed):
    case = Case(mask="float" if shape == "full" else "float-bcast", len_q=50, len_k=60, causal=True, id="")
    run_case(case, dtype, backend, seed, mask_grad=True)


@pytest.mark.parametrize("backend", device_backends("cpu"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_matches_reference(p, dtype, backend, seed):
    """Same torch seed -> the same Philox dropout pattern as the reference, forward and backward."""
    run_case(Case(dropout_p=p, heads_q=4, heads_kv=2, len_q=70, len_k=90, id=""), dtype, backend, seed)


@pytest.mark.parametrize("backend", device_backends("cpu"))
def test_dropout_statistics_and_reproducibility(backend, seed):
    # with v = one-hot columns the output row i equals the kept, rescaled attention weights
    L, S, p = 64, 256, 0.3
    q = torch.zeros(1, 1, L, 8)  # uniform attention: every weight is 1/S
    k = torch.randn(1, 1, S, 8)
    v = torch.eye(S).view(1, 1, S, S)
    torch.manual_seed(seed)
    a = attnkern.scaled_dot_product_attention(q, k, v, dropout_p=p, backend=backend)
    torch.manual_seed(seed)
    b = attnkern.scaled_dot_product_attention(q, k, v, dropout_p=p, backend=backend)
    c = attnkern.scaled_dot_product_attention(q, k, v, dropout_p=p, backend=backend)
    assert torch.equal(a, b), "same seed must reproduce the same dropout mask"
    assert not torch.equal(a, c), "a new draw must give a new mask"
    kept = (a > 0).double().mean().item()
    # 16384 Bernoulli(0.7) draws: std ~0.0036, so 0.02 is > 5 sigma
    assert abs(kept - (1 - p)) < 0.02, f"kept fraction {kept:.4f}, expected {1 - p}"
    expected = 1.0 / (S * (1 - p))
    assert torch.allclose(a[a > 0], torch.full_like(a[a > 0], expected), rtol=1e-5)


@pytest.mark.parametrize("backend", device_backends("cpu"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "len_q,len_k,causal,window",
    [(40, 90, True, (-1, -1)), (90, 40, True, (-1, -1)), (70, 70, False, (8, 0)), (50, 120, False, (4, 4)),
     (120, 50, True, (16, -1))],
)
def test_flash_attn_func_bottom_right(len_q, len_k, causal, window, dtype, backend, seed):
    """flash_attn_func: (B, L, H, D) layout, bottom-right alignment, GQA, LSE."""
    B, H, Hkv, D = 2, 4, 2, 64
    q = torch.randn(B, len_q, H, D, dtype=dtype, requires_grad=True)
    k = torch.randn(B, len_k, Hkv, D, dtype=dtype, requires_grad=True)
    v = torch.randn(B, len_k, Hkv, D, dtype=dtype, requires_grad=True)
    out, lse = attnkern.flash_attn_func(q, k, v, causal=causal, window_size=window, return_lse=True, backend=backend)
    assert out.shape == (B, len_q, H, D) and lse.shape == (B, H, len_q) and lse.dtype == torch.float32
    g_out = torch.randn_like(out)
    g_lse = torch.randn_like(lse)
    finite = torch.isfinite(lse)
    loss = (out * g_out).sum() + (lse.where(finite, 0) * g_lse).sum()
    grads = torch.autograd.grad(loss, (q, k, v))

    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref_out, ref_lse = attnkern.flash_attn_func(q64, k64, v64, causal=causal, window_size=window, return_lse=True,
                                                backend="math")
    assert torch.equal(torch.isfinite(ref_lse), finite), "rows without keys must have lse -inf"
    ref_loss = (ref_out * g_out.double()).sum() + (ref_lse.where(finite, 0) * g_lse.double()).sum()
    ref_grads = torch.autograd.grad(ref_loss, (q64, k64, v64))
    assert_close(out, ref_out, dtype, "out")
    assert_close(lse.where(finite, 0), ref_lse.where(finite, 0), torch.float32 if dtype == torch.float32 else dtype,
                 "lse")
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(g, r, dtype, name)


@pytest.mark.parametrize("backend", device_backends("cpu"))
def test_fully_masked_rows_give_zero_and_finite_gradients(backend, seed):
    L, S = 20, 30
    q, k, v = (torch.randn(1, 2, n, 16, requires_grad=True) for n in (L, S, S))
    mask = torch.rand(1, 2, L, S) > 0.5
    mask[:, :, 3] = False
    float_mask = torch.zeros(1, 2, L, S).masked_fill(~mask, float("-inf"))
    for m in (mask, float_mask):
        out = attnkern.scaled_dot_product_attention(q, k, v, attn_mask=m, backend=backend)
        assert torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3]))
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        assert all(torch.isfinite(g).all() for g in grads)
        assert torch.equal(grads[0][:, :, 3], torch.zeros_like(grads[0][:, :, 3]))
    # bottom-right causal with L > S: the first L - S rows see no key, LSE -inf
    qf = torch.randn(1, 10, 2, 16, requires_grad=True)
    kf, vf = torch.randn(1, 4, 2, 16), torch.randn(1, 4, 2, 16)
    out, lse = attnkern.flash_attn_func(qf, kf, vf, causal=True, return_lse=True, backend=backend)
    assert torch.equal(out[:, :6], torch.zeros_like(out[:, :6]))
    assert torch.isneginf(lse[:, :, :6]).all() and torch.isfinite(lse[:, :, 6:]).all()
    (g,) = torch.autograd.grad(out.sum(), qf)
    assert torch.equal(g[:, :6], torch.zeros_like(g[:, :6]))


@pytest.mark.parametrize("backend", device_backends("cpu"))
@pytest.mark.parametrize("len_q,len_k", [(0, 10), (10, 0), (0, 0)])
def test_empty_sequences(len_q, len_k, backend):
    q = torch.randn(2, 3, len_q, 16, requires_grad=True)
    k = torch.randn(2, 3, len_k, 16, requires_grad=True)
    v = torch.randn(2, 3, len_k, 24, requires_grad=True)
    out = attnkern.scaled_dot_product_attention(q, k, v, backend=backend)
    assert out.shape == (2, 3, len_q, 24)
    assert torch.equal(out, torch.zeros_like(out))
    grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
    for g, t in zip(grads, (q, k, v)):
        assert g is None or (g.shape == t.shape and torch.equal(g, torch.zeros_like(g)))


@pytest.mark.parametrize("backend", device_backends("cpu"))
def test_output_layout_follows_query(backend):
    """flash layout in -> flash layout out (no hidden copies); torch layout -> contiguous."""
    q, k, v = (torch.randn(2, 50, 4, 32) for _ in range(3))
    out = attnkern.flash_attn_func(q, k, v, backend=backend)
    assert out.is_contiguous()
    q2, k2, v2 = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    out2 = attnkern.scaled_dot_product_attention(q2, k2, v2, backend=backend)
    assert out2.is_contiguous()
    torch.testing.assert_close(out, out2.transpose(1, 2))


def test_auto_never_fails_where_math_succeeds(seed):
    q = torch.randn(1, 2, 9, 8, dtype=torch.float64)
    out = attnkern.scaled_dot_product_attention(q, q, q)  # float64: no fused backend takes it
    ref = attnkern.scaled_dot_product_attention(q, q, q, backend="math")
    assert torch.equal(out, ref)
    assert "math" in attnkern.available_backends()


# Mask layouts, each taking its own route through the CPU kernels' mask code (apply_mask):
# a row shared by the whole tile (padding broadcast over queries), rows with contiguous keys
# (transposed in registers), and other strides. Bool masks have whole key blocks (128 keys)
# True and False and fully masked rows; float masks carry -inf where a bool one would be False.
def _layout_mask(layout: str, kind: str, B: int, H: int, L: int, S: int, dtype):
    if layout == "key-padding":  # (B,1,1,S): batch b keeps its first S - 130 b keys, the last none
        keep = torch.arange(S)[None, :] < torch.tensor([S - 130 * b for b in range(B - 1)] + [0])[:, None]
        keep = keep[:, None, None, :]
    elif layout == "head-padding":  # (1,H,1,S): differs per head, so a packed tile mixes rows
        keep = torch.rand(1, H, 1, S) > 0.3
        keep[:, 1] = False
    elif layout == "rows":  # (B,1,L,S) contiguous
        keep = torch.rand(B, 1, L, S) > 0.3
        keep[..., 128:256] = True
        keep[:, :, :, 256:] = False
        keep[:, :, :, 256:] |= torch.rand(B, 1, L, S - 256) > 0.9
        keep[:, :, 0] = False
    elif layout == "transposed":  # (B,H,L,S) view of (B,H,S,L) memory: keys strided
        keep = (torch.rand(B, H, S, L) > 0.3).transpose(-1, -2)
        keep[:, :, 0] = False
    else:  # "query-padding", (B,1,L,1): keys broadcast, rows differ
        keep = torch.rand(B, 1, L, 1) > 0.2
        keep[:, :, 0] = False
    if kind == "bool":
        return keep
    values = torch.randn(keep.shape, dtype=torch.float64).masked_fill(~keep, float("-inf"))
    if layout == "transposed":  # keep the strided storage
        values = values.transpose(-1, -2).contiguous().transpose(-1, -2)
    return values.to(torch.float32 if kind == "float32" else dtype)


@pytest.mark.parametrize("backend", device_backends("cpu"))
@pytest.mark.parametrize("dtype,kind", [(d, k) for d in DTYPES for k in ("bool", "float", "float32")
                                        if not (k == "float32" and d == torch.float32)],
                         ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("len_q", [70, 1, 3, 16], ids=lambda n: f"L{n}")
@pytest.mark.parametrize("layout", ["key-padding", "head-padding", "rows", "transposed", "query-padding"])
def test_mask_layouts(layout, len_q, dtype, kind, backend, seed):
    """Forward, backward and (float) mask gradient for each mask layout; L <= 16 with GQA 8/2
    runs the packed decoding tiles, whose rows span heads."""
    case = Case(batch=3, heads_q=8, heads_kv=2, len_q=len_q, len_k=300, head_dim=32, id="")
    mask = _layout_mask(layout, kind, 3, 8, len_q, 300, dtype)
    # a mask constant along the keys shifts every score of a row alike: its gradient is exactly
    # 0 and the kernels' is rounding noise, so it is not compared
    mask_grad = kind != "bool" and layout != "query-padding"
    out, _ = run_case(case, dtype, backend, seed, mask_grad=mask_grad, mask=mask)
    # rows that attend no key are exactly 0
    keep = mask if kind == "bool" else mask > float("-inf")
    empty = ~keep.expand(3, 8, len_q, 300).any(-1)
    assert empty.any()
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))
