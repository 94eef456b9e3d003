"""Packed (varlen) and KV-cache calls: CPU kernels against the float64 reference
(attnkern.reference_varlen), the flash-attn signatures, bad input, and the torch.library contract."""

from __future__ import annotations

import inspect
import os

import pytest
import torch

import attnkern
from attnkern import ops_varlen, reference_varlen
from conftest import TOLERANCE, assert_close, assert_lse_close, forced_isa_env, rel_err

pytestmark = pytest.mark.skipif(ops_varlen.varlen_fwd is None, reason="C++ extension without attnkern::varlen_fwd")


def cu(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)


def packed(lengths_q, lengths_k, heads_q, heads_kv, e, ev, dtype, extra_q=0, extra_k=0):
    """Random packed q/k/v (float64 drawn, cast to dtype), with extra rows past the sequences."""
    tq, tk = sum(lengths_q) + extra_q, sum(lengths_k) + extra_k
    q = torch.randn(tq, heads_q, e, dtype=torch.float64).to(dtype)
    k = torch.randn(tk, heads_kv, e, dtype=torch.float64).to(dtype)
    v = torch.randn(tk, heads_kv, ev, dtype=torch.float64).to(dtype)
    return q, k, v


def reference_fwd_bwd(q, k, v, cq, ck, scale, window, seqused_k=None, grad_out=None, grad_lse=None):
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    out, lse = reference_varlen.varlen_attention(q64, k64, v64, cq, ck, scale, window[0], window[1], seqused_k)
    grads = None
    if grad_out is not None:
        finite = torch.isfinite(lse)
        loss = (out * grad_out.double()).sum() + (torch.where(finite, lse, 0.0) * grad_lse.double()).sum()
        grads = torch.autograd.grad(loss, (q64, k64, v64))
    return out, lse, grads


# (lengths_q, lengths_k, heads_q, heads_kv, e, ev, causal, window, extra rows, seqused_k)
VARLEN_CASES = {
    "mixed": ([37, 1, 130, 64], [37, 1, 130, 64], 4, 4, 32, 32, False, (-1, -1), 0, None),
    "causal-gqa-cross": ([20, 70, 5], [33, 70, 140], 4, 2, 24, 16, True, (-1, -1), 0, None),
    "window-zero-lengths": ([0, 50, 17, 0, 9], [12, 0, 60, 0, 9], 2, 1, 16, 16, False, (6, 3), 0, None),
    "causal-window-tail-rows": ([33, 129], [40, 129], 3, 3, 40, 24, True, (20, -1), 11, None),
    "seqused-k": ([16, 48, 3], [64, 80, 30], 2, 2, 32, 32, True, (-1, -1), 5, [10, 80, 0]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(VARLEN_CASES))
def test_varlen_matches_reference(name, dtype, seed):
    lq, lk, hq, hkv, e, ev, causal, window, extra, used = VARLEN_CASES[name]
    if dtype != torch.float32 and name not in ("mixed", "causal-gqa-cross"):
        pytest.skip("half dtypes on two cases keep the runtime small")
    q, k, v = packed(lq, lk, hq, hkv, e, ev, dtype, extra_q=extra, extra_k=extra)
    cq, ck = cu(lq), cu(lk)
    seqused = torch.tensor(used, dtype=torch.int32) if used is not None else None
    for t in (q, k, v):
        t.requires_grad_(True)
    out, lse = attnkern.flash_attn_varlen_func(
        q, k, v, cq, ck, max(lq), max(lk), 0.0, None, causal, window, seqused_k=seqused, return_lse=True,
        backend="cpu",
    )
    grad_out = torch.randn_like(out)
    grad_lse = torch.randn_like(lse)
    dq, dk, dv = torch.autograd.grad((out, lse), (q, k, v), (grad_out, torch.where(torch.isfinite(lse), grad_lse, 0)))
    eff_window = (window[0], 0 if causal else window[1])
    ref_out, ref_lse, ref_grads = reference_fwd_bwd(
        q, k, v, cq, ck, e ** -0.5, eff_window, seqused, grad_out, torch.where(torch.isfinite(lse), grad_lse, 0)
    )
    assert out.shape == (q.shape[0], hq, ev) and lse.shape == (hq, q.shape[0]) and lse.dtype == torch.float32
    assert_close(out, ref_out, dtype, "out")
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "rows without keys must have LSE -inf, only they"
    fin = torch.isfinite(ref_lse)
    assert (lse[fin].double() - ref_lse[fin]).abs().max().item() < 50 * TOLERANCE[dtype] + 1e-5
    for g, r, what in zip((dq, dk, dv), ref_grads, ("dq", "dk", "dv")):
        assert_close(g, r, dtype, what)
    end_q, end_k = int(cq[-1]), int(ck[-1])
    assert out[end_q:].eq(0).all() and dq[end_q:].eq(0).all(), "rows past cu_seqlens_q[-1]: out 0, grad 0"
    assert dk[end_k:].eq(0).all() and dv[end_k:].eq(0).all()


def test_varlen_equals_dense_per_sequence(seed):
    """Against another code path: each sequence through the dense flash_attn_func."""
    lq = [45, 7, 200]
    q, k, v = packed(lq, lq, 4, 2, 32, 32, torch.float32)
    out = attnkern.flash_attn_varlen_func(q, k, v, cu(lq), cu(lq), 200, 200, causal=True, window_size=(30, -1))
    start = 0
    for n in lq:
        sl = slice(start, start + n)
        dense = attnkern.flash_attn_func(q[None, sl], k[None, sl], v[None, sl], causal=True, window_size=(30, -1))
        assert_close(out[sl], dense[0], torch.float32, f"sequence of {n}")
        start += n


def test_packed_variants_and_deterministic(seed):
    lq = [19, 64, 33]
    total = sum(lq)
    qkv = torch.randn(total, 3, 2, 16, requires_grad=True)
    cq = cu(lq)
    out1 = attnkern.flash_attn_varlen_qkvpacked_func(qkv, cq, torch.tensor(64), causal=True)
    out2 = attnkern.flash_attn_varlen_kvpacked_func(qkv[:, 0], qkv[:, 1:], cq, cq, 64, 64, causal=True)
    out3 = attnkern.flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cq, cq, 64, 64, causal=True,
                                           deterministic=True)
    assert torch.equal(out1, out3) and torch.equal(out2, out3)
    g = torch.randn_like(out1)
    (d1,) = torch.autograd.grad(out1, qkv, g)
    (d2,) = torch.autograd.grad(attnkern.flash_attn_varlen_qkvpacked_func(qkv, cq, 64, causal=True), qkv, g)
    assert torch.equal(d1, d2), "backward must be deterministic"
    out4, lse4, probs = attnkern.flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cq, cq, 64, 64,
                                                        return_attn_probs=True)
    assert probs is None and lse4.shape == (2, total)


