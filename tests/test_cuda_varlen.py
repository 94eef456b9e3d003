"""Packed (varlen) and paged (kvcache) calls on the CUDA backend's kernels (csrc/cuda, the
varlen variants of fwd_kernel / bwd_kv_kernel / bwd_q_kernel), run by the CPU emulator (see
tests/test_cuda.py) against the float64 reference of attnkern.reference_varlen, and on a GPU
where one exists (marked gpu)."""

from __future__ import annotations

import pytest
import torch

import attnkern
from attnkern import _varlen_semantics, dispatch, ops, ops_varlen, reference, reference_varlen
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
        return emu.varlen_fwd(q, k, v, cq, ck, seqused, table, scale, left, right, sm_count, dropout_p, rng_seed,
                              softcap, sinks, alibi)

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


# The score modifiers and dropout on packed batches (the kernels' kModified varlen variant):
# (lengths_q, lengths_k, heads_q, heads_kv, head_dim, window, extra rows, softcap, sinks, alibi slopes, dropout_p, dtype)
MODIFIER_CASES = {
    "softcap-window-gqa": ([37, 0, 50, 5], [37, 20, 64, 0], 4, 2, 64, (12, 4), 3, 4.0, False, False, 0.0,
                           torch.float16),
    # a sequence with queries and no key: output 0, LSE = the sink, and a sink gradient of -dLSE
    "sinks-causal-keyless": ([20, 9, 0, 33], [33, 0, 10, 40], 2, 1, 32, (-1, 0), 2, 0.0, True, False, 0.0,
                             torch.bfloat16),
    "alibi-rows-noncausal": ([45, 18], [30, 50], 2, 2, 32, (-1, -1), 0, 0.0, False, True, 0.0, torch.float16),
    "all-dropout-causal": ([30, 0, 19], [40, 10, 19], 4, 2, 32, (-1, 0), 2, 5.0, True, True, 0.25, torch.float16),
    # head dim 256: dK and dV in two passes; a keyless sequence with sinks again
    "all-d256": ([20, 13, 0], [33, 0, 5], 2, 1, 256, (-1, 0), 1, 8.0, True, True, 0.0, torch.bfloat16),
    # every sequence L <= 16: dropout keeps the prefill kernel (the decode path has none)
    "dropout-short-d128": ([7, 16, 3], [50, 16, 9], 4, 1, 128, (20, 0), 0, 0.0, False, False, 0.1, torch.bfloat16),
}


class _AutogradContext:
    """What ops_varlen's autograd formula reads from its ctx, filled by its own _setup_context."""

    needs_input_grad = (True,) * 15

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


