"""Packed (varlen) and paged (kvcache) calls on the CUDA backend's kernels (csrc/cuda, the
varlen variants of fwd_kernel / bwd_kv_kernel / bwd_q_kernel), run by the CPU emulator (see
tests/test_cuda.py) against the float64 reference of attnkern.reference_varlen, and on a GPU
where one exists (marked gpu)."""

from __future__ import annotations

import pytest
import torch

import attnkern
from attnkern import _varlen_semantics, dispatch, ops, ops_varlen, reference_varlen
from conftest import TOLERANCE, assert_close

HALF = [torch.float16, torch.bfloat16]


def cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def randn(*shape, dtype):
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


def paged(k, v, lengths, page, spare=3):
    """The packed keys of each sequence scattered over shuffled pages (NaN in the unused rows)."""
    per_seq = [-(-n // page) for n in lengths]
    num = sum(per_seq) + spare
    order = torch.randperm(num)
    width = max(max(per_seq, default=0), 1)
    table = torch.full((len(lengths), width), num + 7, dtype=torch.int32)  # past the cache: must never be read
    kp = torch.full((num, page) + tuple(k.shape[1:]), float("nan"), dtype=k.dtype)
    vp = torch.full((num, page) + tuple(v.shape[1:]), float("nan"), dtype=v.dtype)
    start, used = 0, 0
    for b, n in enumerate(lengths):
        for j in range(per_seq[b]):
            slot = int(order[used])
            used += 1
            table[b, j] = slot
            rows = slice(start + j * page, start + min(n, (j + 1) * page))
            kp[slot, : rows.stop - rows.start] = k[rows]
            vp[slot, : rows.stop - rows.start] = v[rows]
        start += n
    return kp, vp, table


def check_forward(out, lse, ref_out, ref_lse, dtype, end_q):
    assert_close(out, ref_out, dtype, "out")
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "rows without keys have LSE -inf, only they"
    fin = torch.isfinite(ref_lse)
    assert (lse[fin].double() - ref_lse[fin]).abs().max().item() < 50 * TOLERANCE[dtype] + 1e-5
    assert out[end_q:].eq(0).all(), "rows past cu_seqlens_q[-1] output 0"


# (lengths_q, lengths_k, heads_q, heads_kv, head_dim, head_dim_v, window (causal folded in), extra rows, seqused_k)
PREFILL_CASES = {
    "ragged-zero-lengths-gqa": ([37, 0, 70, 5, 0], [37, 20, 90, 0, 0], 4, 2, 64, 64, (-1, -1), 3, None),
    "causal-cross": ([20, 45], [33, 130], 2, 1, 32, 32, (-1, 0), 0, None),
    "window-padded-dims": ([66, 17], [66, 40], 2, 2, 40, 24, (12, 4), 5, None),
    "seqused-causal": ([18, 30, 3], [64, 80, 30], 2, 2, 32, 32, (-1, 0), 0, [10, 80, 0]),
}


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name", list(PREFILL_CASES))
def test_emulated_varlen_prefill(emu, name, dtype, seed):
    """The prefill kernels' varlen variants, forward and backward: one launch over the pack,
    each sequence bottom-right aligned with its own band, zero-length sequences in q, k or both,
    rows past cu_seqlens_q[-1] (output 0, gradient 0), keys past seqused_k (gradient 0)."""
    lq, lk, hq, hkv, e, ev, window, extra, used = PREFILL_CASES[name]
    if dtype == torch.bfloat16 and name in ("causal-cross", "window-padded-dims"):
        pytest.skip("bf16 on two cases keeps the runtime small")
    q = randn(sum(lq) + extra, hq, e, dtype=dtype)
    k = randn(sum(lk) + extra, hkv, e, dtype=dtype)
    v = randn(sum(lk) + extra, hkv, ev, dtype=dtype)
    cq, ck = cu(lq), cu(lk)
    seqused = None if used is None else torch.tensor(used, dtype=torch.int32)
    scale = e ** -0.5
    emu.set_options(True, 0, seed)
    out, lse = emu.varlen_fwd(q, k, v, cq, ck, seqused, None, scale, *window, 4)
    assert out.shape == (q.shape[0], hq, ev) and lse.shape == (hq, q.shape[0]) and out.is_contiguous()

    q64, k64, v64 = (t.double().requires_grad_(True) for t in (q, k, v))
    ref_out, ref_lse = reference_varlen.varlen_attention(q64, k64, v64, cq, ck, scale, *window, seqused)
    check_forward(out, lse, ref_out, ref_lse, dtype, int(cq[-1]))

    grad_out = randn(*out.shape, dtype=dtype)
    grad_lse = torch.randn(lse.shape).where(torch.isfinite(lse), 0)
    emu.set_options(True, 0, seed)
    dq, dk, dv = emu.varlen_bwd(grad_out, grad_lse, q, k, v, out, lse, cq, ck, seqused, scale, *window)
    loss = (ref_out * grad_out.double()).sum() + (ref_lse.where(torch.isfinite(ref_lse), 0) * grad_lse.double()).sum()
    refs = torch.autograd.grad(loss, (q64, k64, v64))
    for g, r, what in zip((dq, dk, dv), refs, ("dq", "dk", "dv")):
        assert g.shape == r.shape and g.dtype == dtype, what
        assert_close(g, r, dtype, what)
    assert dq[int(cq[-1]):].eq(0).all() and dk[int(ck[-1]):].eq(0).all() and dv[int(ck[-1]):].eq(0).all()


# (lengths_q (<= 16), lengths_k, heads_q, heads_kv, head_dim, window, page size, sm_count)
DECODE_CASES = {
    "page1-gqa8-split": ([1, 1, 1], [0, 190, 33], 8, 1, 64, (-1, 0), 1, 40),
    "page16-causal-l16": ([16, 4], [300, 4], 4, 2, 32, (-1, 0), 16, 40),
    "page7-window-unsplit": ([3, 1, 0], [80, 9, 50], 4, 2, 64, (20, 0), 7, 0),
    "packed-keys-noncausal": ([2, 5], [100, 61], 2, 2, 96, (-1, -1), 0, 40),
}


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_emulated_varlen_decode(emu, name, dtype, seed):
    """L <= 16: the split-KV decode kernel's varlen variant, with per-sequence key counts and
    keys read through the block table at any page size, split over CTAs (sm_count 40) and
    merged, or not (0); cache rows past a sequence's count hold NaN and table entries past its
    pages point outside the cache, so reading either fails."""
    lq, lk, hq, hkv, e, window, page, sm_count = DECODE_CASES[name]
    if dtype == torch.bfloat16 and name in ("page16-causal-l16", "packed-keys-noncausal"):
        pytest.skip("bf16 on two cases keeps the runtime small")
    q = randn(sum(lq), hq, e, dtype=dtype)
    k = randn(sum(lk), hkv, e, dtype=dtype)
    v = randn(sum(lk), hkv, e, dtype=dtype)
    cq, ck = cu(lq), cu(lk)
    table = None
    kk, vv = k, v
    if page:
        kk, vv, table = paged(k, v, lk, page)
    emu.set_options(True, 2, seed)
    out, lse = emu.varlen_fwd(q, kk, vv, cq, ck, None, table, e ** -0.5, *window, sm_count)
    stats = emu.stats()
    ref_out, ref_lse = reference_varlen.varlen_attention(q.double(), k.double(), v.double(), cq, ck, e ** -0.5,
                                                         *window)
    check_forward(out, lse, ref_out, ref_lse, dtype, int(cq[-1]))
    assert stats["mma"] > 0


def test_emulated_varlen_decode_splits_the_keys(emu, seed):
    """With many SMs the decode path splits each sequence's keys over CTAs (more CTAs than
    (tile, kv head, sequence) triples) and still matches the unsplit result to rounding."""
    lq, lk = [1, 1], [1500, 260]
    q = randn(2 + 2, 4, 64, dtype=torch.float16)  # 2 rows past cu_seqlens_q[-1]: no split writes them
    k, v = randn(1760, 1, 64, dtype=torch.float16), randn(1760, 1, 64, dtype=torch.float16)
    kp, vp, table = paged(k, v, lk, 16)
    runs = {}
    for sm_count in (0, 60):
        emu.set_options(True, 0, seed)
        runs[sm_count] = emu.varlen_fwd(q, kp, vp, cu(lq), cu(lk), None, table, 0.125, -1, 0, sm_count)
        runs[sm_count, "ctas"] = emu.stats()["ctas"]
    assert runs[60, "ctas"] > 4 * runs[0, "ctas"], runs
    assert_close(runs[60][0], runs[0][0], torch.float16, "split vs unsplit")
    out, lse = runs[60]
    assert out[2:].eq(0).all() and lse[:, 2:].eq(float("-inf")).all(), "the merge leaves rows of no sequence 0, -inf"


def _kvcache_through_emulator(emu, monkeypatch, sm_count=40):
    """flash_attn_with_kvcache's Python path (append, rotary, cache_batch_idx as a one-page-per-row
    table) with its packed op served by the emulated kernels."""
    def emulated(q, k, v, cq, ck, seqused, table, scale, left, right, softcap=0.0, sinks=None, alibi=None,
                 dropout_p=0.0, rng_seed=None):
        assert softcap == 0.0 and sinks is None and alibi is None
        return emu.varlen_fwd(q, k, v, cq, ck, seqused, table, scale, left, right, sm_count, dropout_p)

    monkeypatch.setattr(ops_varlen, "varlen_fwd", emulated)


@pytest.mark.parametrize("case", ["batch-idx-rotary", "paged-odd-append"])
def test_emulated_kvcache(emu, monkeypatch, case, seed):
    """In-place append, rotary (torch), cache_batch_idx and paged caches, decode L <= 16."""
    _kvcache_through_emulator(emu, monkeypatch)
    dtype = torch.float16 if case == "paged-odd-append" else torch.bfloat16
    B, Lq, H, Hk, E, S = 3, 2, 4, 2, 32, 60
    q = randn(B, Lq, H, E, dtype=dtype)
    k_new, v_new = randn(B, Lq, Hk, E, dtype=dtype), randn(B, Lq, Hk, E, dtype=dtype)
    seqlens = torch.tensor([0, 41, S - Lq], dtype=torch.int32)
    kc, vc = randn(4, S, Hk, E, dtype=dtype), randn(4, S, Hk, E, dtype=dtype)
    cos = sin = batch_idx = table = None
    if case == "batch-idx-rotary":
        theta = torch.rand(S, 8, dtype=torch.float64) * 6.28
        cos, sin = torch.cos(theta).float(), torch.sin(theta).float()
        batch_idx = torch.tensor([3, 0, 2], dtype=torch.int32)
    else:
        page = 7
        per = -(-S // page)
        table = torch.randperm(B * per + 2)[: B * per].view(B, per).to(torch.int32)
        kp = randn(B * per + 2, page, Hk, E, dtype=dtype)
        vp = randn(B * per + 2, page, Hk, E, dtype=dtype)
        kc, vc = kp, vp
    ref_out, ref_lse, ref_k, ref_v = reference_varlen.kvcache_attention(
        q.double(), kc.double(), vc.double(), k_new.double(), v_new.double(), cos, sin, seqlens, batch_idx, table,
        E ** -0.5, -1, 0, True,
    )
    out, lse = attnkern.flash_attn_with_kvcache(q, kc, vc, k_new, v_new, cos, sin, seqlens, batch_idx, None, table,
                                                None, True, return_softmax_lse=True, backend="cpu")
    assert_close(out, ref_out, dtype, "out")
    assert_close(lse, ref_lse, dtype, "lse")
    assert_close(kc, ref_k, dtype, "k_cache after the append")


def test_emulated_varlen_bad_indices(emu):
    """The op checks every index on the host before a kernel reads through it."""
    q, k = torch.randn(6, 2, 16).half(), torch.randn(6, 2, 16).half()
    with pytest.raises(ValueError, match="cu_seqlens_k must be non-decreasing"):
        emu.varlen_fwd(q, k, k, cu([3, 3]), torch.tensor([0, 4, 2], dtype=torch.int32), None, None, 0.25, -1, -1, 4)
    pages = torch.randn(3, 4, 2, 16).half()
    with pytest.raises(ValueError, match=r"block_table\[1, 0\] = 3 is outside the cache's 3 blocks"):
        emu.varlen_fwd(q, pages, pages, cu([3, 3]), cu([4, 2]), None, torch.tensor([[0], [3]], dtype=torch.int32),
                       0.25, -1, -1, 4)
    with pytest.raises(ValueError, match="cu_seqlens_q must be contiguous"):
        emu.varlen_fwd(q, k, k, cu([3, 0, 3, 0])[::2], cu([3, 3]), None, None, 0.25, -1, -1, 4)
    with pytest.raises(ValueError, match="float16 and bfloat16"):
        emu.varlen_fwd(q.float(), k.float(), k.float(), cu([3, 3]), cu([3, 3]), None, None, 0.25, -1, -1, 4)


def test_emulated_varlen_backward_of_huge_tied_scores(emu, seed):
    """The huge-LSE rare path (csrc/mask.h kHugeLse) in the varlen backward: every key of the
    first sequence ties at a score of 3.2e9 (exact in fp16 inputs and fp32 sums), so its fp32 LSE
    has lost log(sum); the op recomputes the rows' (max, log2 sum) with the varlen prefill kernel
    and the passes take P from them. The second sequence is ordinary and keeps the usual path.
    A window side of 2^62 (past every sequence) must act as unbounded (-1)."""
    lq, lk = [3, 18], [40, 30]
    q, k, v = randn(21, 2, 32, dtype=torch.float16), randn(70, 1, 32, dtype=torch.float16), randn(
        70, 1, 32, dtype=torch.float16)
    q[:3], k[:40] = 1e4, 1e4
    cq, ck = cu(lq), cu(lk)
    emu.set_options(True, 0, seed)
    out, lse = emu.varlen_fwd(q, k, v, cq, ck, None, None, 1.0, 2**62, 0, 0)
    assert (lse[:, :3] > 1e9).all() and (lse[:, 3:].abs() < 1024).all()
    g = randn(*out.shape, dtype=torch.float16)
    emu.set_options(True, 0, seed)
    dq, dk, dv = emu.varlen_bwd(g, None, q, k, v, out, lse, cq, ck, None, 1.0, 2**62, 0)
    inputs = [t.double().requires_grad_(True) for t in (q, k, v)]
    want, _ = reference_varlen.varlen_attention(*inputs, cq, ck, 1.0, -1, 0)
    assert_close(out, want, torch.float16, "out")
    want_grads = torch.autograd.grad(want, inputs, g.double())
    # dq of tied keys is 1e4 * sum_j dS_j = 0 exactly, so what the kernel returns is the fp16
    # rounding of dS (one ulp at most, 2^-11 relative) times 1e4: bounded by the reference's dS
    # (a P off by the lost log(sum) is caught by dk and dv, 40x off)
    p_ref = torch.zeros(3, 2, 40, dtype=torch.float64)
    for i in range(3):
        p_ref[i, :, : 38 + i] = 1.0 / (38 + i)  # bottom-right causal: query i sees keys 0 .. 37 + i
    dp = torch.einsum("ihd,jd->ihj", g[:3].double(), v[:40, 0].double())
    ds = p_ref * (dp - (p_ref * dp).sum(-1, keepdim=True))
    bound = 1e4 * 2**-11 * ds.abs().sum(-1)  # (query, head)
    assert (dq[:3].double().abs().amax(-1) <= bound * 1.5 + 1e-3).all(), (dq[:3].abs().amax(-1), bound)
    assert_close(dq[3:], want_grads[0][3:], torch.float16, "dq of the ordinary sequence")
    for name, got, ref in zip(("dk", "dv"), (dk, dv), want_grads[1:]):
        assert_close(got, ref, torch.float16, name)


def test_emulated_varlen_refuses_dropout(emu):
    q = torch.randn(4, 2, 16).half()
    for call in (lambda: emu.varlen_fwd(q, q, q, cu([4]), cu([4]), None, None, 0.25, -1, -1, 0, 0.1),
                 lambda: emu.varlen_bwd(q, None, q, q, q, q, torch.zeros(2, 4), cu([4]), cu([4]), None, 0.25, -1, -1,
                                        0.1)):
        with pytest.raises(NotImplementedError, match=r"no dropout yet \(dropout_p=0.1\)"):
            call()


def test_packed_dispatch_row_for_cuda():
    import dataclasses

    problem = _varlen_semantics.VarlenProblem(
        batch=2, heads_q=4, heads_kv=2, total_q=10, head_dim=64, head_dim_v=64, scale=0.125, window_left=-1,
        window_right=0, page_size=0, dtype=torch.bfloat16, device_type="cuda",
    )
    # what the varlen variants do not serve, on any machine: dropout and the score modifiers
    dropped = dataclasses.replace(problem, dropout_p=0.25)
    assert "dropout_p" in dispatch.PACKED_WHY_NOT["cuda"](dropped)
    assert dispatch.choose_packed(dropped, "auto") != "cuda"  # Triton (on a GPU) or math
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run this call.*dropout"):
        dispatch.choose_packed(dropped, "cuda")
    for modifier in (dict(softcap=5.0), dict(has_sinks=True), dict(has_alibi=True)):
        modified = dataclasses.replace(problem, **modifier)
        assert dispatch.PACKED_WHY_NOT["cuda"](modified)
        assert dispatch.choose_packed(modified, "auto") != "cuda"
    reason = dispatch.PACKED_WHY_NOT["cuda"](problem)
    if ops._C_cuda is None or not torch.cuda.is_available():
        assert reason  # no extension or no device here
        with pytest.raises(RuntimeError, match="backend='cuda' cannot run this call"):
            dispatch.choose_packed(problem, "cuda")
        assert dispatch.choose_packed(problem, "auto") != "cuda"
        return
    assert reason is None
    assert "softcap" in dispatch.PACKED_WHY_NOT["cuda"](dataclasses.replace(problem, softcap=5.0))
    assert "float16 and bfloat16" in dispatch.PACKED_WHY_NOT["cuda"](dataclasses.replace(problem, dtype=torch.float32))
    # Triton leads on CUDA tensors (as for dense calls); the CUDA kernels serve where it cannot
    assert dispatch.choose_packed(problem, "auto") in ("triton", "cuda")


gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and ops._C_cuda is not None and "cuda" in dispatch.available_backends("cuda")),
    reason="needs a CUDA device and the CUDA extension",
)


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_gpu_varlen_matches_reference(dtype, seed):
    lq, lk = [37, 0, 300, 5], [37, 20, 400, 0]
    q = randn(sum(lq) + 3, 8, 128, dtype=dtype).cuda().requires_grad_(True)
    k = randn(sum(lk), 2, 128, dtype=dtype).cuda().requires_grad_(True)
    v = randn(sum(lk), 2, 128, dtype=dtype).cuda().requires_grad_(True)
    cq, ck = cu(lq).cuda(), cu(lk).cuda()
    out, lse = attnkern.flash_attn_varlen_func(q, k, v, cq, ck, 300, 400, causal=True, return_lse=True,
                                               backend="cuda")
    ref_out, ref_lse = reference_varlen.varlen_attention(q.double(), k.double(), v.double(), cq, ck, 128 ** -0.5,
                                                         -1, 0)
    check_forward(out, lse, ref_out, ref_lse, dtype, int(cq[-1]))
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    refs = torch.autograd.grad(ref_out, (q, k, v), g.double())
    for a, r, what in zip(grads, refs, ("dq", "dk", "dv")):
        assert_close(a, r, dtype, what)


@gpu
@needs_gpu
@pytest.mark.parametrize("page", [1, 16, 7, 256])
def test_gpu_kvcache_paged_decode(page, seed):
    B, H, Hk, E, S = 4, 16, 2, 128, 1000
    q = randn(B, 1, H, E, dtype=torch.bfloat16).cuda()
    k_new, v_new = randn(B, 1, Hk, E, dtype=torch.bfloat16).cuda(), randn(B, 1, Hk, E, dtype=torch.bfloat16).cuda()
    seqlens = torch.tensor([0, 999, 500, 17], dtype=torch.int32).cuda()
    per = -(-S // page)
    table = torch.randperm(B * per).view(B, per).to(torch.int32).cuda()
    kc, vc = randn(B * per, page, Hk, E, dtype=torch.bfloat16).cuda(), randn(B * per, page, Hk, E,
                                                                              dtype=torch.bfloat16).cuda()
    ref_out, ref_lse, _, _ = reference_varlen.kvcache_attention(
        q.double(), kc.double(), vc.double(), k_new.double(), v_new.double(), None, None, seqlens, None, table,
        E ** -0.5, -1, 0)
    out, lse = attnkern.flash_attn_with_kvcache(q, kc, vc, k_new, v_new, cache_seqlens=seqlens, block_table=table,
                                                causal=True, return_softmax_lse=True, backend="cuda")
    assert_close(out, ref_out, torch.bfloat16, "out")
    assert_close(lse, ref_lse, torch.bfloat16, "lse")
