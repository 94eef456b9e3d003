"""The Triton backend on CUDA tensors: the foundation's parity matrix (bf16 included) against the
float64 reference, longer sequences that reach the autotuned tiles' interior blocks, and
run-to-run identical gradients from the deterministic backward. Skipped without a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

import attnkern  # noqa: E402
from conftest import Case, assert_close  # noqa: E402
from test_parity import CASES, DTYPES, HEAD_DIMS, run_case  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") == "1", reason="kernels are interpreted here"),
]
BACKEND = "triton"
DEVICE = "cuda"

LONG_CASES = [
    Case(batch=1, heads_q=8, heads_kv=2, len_q=1531, len_k=1531, head_dim=128, causal=True, id="long-causal-gqa"),
    Case(batch=1, heads_q=4, heads_kv=4, len_q=2000, len_k=2000, head_dim=64, window=(255, 0), id="long-window"),
    Case(batch=1, heads_q=4, heads_kv=4, len_q=700, len_k=1900, head_dim=96, window=(100, 300), id="long-L<S"),
    Case(batch=2, heads_q=2, heads_kv=1, len_q=1024, len_k=1024, head_dim=256, id="long-hdim256"),
    Case(batch=1, heads_q=2, heads_kv=2, len_q=1000, len_k=1200, head_dim=64, mask="float-bcast", causal=True,
         id="long-mask"),
]


def test_kernels_are_compiled():
    from triton.runtime.jit import JITFunction

    from attnkern.triton import forward

    assert isinstance(forward.fwd_kernel, JITFunction)
    assert "triton" in attnkern.available_backends("cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES + LONG_CASES, ids=lambda c: c.id)
def test_parity(case, dtype, seed):
    run_case(case, dtype, BACKEND, seed, device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_head_dims(head_dim, dtype, seed):
    run_case(Case(head_dim=head_dim, len_q=45, len_k=70, causal=head_dim % 2 == 0), dtype, BACKEND, seed,
             device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ["full", "bcast"])
def test_float_mask_gradient(shape, dtype, seed):
    case = Case(mask="float" if shape == "full" else "float-bcast", len_q=50, len_k=60, causal=True)
    run_case(case, dtype, BACKEND, seed, device=DEVICE, mask_grad=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_matches_reference(p, dtype, seed):
    run_case(Case(dropout_p=p, heads_q=4, heads_kv=2, len_q=70, len_k=290, id=""), dtype, BACKEND, seed,
             device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("len_q,len_k,causal,window", [(40, 900, True, (-1, -1)), (900, 40, True, (-1, -1)),
                                                       (700, 700, False, (64, 0)), (500, 1200, False, (32, 32))])
def test_flash_layout_bottom_right_and_lse(len_q, len_k, causal, window, dtype, seed):
    """flash_attn_func on CUDA: bottom-right band, (B, L, H, D) layout, GQA, LSE and its gradient."""
    q = torch.randn(2, len_q, 4, 64, device=DEVICE).to(dtype).requires_grad_(True)
    k, v = (torch.randn(2, len_k, 2, 64, device=DEVICE).to(dtype).requires_grad_(True) for _ in range(2))
    out, lse = attnkern.flash_attn_func(q, k, v, causal=causal, window_size=window, return_lse=True, backend=BACKEND)
    finite = torch.isfinite(lse)
    g_out, g_lse = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out * g_out).sum() + (lse.where(finite, 0) * g_lse).sum(), (q, k, v))
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_(True) for t in (q, k, v))
    ref_out, ref_lse = attnkern.flash_attn_func(q64, k64, v64, causal=causal, window_size=window, return_lse=True,
                                                backend="math")
    assert torch.equal(torch.isfinite(ref_lse), finite.cpu())
    ref_loss = (ref_out * g_out.cpu().double()).sum() + (ref_lse.where(finite.cpu(), 0) * g_lse.cpu().double()).sum()
    ref_grads = torch.autograd.grad(ref_loss, (q64, k64, v64))
    assert_close(out, ref_out, dtype, "out")
    assert_close(lse.where(finite, 0), ref_lse.where(finite.cpu(), 0), torch.float32 if dtype == torch.float32
                 else dtype, "lse")
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(g, r, dtype, name)


@pytest.mark.parametrize(
    "case",
    [Case(batch=2, heads_q=8, heads_kv=2, len_q=1100, len_k=1100, head_dim=128, causal=True, id="gqa-causal"),
     Case(batch=1, heads_q=4, heads_kv=4, len_q=2048, len_k=2048, head_dim=64, window=(511, 0), id="window"),
     Case(batch=2, heads_q=4, heads_kv=4, len_q=300, len_k=500, head_dim=64, mask="float", dropout_p=0.2,
          id="mask-dropout")],
    ids=lambda c: c.id,
)
def test_backward_is_deterministic(case, seed):
    """Two backward passes on the same inputs give bit-identical gradients (no atomics)."""
    from conftest import make_inputs

    q, k, v, mask = make_inputs(case, torch.bfloat16, DEVICE)
    if mask is not None:
        mask.requires_grad_(True)
    inputs = [q, k, v] + ([mask] if mask is not None else [])
    results = []
    for _ in range(2):
        torch.manual_seed(seed)
        out = attnkern.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=case.dropout_p, is_causal=case.causal,
            enable_gqa=case.heads_q != case.heads_kv, window_size=case.window, backend=BACKEND,
        )
        torch.manual_seed(seed + 1)
        results.append([out] + list(torch.autograd.grad(out, inputs, torch.randn_like(out))))
    for name, a, b in zip(("out", "dq", "dk", "dv", "dmask"), *results):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


@pytest.mark.parametrize("head_dim", [64, 128])
def test_autotuned_launch(head_dim, seed, monkeypatch):
    """With tuning on (gpu_check.sh runs the other tests with one candidate), the chosen config is right too."""
    monkeypatch.setenv("ATTNKERN_TRITON_AUTOTUNE", "1")
    case = Case(batch=2, heads_q=4, heads_kv=2, len_q=1024, len_k=1024, head_dim=head_dim, causal=True)
    run_case(case, torch.bfloat16, BACKEND, seed, device=DEVICE)


# ---------------------------------------------------------------------------------------
# packed (varlen) and KV-cache calls (attnkern/triton/varlen.py), unverified until a GPU runs them


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_varlen_long_documents(dtype, seed):
    """Mixed-length documents through the autotuned tiles: out, LSE and gradients against float64,
    and run-to-run identical gradients."""
    import test_triton_varlen as tv

    lq, lk = [1000, 3, 517, 0, 2048], [1000, 40, 517, 9, 2048]
    q, k, v = (t.to(DEVICE) for t in tv.packed(lq, lk, 8, 2, 128, 128, dtype, 5))
    cq, ck = tv.cu(lq).to(DEVICE), tv.cu(lk).to(DEVICE)
    for t in (q, k, v):
        t.requires_grad_(True)
    runs = []
    for _ in range(2):
        out, lse = attnkern.flash_attn_varlen_func(q, k, v, cq, ck, 2048, 2048, causal=True, window_size=(700, -1),
                                                   return_lse=True, backend=BACKEND)
        torch.manual_seed(seed)
        grad_out = torch.randn_like(out)
        grad_lse = torch.where(torch.isfinite(lse), torch.randn_like(lse), 0)
        runs.append((out, lse, *torch.autograd.grad((out, lse), (q, k, v), (grad_out, grad_lse))))
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), *runs):
        assert torch.equal(a, b), f"{name} differs between two identical runs"
    out, lse, dq, dk, dv = runs[0]
    ref_out, ref_lse, ref_grads = tv.reference((q, k, v), cq, ck, 128 ** -0.5, (700, 0), grad_out, grad_lse)
    assert_close(out, ref_out, dtype, "out")
    tv.check_lse(lse, ref_lse, dtype)
    for g, r, name in zip((dq, dk, dv), ref_grads, ("dq", "dk", "dv")):
        assert_close(g, torch.nan_to_num(r, nan=0.0), dtype, name)


@pytest.mark.parametrize("page", [16, 256, 100])
def test_kvcache_paged_split_decode(page, seed):
    """bf16 decoding from a paged cache (split-KV: 4 x 8 programs leave the SMs idle), sinks, in-place append."""
    from attnkern import reference_varlen

    B, H, Hk, E, S = 4, 8, 2, 128, 3000
    pages = -(-S // page)
    kc = torch.randn(B * pages, page, Hk, E, device=DEVICE).bfloat16()
    vc = torch.randn(B * pages, page, Hk, E, device=DEVICE).bfloat16()
    table = torch.randperm(B * pages, device=DEVICE).to(torch.int32).view(B, pages)
    q = torch.randn(B, 1, H, E, device=DEVICE).bfloat16()
    k_new, v_new = (torch.randn(B, 1, Hk, E, device=DEVICE).bfloat16() for _ in range(2))
    seqlens = torch.tensor([2999, 1, 1500, 640], dtype=torch.int32, device=DEVICE)
    s_aux = torch.randn(H, device=DEVICE)
    ref_out, ref_lse, ref_k, _ = reference_varlen.kvcache_attention(
        q.double(), kc.double(), vc.double(), k_new.double(), v_new.double(), cache_seqlens=seqlens,
        block_table=table, scale=E ** -0.5, window_right=0, sinks=s_aux.double())
    out, lse = attnkern.flash_attn_with_kvcache(q, kc, vc, k_new, v_new, cache_seqlens=seqlens, block_table=table,
                                                causal=True, return_softmax_lse=True, s_aux=s_aux, backend=BACKEND)
    assert_close(out, ref_out, torch.bfloat16, "out")
    assert_close(lse, ref_lse, torch.float32, "lse")
    assert torch.equal(kc.double(), ref_k), "the append wrote k_new in place"