@pytest.mark.parametrize("name", list(MODIFIER_CASES))
def test_emulated_varlen_modifiers(emu, name, seed):
    """Softcap, sinks, ALiBi (one slope row per sequence) and dropout on a packed batch through the
    varlen prefill kernels, forward and backward, against the float64 reference: per-sequence
    bottom-right ALiBi distances, dropout keyed by seed + b, zero-length sequences, rows past
    cu_seqlens_q[-1]. The backward runs ops_varlen's autograd formula (the CUDA op's) with the
    emulated kernels as its op, so the sinks' gradient is the one training gets."""
    lq, lk, hq, hkv, e, window, extra, softcap, has_sinks, has_alibi, dropout_p, dtype = MODIFIER_CASES[name]
    q = randn(sum(lq) + extra, hq, e, dtype=dtype)
    k = randn(sum(lk) + extra, hkv, e, dtype=dtype)
    v = randn(sum(lk) + extra, hkv, e, dtype=dtype)
    cq, ck = cu(lq), cu(lk)
    sinks = torch.randn(hq) * 2 if has_sinks else None
    alibi = torch.rand(len(lq), hq) * 0.5 if has_alibi else None
    rng = dispatch.new_rng_seed() if dropout_p else None
    scale = e ** -0.5
    emu.set_options(True, 0, seed)
    out, lse = emu.varlen_fwd(q, k, v, cq, ck, None, None, scale, *window, 4, dropout_p, rng, softcap, sinks, alibi)

    inputs = [t.double().requires_grad_(True) for t in (q, k, v)] + ([sinks.double().requires_grad_(True)]
                                                                     if has_sinks else [])
    seed64 = None if rng is None else int(rng.item()) & 0xFFFFFFFFFFFFFFFF
    ref_out, ref_lse = reference_varlen.varlen_attention(
        *inputs[:3], cq, ck, scale, *window, softcap=softcap, sinks=inputs[3] if has_sinks else None,
        alibi_slopes=None if alibi is None else alibi.double(), dropout_p=dropout_p, seed=seed64)
    check_forward(out, lse, ref_out, ref_lse, dtype, int(cq[-1]))
    assert lse[:, int(cq[-1]):].eq(float("-inf")).all(), "rows of no sequence keep LSE -inf (no sink)"
    if name == "sinks-causal-keyless":
        rows = slice(20, 29)  # sequence 1: 9 queries, no key
        assert out[rows].eq(0).all() and torch.equal(lse[:, rows], sinks[:, None].expand(hq, 9))

    grad_out = randn(*out.shape, dtype=dtype)
    grad_lse = torch.randn(lse.shape).where(torch.isfinite(lse), 0)

    def emulated_bwd(g, glse, q, k, v, out, lse, cq, ck, used, scale, left, right, softcap, alibi, dropout_p, rng):
        emu.set_options(True, 0, seed)
        return emu.varlen_bwd(g, glse, q, k, v, out, lse, cq, ck, used, scale, left, right, dropout_p, rng, softcap,
                              alibi)

    ctx = _AutogradContext()
    ops_varlen._setup_context(ctx, (q, k, v, cq, ck, None, None, scale, *window, softcap, sinks, alibi, dropout_p,
                                    rng), (out, lse))
    grads = ops_varlen._make_backward(emulated_bwd)(ctx, grad_out, grad_lse)
    grads = grads[:3] + ((grads[ops_varlen.SINKS_INPUT],) if has_sinks else ())
    loss = (ref_out * grad_out.double()).sum() + (ref_lse.where(torch.isfinite(ref_lse), 0) * grad_lse.double()).sum()
    refs = torch.autograd.grad(loss, inputs)
    for g, r, what in zip(grads, refs, ("dq", "dk", "dv", "dsinks")):
        assert g.shape == r.shape, what
        assert_close(g, r, dtype, what)
    assert grads[0][int(cq[-1]):].eq(0).all() and grads[1][int(ck[-1]):].eq(0).all()


def test_emulated_varlen_dropout_mask_is_the_reference_stream(emu, seed):
    """The varlen kernels' dropout mask, read off the output, is reference.dropout_keep_mask of
    sequence b as a batch of one with seed + b (and the CPU packed op's, where it is built): V is
    the identity on each sequence's keys, so out[i, h, j] = P_ij * keep_ij / (1 - p) with every
    P_ij > 0 (no window), and out != 0 exactly where a key is kept."""
    lq, lk, hq, p = [5, 0, 9, 3], [16, 7, 12, 0], 2, 0.5
    q = randn(sum(lq), hq, 32, dtype=torch.float16) * 0.1
    k = randn(sum(lk), 1, 32, dtype=torch.float16) * 0.1
    v = torch.zeros(sum(lk), 1, 32, dtype=torch.float16)
    cq, ck = cu(lq), cu(lk)
    for b, n in enumerate(lk):
        v[int(ck[b]):int(ck[b]) + n, 0, :n] = torch.eye(n)
    rng = dispatch.new_rng_seed()
    seed64 = int(rng.item()) & 0xFFFFFFFFFFFFFFFF
    emu.set_options(True, 2, seed)
    out = emu.varlen_fwd(q, k, v, cq, ck, None, None, 1.0, -1, -1, 4, p, rng)[0]
    cpu = ops_varlen.varlen_fwd(q, k, v, cq, ck, None, None, 1.0, -1, -1, 0.0, None, None, p, rng)[0] \
        if ops_varlen.varlen_fwd is not None else None
    kept = 0
    for b in range(len(lq)):
        if lq[b] == 0 or lk[b] == 0:
            continue
        want = reference.dropout_keep_mask((seed64 + b) & 0xFFFFFFFFFFFFFFFF, p, 1, hq, lq[b], lk[b])[0]
        rows = out[int(cq[b]):int(cq[b + 1]), :, :lk[b]].transpose(0, 1)  # (H, Lq_b, Lk_b)
        assert torch.equal(rows != 0, want), f"sequence {b}"
        if cpu is not None:
            assert torch.equal(cpu[int(cq[b]):int(cq[b + 1]), :, :lk[b]].transpose(0, 1) != 0, want), f"CPU, {b}"
        kept += int(want.sum())
    assert 0.3 < kept / sum(hq * a * c for a, c in zip(lq, lk)) < 0.7