def test_math_backend_and_unserved_backends(seed):
    lq = [10, 0, 21]
    q, k, v = packed(lq, lq, 2, 2, 16, 16, torch.float32)
    a = attnkern.flash_attn_varlen_func(q, k, v, cu(lq), cu(lq), 21, 21, causal=True, backend="math")
    b = attnkern.flash_attn_varlen_func(q, k, v, cu(lq), cu(lq), 21, 21, causal=True, backend="cpu")
    assert_close(b, a, torch.float32, "cpu vs math")
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run this call"):  # CPU tensors
        attnkern.flash_attn_varlen_func(q, k, v, cu(lq), cu(lq), 21, 21, backend="cuda")
    if os.environ.get("TRITON_INTERPRET", "0") != "1":  # tests/test_triton_varlen.py runs the Triton kernels
        with pytest.raises(RuntimeError, match="backend='triton' cannot run this call"):
            attnkern.flash_attn_varlen_func(q, k, v, cu(lq), cu(lq), 21, 21, backend="triton")


def test_signatures_follow_flash_attn():
    def names(f):
        return [p.name for p in inspect.signature(f).parameters.values() if p.kind != p.KEYWORD_ONLY]

    assert names(attnkern.flash_attn_varlen_func) == [
        "q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "dropout_p", "softmax_scale",
        "causal", "window_size", "softcap", "alibi_slopes", "deterministic", "return_attn_probs", "block_table"]
    assert names(attnkern.flash_attn_varlen_qkvpacked_func)[:3] == ["qkv", "cu_seqlens", "max_seqlen"]
    assert names(attnkern.flash_attn_varlen_kvpacked_func)[:6] == [
        "q", "kv", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"]
    assert names(attnkern.flash_attn_with_kvcache) == [
        "q", "k_cache", "v_cache", "k", "v", "rotary_cos", "rotary_sin", "cache_seqlens", "cache_batch_idx",
        "cache_leftpad", "block_table", "softmax_scale", "causal", "window_size", "softcap", "rotary_interleaved",
        "alibi_slopes", "num_splits", "return_softmax_lse"]


# ---------------------------------------------------------------------------------------
# score modifiers (softcap, sinks, ALiBi) per sequence

# (lengths_q, lengths_k, heads_q, heads_kv, causal, window, softcap, sinks, alibi ("H", "BH" or None), extra rows)
MODIFIER_CASES = {
    "softcap-causal-gqa": ([20, 0, 70], [33, 5, 70], 4, 2, True, (-1, -1), 0.8, False, None, 3),
    "sinks-window-empty-keys": ([0, 17, 9, 6], [12, 60, 0, 6], 2, 1, False, (6, 3), 0.0, True, None, 2),
    "alibi-heads-causal-window": ([30, 65], [40, 65], 4, 4, True, (20, -1), 0.0, False, "H", 0),
    "all-per-sequence-alibi-gqa": ([9, 40, 4, 0, 25], [9, 41, 0, 3, 70], 4, 2, True, (-1, -1), 1.0, True, "BH", 4),
}


def modifier_inputs(heads, batch, sinks, alibi):
    s_aux = (torch.randn(heads, dtype=torch.float64) * 2).float() if sinks else None
    slopes = None
    if alibi is not None:  # distinct per sequence, so that a wrong row would show
        slopes = torch.rand(heads if alibi == "H" else (batch, heads), dtype=torch.float64).float() * 0.3
    return s_aux, slopes


@pytest.mark.parametrize("name", list(MODIFIER_CASES))
def test_varlen_modifiers_match_reference(name, seed):
    lq, lk, hq, hkv, causal, window, cap, with_sinks, alibi, extra = MODIFIER_CASES[name]
    q, k, v = packed(lq, lk, hq, hkv, 16, 16, torch.float32, extra_q=extra, extra_k=extra)
    cq, ck = cu(lq), cu(lk)
    s_aux, slopes = modifier_inputs(hq, len(lq), with_sinks, alibi)
    inputs = [q, k, v] + ([s_aux] if with_sinks else [])
    for t in inputs:
        t.requires_grad_(True)
    args = (q, k, v, cq, ck, max(lq), max(lk), 0.0, None, causal, window, cap, slopes)
    out, lse = attnkern.flash_attn_varlen_func(*args, s_aux=s_aux, return_lse=True, backend="cpu")
    grad_out = torch.randn_like(out)
    grad_lse = torch.where(torch.isfinite(lse), torch.randn_like(lse), 0)
    grads = torch.autograd.grad((out, lse), inputs, (grad_out, grad_lse))

    ref_in = [t.detach().double().requires_grad_(True) for t in inputs]
    eff = (window[0], 0 if causal else window[1])
    ref_out, ref_lse = reference_varlen.varlen_attention(
        *ref_in[:3], cq, ck, 16 ** -0.5, eff[0], eff[1], softcap=cap, sinks=ref_in[3] if with_sinks else None,
        alibi_slopes=None if slopes is None else slopes.double(),
    )
    fin = torch.isfinite(ref_lse)
    loss = (ref_out * grad_out.double()).sum() + (torch.where(fin, ref_lse, 0.0) * grad_lse.double()).sum()
    ref_grads = torch.autograd.grad(loss, ref_in)
    assert_close(out, ref_out, torch.float32, "out")
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "LSE -inf exactly where the reference has it"
    assert (lse[fin].double() - ref_lse[fin]).abs().max().item() < 1e-4
    for g, r, what in zip(grads, ref_grads, ("dq", "dk", "dv", "d s_aux")):
        assert_close(g, r, torch.float32, what)
    if with_sinks:  # a sequence with no key: output 0, LSE = the sink
        b = next(b for b in range(len(lq)) if lk[b] == 0 and lq[b] > 0)
        rows = slice(int(cq[b]), int(cq[b + 1]))
        assert out[rows].eq(0).all() and torch.equal(lse[:, rows], s_aux.detach()[:, None].expand(-1, lq[b]))
    math = attnkern.flash_attn_varlen_func(*args, s_aux=s_aux, backend="math")
    assert_close(math, ref_out, torch.float32, "math backend")


def test_varlen_modifiers_matter(seed):
    """Each modifier changes the result, and (B, H) slopes use row b for sequence b."""
    lq = [24, 31]
    q, k, v = packed(lq, lq, 2, 2, 16, 16, torch.float32)
    run = lambda **kw: attnkern.flash_attn_varlen_func(q, k, v, cu(lq), cu(lq), 31, 31, causal=True, **kw)  # noqa
    plain = run()
    slopes = torch.tensor([[0.5, 0.1], [0.05, 0.3]])
    for kw in (dict(softcap=0.5), dict(s_aux=torch.tensor([1.0, -0.5])), dict(alibi_slopes=slopes)):
        assert (run(**kw) - plain).abs().max() > 1e-2, kw
    per_seq = run(alibi_slopes=slopes)
    for b, rows in enumerate((slice(0, 24), slice(24, 55))):
        shared = run(alibi_slopes=slopes[b].contiguous())
        assert torch.equal(per_seq[rows], shared[rows])


# ---------------------------------------------------------------------------------------
# paged K/V and the KV cache


def paged_copy(k, lengths, page, extra_blocks=3):
    """k packed by lengths -> pages (num_blocks, page, H, D) in shuffled order, and the block table."""
    blocks = [-(-n // page) for n in lengths]
    num = sum(blocks) + extra_blocks
    perm = torch.randperm(num)
    pages = torch.randn(num, page, *k.shape[1:], dtype=k.dtype) * float("nan")  # poison: unused rows
    table = torch.full((len(lengths), max(blocks + [1]) + 1), -7, dtype=torch.int32)  # unused entries invalid
    start, used = 0, 0
    for b, n in enumerate(lengths):
        for j in range(blocks[b]):
            p = int(perm[used])
            rows = k[start + j * page: start + min(n, (j + 1) * page)]
            pages[p, : rows.shape[0]] = rows
            table[b, j] = p
            used += 1
        start += n
    return pages, table


def paged_pair(k, v, lengths, page):
    """k and v in the same shuffled pages (paged_copy's arrangement of k) and the block table."""
    kp, table = paged_copy(k, lengths, page)
    vp = torch.empty(*kp.shape[:-1], v.shape[-1], dtype=v.dtype) * float("nan")
    start = 0
    for b, n in enumerate(lengths):
        for j in range(-(-n // page)):
            rows = v[start + j * page: start + min(n, (j + 1) * page)]
            vp[int(table[b, j]), : rows.shape[0]] = rows
        start += n
    return kp, vp, table


@pytest.mark.parametrize("page", [1, 5, 16, 128, 256])
def test_paged_varlen_matches_packed(page, seed):
    lq, lk = [3, 40, 1], [300, 41, 130]
    q, k, v = packed(lq, lk, 4, 2, 32, 32, torch.float32)
    kp, vp, table = paged_pair(k, v, lk, page)
    out = attnkern.flash_attn_varlen_func(q, kp, vp, cu(lq), cu(lk), 40, 300, causal=True, block_table=table)
    ref, _, _ = reference_fwd_bwd(q, k, v, cu(lq), cu(lk), 32 ** -0.5, (-1, 0))
    assert_close(out, ref, torch.float32, f"paged, page {page}")


@pytest.mark.parametrize("page", [None, 5, 160], ids=["packed", "page5", "page160"])
def test_far_apart_key_rows_match_reference(page, seed):
    """fp32 K/V rows 4 KiB or more apart (Hkv * D = 4 * 256 floats here) are copied before the block
    products instead of read in place (csrc/cpu/kernels_impl.inc key_rows): packed, paged with every
    key block across pages, paged with blocks inside a page."""
    lq, lk = [2, 5], [150, 131]
    q, k, v = packed(lq, lk, 8, 4, 256, 256, torch.float32)
    assert k.stride(0) * k.element_size() >= 4096
    keys, values, table = (k, v, None) if page is None else paged_pair(k, v, lk, page)
    out = attnkern.flash_attn_varlen_func(q, keys, values, cu(lq), cu(lk), 5, 150, causal=True, block_table=table,
                                          backend="cpu")
    ref, _, _ = reference_fwd_bwd(q, k, v, cu(lq), cu(lk), 256 ** -0.5, (-1, 0))
    assert_close(out, ref, torch.float32, f"far-apart rows, page {page}")


def make_cache(batch_cache, seqlen, heads_kv, e, ev, dtype):
    kc = torch.randn(batch_cache, seqlen, heads_kv, e, dtype=torch.float64).to(dtype)
    vc = torch.randn(batch_cache, seqlen, heads_kv, ev, dtype=torch.float64).to(dtype)
    return kc, vc


def rotary_tables(n, rd):
    theta = torch.rand(n, rd // 2, dtype=torch.float64) * 6.28
    return torch.cos(theta).float(), torch.sin(theta).float()


KV_CASES = {
    "decode-gqa": dict(B=3, Lq=1, Lnew=1, H=8, Hk=2, causal=True),
    "prefill-chunk-rotary": dict(B=2, Lq=5, Lnew=5, H=4, Hk=4, causal=True, rotary=True, interleaved=True),
    "rotary-neox-noncausal": dict(B=2, Lq=3, Lnew=3, H=2, Hk=1, causal=False, rotary=True, interleaved=False),
    "batch-idx-no-append": dict(B=2, Lq=2, Lnew=0, H=2, Hk=2, causal=False, batch_idx=True),
    "window": dict(B=2, Lq=4, Lnew=4, H=2, Hk=2, causal=True, window=(9, -1)),
    # more sequences than the per-sequence slice append takes (varlen.py): the index_put_ route
    "decode-batch6": dict(B=6, Lq=1, Lnew=2, H=4, Hk=2, causal=True),
}


@pytest.mark.parametrize("paged", [None, 3, 16], ids=lambda p: f"page{p}" if p else "contiguous")
@pytest.mark.parametrize("name", list(KV_CASES))
def test_kvcache_matches_reference(name, paged, seed):
    c = KV_CASES[name]
    if paged and c.get("batch_idx"):
        pytest.skip("cache_batch_idx is for contiguous caches")
    B, Lq, Lnew, H, Hk, E = c["B"], c["Lq"], c["Lnew"], c["H"], c["Hk"], 32
    S = 70
    dtype = torch.float32
    q = torch.randn(B, Lq, H, E)
    k_new = torch.randn(B, Lnew, Hk, E) if Lnew else None
    v_new = torch.randn(B, Lnew, Hk, E) if Lnew else None
    seqlens = torch.randint(0, S - Lnew - 1, (B,), dtype=torch.int32)
    seqlens[0] = S - Lnew  # one sequence fills its cache exactly
    cos = sin = None
    if c.get("rotary"):
        cos, sin = rotary_tables(S, 16)
    batch_idx = torch.tensor([2, 0], dtype=torch.int32) if c.get("batch_idx") else None
    kc, vc = make_cache(3 if batch_idx is not None else B, S, Hk, E, E, dtype)
    table = None
    if paged:
        pages_per_seq = -(-S // paged)
        num = B * pages_per_seq + 2
        perm = torch.randperm(num)[: B * pages_per_seq].view(B, pages_per_seq).to(torch.int32)
        kp = torch.randn(num, paged, Hk, E)
        vp = torch.randn(num, paged, Hk, E)
        for b in range(B):  # the contiguous cache's rows, scattered over pages
            for j in range(S):
                kp[perm[b, j // paged], j % paged] = kc[b, j]
                vp[perm[b, j // paged], j % paged] = vc[b, j]
        kc, vc, table = kp, vp, perm
    window = c.get("window", (-1, -1))
    ref_out, ref_lse, ref_k, ref_v = reference_varlen.kvcache_attention(
        q.double(), kc.double(), vc.double(), None if k_new is None else k_new.double(),
        None if v_new is None else v_new.double(), cos, sin, seqlens, batch_idx, table, E ** -0.5, window[0],
        0 if c["causal"] else window[1], c.get("interleaved", True),
    )
    out, lse = attnkern.flash_attn_with_kvcache(
        q, kc, vc, k_new, v_new, cos, sin, seqlens, batch_idx, None, table, None, c["causal"], window, 0.0,
        c.get("interleaved", True), None, 0, True,
    )
    assert out.shape == (B, Lq, H, E) and lse.shape == (B, H, Lq)
    assert_close(out, ref_out, dtype, "out")
    assert_lse_close(lse, ref_lse, dtype)  # a cache row of 0 keys and no append: -inf
    assert_close(kc, ref_k, dtype, "k_cache after the append")
    assert_close(vc, ref_v, dtype, "v_cache after the append")


@pytest.mark.parametrize("B,H,Hk,S", [(2, 4, 4, 300), (1, 2, 1, 1500)], ids=["batch", "split-keys"])
def test_kvcache_decode_bf16_int_seqlens(B, H, Hk, S, seed):
    """bf16 decoding; the second shape has too few tiles for the threads, so its keys are split
    over threads and merged by LSE."""
    E = 64
    kc, vc = make_cache(B, S, Hk, E, E, torch.bfloat16)
    q = torch.randn(B, 1, H, E).bfloat16()
    out, lse = attnkern.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=S, return_softmax_lse=True)
    ref, ref_lse, _, _ = reference_varlen.kvcache_attention(q.double(), kc.double(), vc.double(),
                                                            cache_seqlens=torch.full((B,), S, dtype=torch.int32),
                                                            scale=E ** -0.5)
    assert_close(out, ref, torch.bfloat16, "decode bf16")
    assert_close(lse, ref_lse, torch.float32, "decode lse")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kvcache_pages_longer_than_sequences(dtype, seed):
    """A sequence whose keys all lie in its first page is read as one dense page (bindings_varlen.cpp
    sequence_params; bf16 then takes the dense products, AMX or vdpbf16ps where the CPU has them),
    next to one that still crosses pages; pages shuffled. fp32 rows Hk * D * 4 = 2 KiB apart are
    copied before the block products (kernels_impl.inc key_rows)."""
    B, H, Hk, E, page = 3, 16, 8, 64, 160
    seqlens = torch.tensor([150, 37, 300], dtype=torch.int32)
    kc, vc = make_cache(B, 2 * page, Hk, E, E, dtype)
    table = torch.randperm(2 * B + 1)[: 2 * B].view(B, 2).to(torch.int32)
    kp = torch.full((2 * B + 1, page, Hk, E), float("nan"), dtype=dtype)
    vp = kp.clone()
    for b in range(B):
        for j in range(2):
            kp[table[b, j]], vp[table[b, j]] = kc[b, j * page: (j + 1) * page], vc[b, j * page: (j + 1) * page]
    q = torch.randn(B, 1, H, E, dtype=torch.float64).to(dtype)
    out, lse = attnkern.flash_attn_with_kvcache(q, kp, vp, cache_seqlens=seqlens, block_table=table,
                                                return_softmax_lse=True, backend="cpu")
    ref, ref_lse, _, _ = reference_varlen.kvcache_attention(q.double(), kp.double(), vp.double(),
                                                            cache_seqlens=seqlens, block_table=table,
                                                            scale=E ** -0.5)
    assert_close(out, ref, dtype, "pages longer than sequences")
    assert_close(lse, ref_lse, torch.float32, "lse")


@pytest.mark.parametrize("page", [7, 16, 48], ids=["page7", "page16", "page48"])
def test_kvcache_paged_bf16_matches_reference(page, seed):
    """bf16 paged caches whose key blocks cross pages (gathered run by run) or lie in one page, on
    the bf16 products (AMX where the CPU has it: kernels_impl.inc amx_paged_rows), GQA, a decode
    step and a 3-query chunk, unused page slots NaN, pages shuffled; tails of every length."""
    B, H, Hk, E, Ev = 3, 4, 2, 64, 32
    seqlens = torch.tensor([301, 130, 45], dtype=torch.int32)
    blocks = -(-int(seqlens.max()) // page)
    table = torch.randperm(B * blocks + 2)[: B * blocks].view(B, blocks).to(torch.int32)
    kc, vc = make_cache(B, blocks * page, Hk, E, Ev, torch.bfloat16)
    kp = torch.full((B * blocks + 2, page, Hk, E), float("nan"), dtype=torch.bfloat16)
    vp = torch.full((B * blocks + 2, page, Hk, Ev), float("nan"), dtype=torch.bfloat16)
    for b in range(B):
        for j in range(blocks):
            kp[table[b, j]], vp[table[b, j]] = kc[b, j * page: (j + 1) * page], vc[b, j * page: (j + 1) * page]
            if (j + 1) * page > seqlens[b]:  # slots past the sequence's end: never read
                kp[table[b, j], max(0, int(seqlens[b]) - j * page):] = float("nan")
                vp[table[b, j], max(0, int(seqlens[b]) - j * page):] = float("nan")
    for lq in (1, 3):
        q = torch.randn(B, lq, H, E, dtype=torch.float64).bfloat16()
        out, lse = attnkern.flash_attn_with_kvcache(q, kp, vp, cache_seqlens=seqlens, block_table=table, causal=True,
                                                    return_softmax_lse=True, backend="cpu")
        ref, ref_lse, _, _ = reference_varlen.kvcache_attention(q.double(), kp.double(), vp.double(),
                                                                cache_seqlens=seqlens, block_table=table,
                                                                scale=E ** -0.5, window_right=0)
        assert_close(out, ref, torch.bfloat16, f"paged bf16, page {page}, {lq} queries")
        assert_close(lse, ref_lse, torch.float32, "lse")


@pytest.mark.parametrize("paged", [None, 5], ids=["contiguous", "page5"])
def test_kvcache_modifiers_match_reference(paged, seed):
    B, Lq, Lnew, H, Hk, E, S = 3, 3, 2, 4, 2, 16, 40
    q, k_new, v_new = torch.randn(B, Lq, H, E), torch.randn(B, Lnew, Hk, E), torch.randn(B, Lnew, Hk, E)
    seqlens = torch.tensor([S - Lnew, 0, 17], dtype=torch.int32)
    kc, vc = make_cache(B, S, Hk, E, E, torch.float32)
    table = None
    if paged:  # block b * 8 + j holds rows j * 5.. of sequence b
        kc, vc = kc.reshape(B * S // paged, paged, Hk, E), vc.reshape(B * S // paged, paged, Hk, E)
        table = torch.arange(B * S // paged, dtype=torch.int32).view(B, -1)
    s_aux, slopes = modifier_inputs(H, B, True, "BH" if paged else "H")
    ref_out, ref_lse, _, _ = reference_varlen.kvcache_attention(
        q.double(), kc.double(), vc.double(), k_new.double(), v_new.double(), cache_seqlens=seqlens,
        block_table=table, scale=E ** -0.5, window_left=-1, window_right=0, softcap=0.8, sinks=s_aux.double(),
        alibi_slopes=slopes.double(),
    )
    out, lse = attnkern.flash_attn_with_kvcache(q, kc, vc, k_new, v_new, cache_seqlens=seqlens, block_table=table,
                                                causal=True, softcap=0.8, alibi_slopes=slopes, s_aux=s_aux,
                                                return_softmax_lse=True)
    assert_close(out, ref_out, torch.float32, "out")
    assert_close(lse, ref_lse, torch.float32, "lse")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_varlen_dropout_matches_reference(dtype, seed):
    """dropout_p: the same torch seed gives the reference's Philox pattern (sequence b: the dense
    pattern of a batch of one keyed by seed + b), forward and backward; zero-length sequences and
    a split-key decode row included."""
    lq, lk = [37, 0, 70, 1], [40, 9, 70, 300]
    q, k, v = packed(lq, lk, 4, 2, 32, 32, dtype, extra_q=3)
    cq, ck = cu(lq), cu(lk)
    g = torch.randn(q.shape[0], 4, 32, dtype=torch.float64).to(dtype)

    def run(tensors, backend, p):
        tensors = [t.detach().requires_grad_(True) for t in tensors]
        torch.manual_seed(seed)
        out = attnkern.flash_attn_varlen_func(*tensors, cq, ck, 70, 300, p, causal=True, backend=backend)
        return out, torch.autograd.grad(out, tensors, g.to(out.dtype))

    out, grads = run((q, k, v), "cpu", 0.3)
    ref, ref_grads = run((q.double(), k.double(), v.double()), "math", 0.3)
    assert_close(out, ref, dtype, "out")
    for name, a, b in zip("qkv", grads, ref_grads):
        assert_close(a, b, dtype, f"d{name}")
    assert torch.equal(out, run((q, k, v), "cpu", 0.3)[0]), "the same seed must give the same pattern"
    undropped = run((q.double(), k.double(), v.double()), "math", 0.0)[0]
    assert rel_err(undropped, ref) > 0.1, "the dropout must matter, or this test could not tell"


def test_varlen_dropout_compiles_as_eager(seed):
    """torch.compile(fullgraph=True) draws the dropout seed as eager does (the seed is an op)."""
    lq = [10, 20]
    q, k, v = (t.requires_grad_(True) for t in packed(lq, lq, 2, 2, 16, 16, torch.float32))

    def f(q, k, v):
        return attnkern.flash_attn_varlen_func(q, k, v, cu(lq), cu(lq), 20, 20, 0.2, causal=True)

    results = []
    for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
        torch.manual_seed(seed)
        out = fn(q, k, v)
        results.append((out, torch.autograd.grad(out.sum(), (q, k, v))))
    assert torch.equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.equal(a, b)


LEFTPAD_LAYOUTS = ["contiguous", "hf-layout", "batch-idx", "page5"]


@pytest.mark.parametrize("layout", LEFTPAD_LAYOUTS)
def test_kvcache_leftpad_matches_reference(layout, seed):
    """cache_leftpad: keys before leftpad[b] are never seen (poisoned with NaN here), the bottom-right
    alignment counts the rest, appends and rotary stay at absolute positions. Layouts: a contiguous
    cache (read in place as one packed call), Hugging Face's (B, Hk, S, D) cache seen transposed,
    cache_batch_idx out of order and a paged cache (both through single-row pages)."""
    B, Lq, Lnew, H, Hk, E, S = 3, 2, 2, 4, 2, 16, 37
    q, k_new, v_new = torch.randn(B, Lq, H, E), torch.randn(B, Lnew, Hk, E), torch.randn(B, Lnew, Hk, E)
    seqlens = torch.tensor([S - Lnew, 9, 20], dtype=torch.int32)
    leftpad = torch.tensor([5, 9, 0], dtype=torch.int32)  # sequence 1: only the appended keys
    cos, sin = rotary_tables(S, 8)
    rows, table = torch.arange(B), None
    kc, vc = make_cache(B, S, Hk, E, E, torch.float32)
    if layout == "batch-idx":
        rows = torch.tensor([2, 0, 1])
        kc, vc = kc[torch.argsort(rows)], vc[torch.argsort(rows)]  # cache row rows[b] holds sequence b
    for b in range(B):  # padding is never read: NaN there would show
        kc[rows[b], : leftpad[b]] = float("nan")
        vc[rows[b], : leftpad[b]] = float("nan")
    ref_k, ref_v = kc.clone(), vc.clone()
    k0, v0 = kc.nan_to_num(), vc.nan_to_num()
    if layout == "hf-layout":
        kc, vc = kc.transpose(1, 2).contiguous().transpose(1, 2), vc.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "page5":
        pages = -(-S // 5)
        perm = torch.randperm(B * pages + 1)[: B * pages].view(B, pages)
        kp, vp = torch.randn(B * pages + 1, 5, Hk, E), torch.randn(B * pages + 1, 5, Hk, E)
        for b in range(B):
            for j in range(S):
                kp[perm[b, j // 5], j % 5], vp[perm[b, j // 5], j % 5] = kc[b, j], vc[b, j]
        kc, vc, table = kp, vp, perm.to(torch.int32)
    batch_idx = rows.to(torch.int32) if layout == "batch-idx" else None
    ref_out, ref_lse, ref_k, ref_v = reference_varlen.kvcache_attention(
        q.double(), ref_k.double(), ref_v.double(), k_new.double(), v_new.double(), cos, sin, seqlens, batch_idx,
        None, E ** -0.5, 5, 0, False, cache_leftpad=leftpad,
    )
    out, lse = attnkern.flash_attn_with_kvcache(q, kc, vc, k_new, v_new, cos, sin, seqlens, batch_idx, leftpad, table,
                                                causal=True, window_size=(5, -1), rotary_interleaved=False,
                                                return_softmax_lse=True)
    assert_close(out, ref_out, torch.float32, "out")
    assert_close(lse, ref_lse, torch.float32, "lse")
    if table is None:
        written = [(rows[b], slice(leftpad[b], seqlens[b] + Lnew)) for b in range(B)]
        for b, (r, cols) in enumerate(written):
            assert_close(kc[r, cols], ref_k[r, cols], torch.float32, f"k_cache row {b} after the append")
    # the padding must matter, or this test could not tell
    unpadded, _, _, _ = reference_varlen.kvcache_attention(
        q.double(), k0.double(), v0.double(), k_new.double(), v_new.double(), cos, sin, seqlens, batch_idx, None,
        E ** -0.5, 5, 0, False)
    assert (unpadded - ref_out).abs().max() > 1e-3


def test_kvcache_has_no_backward(seed):
    kc, vc = make_cache(1, 8, 1, 16, 16, torch.float32)
    q = torch.randn(1, 1, 1, 16, requires_grad=True)
    out = attnkern.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=4)
    with pytest.raises(NotImplementedError, match="no backward"):
        out.sum().backward()


# ---------------------------------------------------------------------------------------
# bad input: every case names the argument


def _varlen_args():
    lq = [5, 7]
    q, k, v = packed(lq, lq, 2, 2, 16, 16, torch.float32)
    return dict(q=q, k=k, v=v, cu_seqlens_q=cu(lq), cu_seqlens_k=cu(lq), max_seqlen_q=7, max_seqlen_k=7)


VARLEN_ERRORS = [
    ("cu_seqlens_q", lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"].long()), TypeError, "cu_seqlens_q must be int32"),
    ("cu_seqlens_k", lambda a: a.update(cu_seqlens_k=torch.tensor([0, 9, 5], dtype=torch.int32)), ValueError,
     "cu_seqlens_k must be non-decreasing"),
    ("past-end", lambda a: a.update(cu_seqlens_q=torch.tensor([0, 5, 13], dtype=torch.int32)), ValueError,
     r"cu_seqlens_q\[-1\] = 13 points past the 12 rows of q"),
    ("start", lambda a: a.update(cu_seqlens_k=torch.tensor([1, 5, 12], dtype=torch.int32)), ValueError,
     "cu_seqlens_k must start at 0"),
    ("batch", lambda a: a.update(cu_seqlens_k=torch.tensor([0, 12], dtype=torch.int32)), ValueError,
     "same number of sequences"),
    ("heads", lambda a: a.update(k=a["k"][:, :1].expand(-1, 3, -1).contiguous(), v=a["v"][:, :1].expand(-1, 3, -1)),
     ValueError, "q heads 2 must be a multiple of k/v heads 3"),
    ("max_seqlen", lambda a: a.update(max_seqlen_q=torch.tensor(3)), ValueError, "max_seqlen_q = 3 is less than"),
    ("max_seqlen-type", lambda a: a.update(max_seqlen_k=7.0), TypeError, "max_seqlen_k must be an int"),
    ("seqused_k", lambda a: a.update(seqused_k=torch.tensor([6, 1], dtype=torch.int32)), ValueError,
     r"seqused_k\[0\] = 6"),
    ("softcap", lambda a: a.update(softcap=-1.0), ValueError, "softcap must be a finite float >= 0"),
    ("alibi", lambda a: a.update(alibi_slopes=torch.ones(3, 2)), ValueError,
     r"alibi_slopes must have shape \(num_heads,\) = \(2,\) or \(batch, num_heads\) = \(2, 2\)"),
    ("alibi-dtype", lambda a: a.update(alibi_slopes=torch.ones(2, dtype=torch.float64)), TypeError,
     "alibi_slopes must be float32"),
    ("s_aux", lambda a: a.update(s_aux=torch.ones(3)), ValueError, r"s_aux must have shape \(num_query_heads,\)"),
    ("dropout", lambda a: a.update(dropout_p=1.5), ValueError, r"dropout_p must be in \[0, 1\]"),
    ("k-dims", lambda a: a.update(k=a["k"][None]), ValueError, "k must be 3-D"),
]


@pytest.mark.parametrize("name,edit,exc,match", VARLEN_ERRORS, ids=[e[0] for e in VARLEN_ERRORS])
def test_varlen_bad_input(name, edit, exc, match):
    args = _varlen_args()
    edit(args)
    with pytest.raises(exc, match=match):
        attnkern.flash_attn_varlen_func(**args)


def test_op_checks_values_too():
    """The C++ op (what torch.compile runs) checks the indices itself."""
    a = _varlen_args()
    bad = torch.tensor([0, 9, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens_k must be non-decreasing"):
        ops_varlen.varlen_fwd(a["q"], a["k"], a["v"], a["cu_seqlens_q"], bad, None, None, 0.25, -1, -1)
    kp = a["k"].view(3, 4, 2, 16)
    table = torch.tensor([[0, 3], [1, 2]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"block_table\[0, 1\] = 3 is outside the cache's 3 blocks"):
        ops_varlen.varlen_fwd(a["q"], kp, kp, a["cu_seqlens_q"], a["cu_seqlens_k"], None, table, 0.25, -1, -1)


def _kv_args():
    kc, vc = make_cache(2, 16, 2, 16, 16, torch.float32)
    return dict(q=torch.randn(2, 1, 4, 16), k_cache=kc, v_cache=vc, k=torch.randn(2, 1, 2, 16),
                v=torch.randn(2, 1, 2, 16), cache_seqlens=torch.tensor([3, 15], dtype=torch.int32))


def _paged(a, page=4, blocks=8):
    a["k_cache"] = torch.randn(blocks, page, 2, 16)
    a["v_cache"] = torch.randn(blocks, page, 2, 16)
    a["block_table"] = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]], dtype=torch.int32)


KV_ERRORS = [
    ("beyond-cache", lambda a: a.update(cache_seqlens=torch.tensor([3, 16], dtype=torch.int32)), ValueError,
     r"cache_seqlens\[1\] \+ L_new = 16 \+ 1 = 17 is beyond the cache's 16 rows"),
    ("heads", lambda a: a.update(q=torch.randn(2, 1, 3, 16)), ValueError, "q heads 3 must be a multiple"),
    ("seqlens-dtype", lambda a: a.update(cache_seqlens=a["cache_seqlens"].long()), TypeError,
     "cache_seqlens must be int32"),
    ("batch-idx", lambda a: a.update(cache_batch_idx=torch.tensor([0, 2], dtype=torch.int32)), ValueError,
     r"cache_batch_idx\[1\] = 2 is outside"),
    ("table-entry", lambda a: (_paged(a), a["block_table"].__setitem__((1, 3), 8)), ValueError,
     r"block_table\[1, 3\] = 8 is outside the cache's 8 blocks"),
    ("table-coverage", lambda a: (_paged(a), a.update(block_table=a["block_table"][:, :3].contiguous())), ValueError,
     "beyond the block_table's coverage of 3 pages x page size 4 = 12 keys"),
    ("page-size", lambda a: (_paged(a), a.update(v_cache=torch.randn(8, 5, 2, 16))), ValueError,
     "v_cache shape .* does not match k_cache shape"),
    ("leftpad", lambda a: a.update(cache_leftpad=torch.tensor([4, 0], dtype=torch.int32)), ValueError,
     r"cache_leftpad\[0\] = 4 must be in \[0, cache_seqlens\[0\]\] = \[0, 3\]"),
    ("leftpad-dtype", lambda a: a.update(cache_leftpad=torch.zeros(2, dtype=torch.int64)), TypeError,
     "cache_leftpad must be int32"),
    ("num_splits", lambda a: a.update(num_splits=-1), ValueError, "num_splits"),
    ("alibi", lambda a: a.update(alibi_slopes=torch.ones(3, 2)), ValueError, "alibi_slopes must have shape"),
    ("s_aux", lambda a: a.update(s_aux=torch.ones(2, dtype=torch.int32)), TypeError, "s_aux must be float32"),
    ("rotary-without-k", lambda a: a.update(k=None, v=None, rotary_cos=torch.ones(16, 4), rotary_sin=torch.ones(16, 4)),
     ValueError, "need k and v"),
    # (meta stands in for another device on a machine without one)
    ("rotary-device", lambda a: a.update(rotary_cos=torch.ones(32, 4, device="meta"), rotary_sin=torch.ones(32, 4)),
     ValueError, "rotary_cos must be on q's device cpu, got meta"),
    ("empty-cache", lambda a: a.update(k_cache=a["k_cache"][:, :0], v_cache=a["v_cache"][:, :0], k=None, v=None,
                                       cache_seqlens=torch.zeros(2, dtype=torch.int32),
                                       cache_leftpad=torch.zeros(2, dtype=torch.int32)),
     ValueError, r"k_cache has no positions \(dim 1 is 0"),
    # a backend that cannot serve the call is refused before the append
    ("backend-refuses", lambda a: a.update(backend="cuda"), RuntimeError, "backend='cuda' cannot run this call"),
]


@pytest.mark.parametrize("name,edit,exc,match", KV_ERRORS, ids=[e[0] for e in KV_ERRORS])
def test_kvcache_bad_input(name, edit, exc, match):
    args = _kv_args()
    edit(args)
    before = args["k_cache"].clone()
    with pytest.raises(exc, match=match):
        attnkern.flash_attn_with_kvcache(**args)
    assert torch.equal(args["k_cache"], before), "a rejected call must not write the cache"


@pytest.mark.parametrize("backend", ["cpu", "math"])
def test_kvcache_empty_query_or_batch(backend):
    """No query row (Lq = 0) or no sequence (B = 0): empty results of the right shapes (the view
    of the output raised on its -1 before)."""
    kc, vc = torch.randn(2, 16, 2, 16), torch.randn(2, 16, 2, 8)
    for q, seqlens in ((torch.randn(2, 0, 4, 16), torch.tensor([3, 9], dtype=torch.int32)),
                       (torch.randn(0, 1, 4, 16), torch.zeros(0, dtype=torch.int32))):
        out, lse = attnkern.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens, return_softmax_lse=True,
                                                    backend=backend)
        B, Lq = q.shape[:2]
        assert out.shape == (B, Lq, 4, 8) and lse.shape == (B, 4, Lq)


@pytest.mark.parametrize("leftpad", [False, True])
def test_kvcache_block_table_of_any_layout(seed, leftpad):
    """A block table whose rows are not contiguous in memory (a column-major copy) reads and appends
    as the same table in row-major memory does (the C++ op reads rows as runs: it gets a copy)."""
    a = _kv_args()
    _paged(a)
    a["block_table"] = torch.tensor([[5, 1, 7, 3], [4, 0, 6, 2]], dtype=torch.int32)
    if leftpad:
        a["cache_leftpad"] = torch.tensor([1, 0], dtype=torch.int32)
    b = {n: t.clone() if isinstance(t, torch.Tensor) else t for n, t in a.items()}
    a["block_table"] = a["block_table"].t().contiguous().t()
    assert a["block_table"].stride(1) != 1 and torch.equal(a["block_table"], b["block_table"])
    out_a = attnkern.flash_attn_with_kvcache(**a, backend="cpu")
    out_b = attnkern.flash_attn_with_kvcache(**b, backend="cpu")
    assert torch.equal(out_a, out_b) and torch.equal(a["k_cache"], b["k_cache"]) and torch.equal(a["v_cache"], b["v_cache"])
    # and against the reference on the appended caches (the new key of sequence 0 sits at 3: page 5, row 3)
    assert torch.equal(a["k_cache"][5, 3], a["k"][0, 0])
    ref = attnkern.flash_attn_with_kvcache(**{**b, "k": None, "v": None,
                                              "cache_seqlens": b["cache_seqlens"] + 1}, backend="math")
    assert_close(out_a, ref, torch.float32)


# ---------------------------------------------------------------------------------------
# torch.library contract


def test_opcheck_varlen(seed):
    lq, lk = [5, 0, 19], [8, 3, 19]
    q, k, v = packed(lq, lk, 4, 2, 16, 8, torch.float32, extra_q=2, extra_k=1)
    for t in (q, k, v):
        t.requires_grad_(True)
    args = (q, k, v, cu(lq), cu(lk), torch.tensor([8, 2, 19], dtype=torch.int32), None, 0.3, 4, 0)
    torch.library.opcheck(torch.ops.attnkern.varlen_fwd.default, args)
    out, lse = torch.ops.attnkern.varlen_fwd(q.detach(), k.detach(), v.detach(), *args[3:])
    bargs = (torch.randn_like(out), torch.randn_like(lse), q.detach(), k.detach(), v.detach(), out, lse, *args[3:6],
             0.3, 4, 0)
    torch.library.opcheck(torch.ops.attnkern.varlen_bwd.default, bargs)
    kp, table = paged_copy(k.detach(), lk, 4)
    torch.library.opcheck(torch.ops.attnkern.varlen_fwd.default,
                          (q.detach(), kp, kp, cu(lq), cu(lk), None, table, 0.3, -1, -1))
    # the modifiers: sinks with a gradient (autograd registration), per-sequence slopes
    sinks = torch.randn(4, requires_grad=True)
    slopes = torch.rand(3, 4)
    torch.library.opcheck(torch.ops.attnkern.varlen_fwd.default, args + (0.7, sinks, slopes))
    out, lse = torch.ops.attnkern.varlen_fwd(q.detach(), k.detach(), v.detach(), *args[3:], 0.7, sinks.detach(), slopes)
    torch.library.opcheck(torch.ops.attnkern.varlen_bwd.default,
                          (torch.randn_like(out), None, q.detach(), k.detach(), v.detach(), out, lse, *args[3:6],
                           0.3, 4, 0, 0.7, slopes))
    # dropout: the seed tensor travels to the backward
    rng = torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64)
    torch.library.opcheck(torch.ops.attnkern.varlen_fwd.default, args + (0.0, None, None, 0.25, rng))
    out, lse = torch.ops.attnkern.varlen_fwd(q.detach(), k.detach(), v.detach(), *args[3:], 0.0, None, None, 0.25, rng)
    torch.library.opcheck(torch.ops.attnkern.varlen_bwd.default,
                          (torch.randn_like(out), None, q.detach(), k.detach(), v.detach(), out, lse, *args[3:6],
                           0.3, 4, 0, 0.0, None, 0.25, rng))


def test_compile_fullgraph(seed):
    torch._dynamo.reset()
    lq = [17, 40]
    q, k, v = packed(lq, lq, 2, 2, 16, 16, torch.float32)
    cq = cu(lq)
    slopes = torch.rand(2, 2) * 0.3

    def f(q, k, v, cq, m, sinks):  # with every modifier: they trace too
        return attnkern.flash_attn_varlen_func(q, k, v, cq, cq, m, m, causal=True, softcap=0.8, alibi_slopes=slopes,
                                               s_aux=sinks, return_lse=True)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    q1, k1, v1, s1 = (t.clone().requires_grad_(True) for t in (q, k, v, torch.randn(2)))
    q2, k2, v2, s2 = (t.detach().clone().requires_grad_(True) for t in (q, k, v, s1))
    out_c, lse_c = compiled(q1, k1, v1, cq, torch.tensor(40), s1)
    out_e, lse_e = f(q2, k2, v2, cq, torch.tensor(40), s2)
    assert torch.equal(out_c, out_e) and torch.equal(lse_c, lse_e)
    g = torch.randn_like(out_c)
    grads_c, grads_e = torch.autograd.grad(out_c, (q1, s1), g), torch.autograd.grad(out_e, (q2, s2), g)
    assert all(torch.equal(a, b) for a, b in zip(grads_c, grads_e))


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_varlen_and_paged_under_isa(isa):
    """The packed orchestration and the paged key reads in every compiled ISA variant."""
    import os
    import subprocess
    import sys

    env = forced_isa_env(isa)
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, "test_varlen.py")
    tests = ["test_varlen_matches_reference[mixed-torch.float32]", "test_varlen_matches_reference[seqused-k-torch.float32]",
             "test_varlen_matches_reference[causal-gqa-cross-torch.bfloat16]", "test_paged_varlen_matches_packed[5]",
             "test_kvcache_decode_bf16_int_seqlens", "test_kvcache_modifiers_match_reference[page5]",
             "test_varlen_modifiers_match_reference[all-per-sequence-alibi-gqa]"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"] + [f"{path}::{t}" for t in tests]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout


def test_packed_benchmark_runs(tmp_path):
    """`attnkern packed` end to end on tiny shapes (FlexAttention and nested-jagged SDPA skipped: slow on CPU)."""
    import json

    from attnkern.bench import packed

    path = tmp_path / "packed.json"
    status = packed.main(["--batch", "2", "--lengths", "16:64", "--dist", "longtail", "--causal", "full",
                          "--modes", "fwd,fwd+bwd", "--budget", "0.01", "--cache-len", "40", "--decode-batch", "2",
                          "--heads", "2", "--kv-heads", "2", "--dim", "16", "--skip", "flex-document-mask,sdpa-nested-jagged",
                          "--json", str(path)])
    assert status == 0
    doc = json.loads(path.read_text())
    timed = {(r["case"].split()[0], r["mode"], row["subject"]) for r in doc["results"] for row in r["rows"]}
    for subject in ("attnkern-varlen", "attnkern-padded", "sdpa-padded"):
        assert ("varlen", "fwd", subject) in timed and ("varlen", "fwd+bwd", subject) in timed
    for subject in ("attnkern-kvcache", "attnkern-paged16", "attnkern-paged256", "sdpa-gathered", "sdpa-inplace"):
        assert ("decode", "fwd", subject) in timed
    assert doc["device"]["threads"] >= 1 and "loadavg_1m" in doc["device"]


def test_kvcache_compile_fullgraph(seed):
    """flash_attn_with_kvcache traces whole, the in-place cache append included."""
    torch._dynamo.reset()
    B, S, Hk, H, E = 2, 32, 2, 4, 16
    kc, vc = make_cache(B, S, Hk, E, E, torch.float32)
    q, kn, vn = torch.randn(B, 2, H, E), torch.randn(B, 2, Hk, E), torch.randn(B, 2, Hk, E)
    seqlens = torch.tensor([5, 20], dtype=torch.int32)

    def f(q, kc, vc, kn, vn, seqlens):
        return attnkern.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=seqlens, causal=True)

    kc2, vc2 = kc.clone(), vc.clone()
    out_c = torch.compile(f, fullgraph=True, backend="aot_eager")(q, kc, vc, kn, vn, seqlens)
    out_e = f(q, kc2, vc2, kn, vn, seqlens)
    assert torch.equal(out_c, out_e) and torch.equal(kc, kc2) and torch.equal(vc, vc2)
    assert torch.equal(kc[1, 20:22], kn[1]), "the compiled call appended in place"