def test_emulated_varlen_decode_modifiers(emu, seed):
    """L <= 16 with softcap, sinks and ALiBi: the split-KV decode kernel's kModified varlen
    variant over pages of 7 keys, split over CTAs and merged with the sink in the merge; a
    sequence with no key gets LSE = its head's sink, rows of no sequence stay 0 and -inf."""
    lq, lk, hq, hkv, e = [1, 3, 16, 2], [480, 0, 40, 77], 8, 2, 32
    assert emu.decode_num_splits(max(lq), hq, hkv, max(lk), e, len(lq), 40) > 1
    q = randn(sum(lq) + 2, hq, e, dtype=torch.bfloat16)
    k, v = randn(sum(lk), hkv, e, dtype=torch.bfloat16), randn(sum(lk), hkv, e, dtype=torch.bfloat16)
    kp, vp, table = paged(k, v, lk, 7)
    cq, ck = cu(lq), cu(lk)
    sinks, alibi = torch.randn(hq) * 2, torch.rand(len(lq), hq) * 0.3
    emu.set_options(True, 2, seed)
    out, lse = emu.varlen_fwd(q, kp, vp, cq, ck, None, table, e ** -0.5, 30, 0, 40, 0.0, None, 6.0, sinks, alibi)
    ref_out, ref_lse = reference_varlen.varlen_attention(q.double(), k.double(), v.double(), cq, ck, e ** -0.5, 30, 0,
                                                         softcap=6.0, sinks=sinks.double(),
                                                         alibi_slopes=alibi.double())
    check_forward(out, lse, ref_out, ref_lse, torch.bfloat16, int(cq[-1]))
    # sequence 1 has no key: LSE = the sink (through the merge's log2 domain: to rounding)
    torch.testing.assert_close(lse[:, 1:4], sinks[:, None].expand(hq, 3), rtol=0, atol=1e-6)
    assert out[1:4].eq(0).all()
    assert lse[:, -2:].eq(float("-inf")).all()
    # no sequence has a key: no kernel runs, and the op writes 0 with LSE = the sink (-inf past the pack)
    out, lse = emu.varlen_fwd(q[:5], k[:0], v[:0], cu([1, 3]), cu([0, 0]), None, None, 0.1, -1, -1, 4, 0.0, None,
                              0.0, sinks, None)
    assert out.eq(0).all() and torch.equal(lse[:, :4], sinks[:, None].expand(hq, 4))
    assert lse[:, 4].eq(float("-inf")).all()


def test_emulated_kvcache_modifiers(emu, monkeypatch, seed):
    """flash_attn_with_kvcache with softcap, s_aux and (H,) ALiBi slopes (expanded per sequence
    by attnkern) on a paged cache, through the emulated kernels."""
    _kvcache_through_emulator(emu, monkeypatch)
    B, Lq, H, Hk, E, page = 3, 2, 4, 2, 32, 5
    q = randn(B, Lq, H, E, dtype=torch.float16)
    k_new, v_new = randn(B, Lq, Hk, E, dtype=torch.float16), randn(B, Lq, Hk, E, dtype=torch.float16)
    seqlens = torch.tensor([0, 23, 38], dtype=torch.int32)
    per = 8
    table = torch.randperm(B * per)[: B * per].view(B, per).to(torch.int32)
    kc, vc = randn(B * per, page, Hk, E, dtype=torch.float16), randn(B * per, page, Hk, E, dtype=torch.float16)
    sinks, alibi = torch.randn(H), torch.rand(H) * 0.5
    ref_out, ref_lse, ref_k, _ = reference_varlen.kvcache_attention(
        q.double(), kc.double(), vc.double(), k_new.double(), v_new.double(), None, None, seqlens, None, table,
        E ** -0.5, -1, 0, True, softcap=3.0, sinks=sinks.double(), alibi_slopes=alibi.double())
    emu.set_options(True, 0, seed)
    out, lse = attnkern.flash_attn_with_kvcache(q, kc, vc, k_new, v_new, cache_seqlens=seqlens, block_table=table,
                                                causal=True, softcap=3.0, alibi_slopes=alibi,
                                                return_softmax_lse=True, s_aux=sinks, backend="cpu")
    assert emu.stats()["mma"] > 0, "the emulated kernels served the call"
    assert_close(out, ref_out, torch.float16, "out")
    assert_close(lse, ref_lse, torch.float16, "lse")
    assert_close(kc, ref_k, torch.float16, "k_cache after the append")


def test_packed_dispatch_row_for_cuda():
    import dataclasses

    problem = _varlen_semantics.VarlenProblem(
        batch=2, heads_q=4, heads_kv=2, total_q=10, head_dim=64, head_dim_v=64, scale=0.125, window_left=-1,
        window_right=0, page_size=0, dtype=torch.bfloat16, device_type="cuda",
    )
    # the score modifiers and dropout take the kernels' kModified varlen variant: the row answers for
    # them exactly as for the plain call (on this machine: the missing device or extension, if any)
    modified = [dataclasses.replace(problem, **kw) for kw in (
        dict(softcap=5.0), dict(has_sinks=True), dict(has_alibi=True), dict(dropout_p=0.25),
        dict(softcap=5.0, has_sinks=True, has_alibi=True, dropout_p=0.1))]
    reason = dispatch.PACKED_WHY_NOT["cuda"](problem)
    for m in modified:
        assert dispatch.PACKED_WHY_NOT["cuda"](m) == reason, m
    if ops._C_cuda is None or not torch.cuda.is_available():
        assert reason  # no extension or no device here
        assert not any(word in reason for word in ("softcap", "sinks", "ALiBi", "dropout"))
        with pytest.raises(RuntimeError, match="backend='cuda' cannot run this call"):
            dispatch.choose_packed(modified[-1], "cuda")
        assert dispatch.choose_packed(problem, "auto") != "cuda"
        return
    assert reason is None
    assert all(dispatch.choose_packed(m, "cuda") == "cuda" for m in modified)
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
def test_gpu_varlen_modifiers_match_reference(seed):
    """softcap, sinks, (H,) ALiBi and dropout on a packed batch through backend="cuda", forward and
    backward (dq, dk, dv, d sinks); the dropout seed is the one the call draws (torch's generator)."""
    lq, lk, hq = [37, 0, 300, 5], [37, 20, 400, 0], 8
    q = randn(sum(lq) + 3, hq, 128, dtype=torch.bfloat16).cuda().requires_grad_(True)
    k = randn(sum(lk), 2, 128, dtype=torch.bfloat16).cuda().requires_grad_(True)
    v = randn(sum(lk), 2, 128, dtype=torch.bfloat16).cuda().requires_grad_(True)
    sinks = (torch.randn(hq) * 2).cuda().requires_grad_(True)
    alibi = (torch.rand(hq) * 0.3).cuda()
    cq, ck = cu(lq).cuda(), cu(lk).cuda()
    torch.manual_seed(seed)
    seed64 = int(dispatch.new_rng_seed().item()) & 0xFFFFFFFFFFFFFFFF
    torch.manual_seed(seed)
    out, lse = attnkern.flash_attn_varlen_func(q, k, v, cq, ck, 300, 400, 0.1, causal=True, softcap=20.0,
                                               alibi_slopes=alibi, s_aux=sinks, return_lse=True, backend="cuda")
    inputs = [t.detach().double().requires_grad_(True) for t in (q, k, v, sinks)]
    ref_out, ref_lse = reference_varlen.varlen_attention(
        *inputs[:3], cq, ck, 128 ** -0.5, -1, 0, softcap=20.0, sinks=inputs[3],
        alibi_slopes=alibi.double().expand(len(lq), hq), dropout_p=0.1, seed=seed64)
    check_forward(out, lse, ref_out, ref_lse, torch.bfloat16, int(cq[-1]))
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, sinks), g)
    refs = torch.autograd.grad(ref_out, inputs, g.double())
    for a, r, what in zip(grads, refs, ("dq", "dk", "dv", "dsinks")):
        assert_close(a, r, torch.bfloat16, what)


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
