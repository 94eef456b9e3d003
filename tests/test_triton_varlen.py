"""The Triton packed (varlen) and KV-cache kernels under the Triton interpreter, against the float64
reference (attnkern.reference_varlen).

As in test_triton_interp.py, a plain ``pytest`` run holds one test here, which reruns this file
in a child process with TRITON_INTERPRET=1; there the tests of TestTritonVarlen run. Outputs are
poisoned: torch.empty fills with NaN (deterministic mode), so a row a kernel should have written
and did not shows as NaN, and K/V rows no query may read (past cu_seqlens_k[-1], past
seqused_k, cache pages not in the table) hold NaN.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

pytest.importorskip("triton")

import attnkern  # noqa: E402
import conftest  # noqa: E402
from attnkern import dispatch, ops_varlen, reference_varlen  # noqa: E402
from attnkern._varlen_semantics import VarlenProblem  # noqa: E402
from conftest import TOLERANCE, assert_close, rel_err  # noqa: E402

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
BACKEND = "triton"


def test_triton_varlen_interpreter_suite():
    """Run TestTritonVarlen in a child process that has TRITON_INTERPRET=1 from its start."""
    conftest.run_interpreted(__file__)


test_triton_varlen_interpreter_suite.__test__ = not INTERPRETING


@pytest.fixture
def poisoned_empty():
    """torch.empty returns NaN-filled memory while a test runs."""
    import torch.utils.deterministic as det

    was, fill = torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    det.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(was)
    det.fill_uninitialized_memory = fill


def cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def packed(lengths_q, lengths_k, heads_q, heads_kv, e, ev, dtype, extra):
    """Random packed q/k/v with ``extra`` rows past the sequences (NaN in k/v: no query may read them)."""
    q = torch.randn(sum(lengths_q) + extra, heads_q, e, dtype=torch.float64).to(dtype)
    k = torch.randn(sum(lengths_k) + extra, heads_kv, e, dtype=torch.float64).to(dtype)
    v = torch.randn(sum(lengths_k) + extra, heads_kv, ev, dtype=torch.float64).to(dtype)
    if extra:
        k[-extra:], v[-extra:] = float("nan"), float("nan")
    return q, k, v


def paged_copy(k, v, lengths_k, page):
    """K/V of packed sequences copied into shuffled pages of ``page`` rows (pages no sequence owns
    and unused tails hold NaN) and the block table (unused entries invalid)."""
    heads_kv, e, ev = k.shape[1], k.shape[2], v.shape[2]
    blocks = [-(-n // page) for n in lengths_k]
    num = sum(blocks) + 2
    perm = torch.randperm(num).tolist()
    kp = torch.full((num, page, heads_kv, e), float("nan"), dtype=k.dtype)
    vp = torch.full((num, page, heads_kv, ev), float("nan"), dtype=v.dtype)
    table = torch.full((len(lengths_k), max(blocks) + 1), -5, dtype=torch.int32)
    start = 0
    for b, n in enumerate(lengths_k):
        for j in range(blocks[b]):
            p = perm.pop()
            rows = slice(start + j * page, start + min(n, (j + 1) * page))
            kp[p, : rows.stop - rows.start], vp[p, : rows.stop - rows.start] = k[rows], v[rows]
            table[b, j] = p
        start += n
    return kp, vp, table


def reference(inputs, cq, ck, scale, window, grad_out, grad_lse, seqused=None, softcap=0.0, sinks=None,
              alibi=None, block_table=None):
    """float64 out, lse and (with grad_out) the gradients of every input."""
    ref_in = [t.detach().double().requires_grad_(grad_out is not None) for t in inputs]
    q, k, v = ref_in[:3]
    out, lse = reference_varlen.varlen_attention(
        q, k, v, cq, ck, scale, window[0], window[1], seqused, block_table, softcap,
        ref_in[3] if sinks is not None else None, None if alibi is None else alibi.double())
    if grad_out is None:
        return out, lse, None
    fin = torch.isfinite(lse)
    loss = (out * grad_out.double()).sum() + (torch.where(fin, lse, 0.0) * grad_lse.double()).sum()
    # NaN rows nobody reads: their (zero) gradient would come back NaN through 0 * NaN
    return out, lse, torch.autograd.grad(loss, ref_in, allow_unused=True)


def check_lse(lse, ref_lse, dtype):
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "LSE -inf exactly where the reference has it"
    fin = torch.isfinite(ref_lse)
    assert (lse[fin].double() - ref_lse[fin]).abs().max().item() < 50 * TOLERANCE[dtype] + 1e-5


# (lengths_q, lengths_k, heads_q, heads_kv, e, ev, causal, window, extra rows, seqused_k)
CASES = {
    # zero-length q, q longer than k (rows without keys under causal), GQA, tail rows
    "causal-gqa-zero-q": ([37, 1, 0, 20], [37, 5, 9, 12], 4, 2, 16, 16, True, (-1, -1), 3, None),
    "window-zero-k-Ev": ([20, 9, 17], [0, 30, 17], 2, 1, 24, 16, False, (6, 3), 2, None),
    "seqused-k": ([16, 5, 3], [40, 30, 7], 2, 2, 16, 16, True, (-1, -1), 0, [21, 0, 7]),
}


@pytest.mark.usefixtures("poisoned_empty")
class TestTritonVarlen:
    __test__ = INTERPRETING

    @pytest.mark.parametrize("name,dtype", [(name, torch.float32) for name in CASES]
                             + [("causal-gqa-zero-q", torch.float16)], ids=str)
    def test_varlen_matches_reference(self, name, dtype, seed):
        lq, lk, hq, hkv, e, ev, causal, window, extra, used = CASES[name]
        q, k, v = packed(lq, lk, hq, hkv, e, ev, dtype, extra)
        cq, ck = cu(lq), cu(lk)
        seqused = None
        if used is not None:
            seqused = torch.tensor(used, dtype=torch.int32)
            for b, n in enumerate(used):  # keys past seqused_k: no query may read them
                k[int(ck[b]) + n:int(ck[b + 1])] = float("nan")
                v[int(ck[b]) + n:int(ck[b + 1])] = float("nan")
        for t in (q, k, v):
            t.requires_grad_(True)
        out, lse = attnkern.flash_attn_varlen_func(q, k, v, cq, ck, max(lq), max(lk), 0.0, None, causal, window,
                                                   seqused_k=seqused, return_lse=True, backend=BACKEND)
        grad_out = torch.randn_like(out)
        grad_lse = torch.where(torch.isfinite(lse), torch.randn_like(lse), 0)
        dq, dk, dv = torch.autograd.grad((out, lse), (q, k, v), (grad_out, grad_lse))
        eff = (window[0], 0 if causal else window[1])
        ref_out, ref_lse, ref_grads = reference((q, k, v), cq, ck, e ** -0.5, eff, grad_out, grad_lse, seqused)
        assert out.shape == (q.shape[0], hq, ev) and out.is_contiguous()
        assert_close(out, ref_out, dtype, "out")
        check_lse(lse, ref_lse, dtype)
        end_q = int(cq[-1])
        assert out[end_q:].eq(0).all() and dq[end_q:].eq(0).all(), "rows past cu_seqlens_q[-1]: out 0, grad 0"
        for g, r, what in zip((dq, dk, dv), ref_grads, ("dq", "dk", "dv")):
            r = torch.nan_to_num(r, nan=0.0)
            assert_close(g, r, dtype, what)
            assert torch.equal(g[r.eq(0).all(-1).all(-1)].abs().sum(), torch.zeros((), dtype=dtype)), \
                f"{what}: rows no query reads get gradient 0"

    def test_packed_forms_and_determinism(self, seed):
        lq = [19, 33, 0, 8]
        qkv = torch.randn(sum(lq), 3, 2, 16, requires_grad=True)
        cq = cu(lq)
        out1 = attnkern.flash_attn_varlen_qkvpacked_func(qkv, cq, torch.tensor(33), causal=True, backend=BACKEND)
        out2 = attnkern.flash_attn_varlen_kvpacked_func(qkv[:, 0], qkv[:, 1:], cq, cq, 33, 33, causal=True,
                                                        backend=BACKEND)
        out3 = attnkern.flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cq, cq, 33, 33, causal=True,
                                               deterministic=True, backend=BACKEND)
        assert torch.equal(out1, out3) and torch.equal(out2, out3)
        ref, _, _ = reference(qkv.unbind(1), cq, cq, 16 ** -0.5, (-1, 0), None, None)
        assert_close(out1, ref, torch.float32, "qkvpacked")
        g = torch.randn_like(out1)
        (d1,) = torch.autograd.grad(out1, qkv, g)
        (d2,) = torch.autograd.grad(attnkern.flash_attn_varlen_qkvpacked_func(qkv, cq, 33, causal=True,
                                                                             backend=BACKEND), qkv, g)
        assert torch.equal(d1, d2), "backward must be deterministic"
        # the packed call equals the dense Triton kernel on each sequence
        start = 0
        for n in lq:
            if n:
                dense = attnkern.flash_attn_func(*(qkv[None, start:start + n, i] for i in range(3)), causal=True,
                                                 backend=BACKEND)
                assert_close(out1[start:start + n], dense[0], torch.float32, f"sequence of {n} vs dense")
            start += n

    def test_modifiers_match_reference(self, seed):
        """softcap, sinks (+ their gradient) and per-sequence ALiBi slopes, causal GQA, a sequence without keys."""
        lq, lk = [9, 30, 4, 0], [9, 41, 0, 3]
        q, k, v = packed(lq, lk, 4, 2, 16, 16, torch.float32, 2)
        cq, ck = cu(lq), cu(lk)
        s_aux = torch.randn(4, dtype=torch.float64).float() * 2
        slopes = torch.rand(len(lq), 4, dtype=torch.float64).float() * 0.3
        inputs = [q, k, v, s_aux]
        for t in inputs:
            t.requires_grad_(True)
        out, lse = attnkern.flash_attn_varlen_func(q, k, v, cq, ck, 30, 41, 0.0, None, True, (-1, -1), 0.8, slopes,
                                                   s_aux=s_aux, return_lse=True, backend=BACKEND)
        grad_out = torch.randn_like(out)
        grad_lse = torch.where(torch.isfinite(lse), torch.randn_like(lse), 0)
        grads = torch.autograd.grad((out, lse), inputs, (grad_out, grad_lse))
        ref_out, ref_lse, ref_grads = reference(inputs, cq, ck, 0.25, (-1, 0), grad_out, grad_lse, softcap=0.8,
                                                sinks=True, alibi=slopes)
        assert_close(out, ref_out, torch.float32, "out")
        check_lse(lse, ref_lse, torch.float32)
        for g, r, what in zip(grads, ref_grads, ("dq", "dk", "dv", "d s_aux")):
            assert_close(g, torch.nan_to_num(r, nan=0.0), torch.float32, what)
        rows = slice(39, 43)  # sequence 2 has no key: output 0, LSE = the sink
        # (the LSE goes through the log2 domain and back: equal to the sink within an ulp or two)
        assert out[rows].eq(0).all()
        torch.testing.assert_close(lse[:, rows], s_aux.detach()[:, None].expand(-1, 4), rtol=1e-6, atol=0)

    @pytest.mark.parametrize("page,sms", [(3, None), (16, 1000)], ids=["page3", "page16-many-splits"])
    def test_paged_varlen(self, page, sms, seed, monkeypatch):
        """Keys read through a shuffled block table (pages no sequence owns are NaN); with many "SMs"
        the key blocks are split over programs and merged by LSE, sinks included."""
        from attnkern.triton import launch_varlen

        if sms is not None:
            monkeypatch.setattr(launch_varlen, "INTERPRETER_SMS", sms)
        lq, lk = [3, 1, 20], [70, 0, 37]
        q, k, v = packed(lq, lk, 2, 1, 16, 16, torch.float32, 0)
        kp, vp, table = paged_copy(k, v, lk, page)
        s_aux = torch.randn(2)
        splits = launch_varlen.num_splits(lq, lk, 2, launch_varlen.INTERPRETER_SMS, 16, 16)
        assert splits == (3 if sms else 1)
        out, lse = attnkern.flash_attn_varlen_func(q, kp, vp, cu(lq), cu(lk), 20, 70, causal=True, block_table=table,
                                                   s_aux=s_aux, return_lse=True, backend=BACKEND)
        ref_out, ref_lse, _ = reference((q, k, v, s_aux), cu(lq), cu(lk), 0.25, (-1, 0), None, None, sinks=True)
        assert_close(out, ref_out, torch.float32, f"paged, page {page}")
        check_lse(lse, ref_lse, torch.float32)

    def test_dropout_matches_reference(self, seed):
        """dropout_p: the same torch seed gives the reference's Philox pattern (sequence b: the dense
        pattern of a batch of one keyed by seed + b, rows and keys counted within the sequence),
        forward and backward; GQA, a zero-length sequence, rows past the sequences."""
        lq, lk = [21, 0, 9, 1], [24, 5, 9, 40]
        q, k, v = packed(lq, lk, 2, 1, 16, 16, torch.float32, 2)
        cq, ck = cu(lq), cu(lk)
        g = torch.randn(q.shape[0], 2, 16, dtype=torch.float64)

        def run(tensors, backend, p, grads=True):
            tensors = [t.detach().requires_grad_(grads) for t in tensors]
            torch.manual_seed(seed)  # the dropout seed is drawn from torch's generator
            out = attnkern.flash_attn_varlen_func(*tensors, cq, ck, 21, 40, p, causal=True, backend=backend)
            return out, torch.autograd.grad(out, tensors, g.to(out.dtype)) if grads else None

        out, grads = run((q, k, v), BACKEND, 0.3)
        ref, ref_grads = run((q.double(), k.double(), v.double()), "math", 0.3)
        assert_close(out, ref, torch.float32, "out")
        assert out[int(cq[-1]):].eq(0).all(), "rows past cu_seqlens_q[-1]: out 0"
        for name, a, b in zip("qkv", grads, ref_grads):
            assert_close(a, torch.nan_to_num(b, nan=0.0), torch.float32, f"d{name}")
        assert torch.equal(out, run((q, k, v), BACKEND, 0.3, False)[0]), "the same seed must give the same pattern"
        undropped = run((q.double(), k.double(), v.double()), "math", 0.0, False)[0]
        assert rel_err(undropped, ref) > 0.1, "the dropout must matter, or this test could not tell"

    def test_dropout_seed_carry_paged_split(self, monkeypatch, seed):
        """Sequence seeds ``seed + b`` carry into the high word and wrap at 2**64 (seed -2: sequences
        0..3 use 2**64 - 2, 2**64 - 1, 0, 1), fp16, paged keys with the key blocks split over programs."""
        from attnkern.triton import launch_varlen

        monkeypatch.setattr(launch_varlen, "INTERPRETER_SMS", 1000)
        lq, lk = [2, 1, 3, 1], [45, 20, 33, 50]
        q, k, v = packed(lq, lk, 2, 1, 16, 16, torch.float16, 0)
        kp, vp, table = paged_copy(k, v, lk, 8)
        assert launch_varlen.num_splits(lq, lk, 2, 1000, 16, 16) > 1
        rng_seed = torch.tensor([-2], dtype=torch.int64)
        out, lse = ops_varlen.triton_varlen_fwd(q, kp, vp, cu(lq), cu(lk), None, table, 0.25, -1, 0, 0.0, None,
                                                None, 0.4, rng_seed)
        ref_out, ref_lse = reference_varlen.varlen_attention(q.double(), k.double(), v.double(), cu(lq), cu(lk),
                                                             0.25, -1, 0, dropout_p=0.4, seed=2**64 - 2)
        assert_close(out, ref_out, torch.float16, "out")
        check_lse(lse, ref_lse, torch.float16)  # dropout acts after the softmax: the LSE is the undropped one
        undropped, _ = reference_varlen.varlen_attention(q.double(), k.double(), v.double(), cu(lq), cu(lk), 0.25,
                                                         -1, 0)
        assert rel_err(undropped, ref_out) > 0.1, "the dropout must matter, or this test could not tell"

    @pytest.mark.parametrize(
        "name,paged", [("rotary-batch-idx", None), ("rotary-neox-window", 5), ("decode-split-sinks", 7)])
    def test_kvcache_matches_reference(self, name, paged, seed):
        """flash_attn_with_kvcache: in-place append, rotary, cache_batch_idx, paged caches, split-KV decode."""
        B, H, Hk, E, S = 2, 2, 1, 16, 42
        Lq, Lnew = (1, 1) if name.startswith("decode") else (3, 3)
        q = torch.randn(B, Lq, H, E)
        k_new, v_new = torch.randn(B, Lnew, Hk, E), torch.randn(B, Lnew, Hk, E)
        seqlens = torch.tensor([S - Lnew - 1, 9], dtype=torch.int32)
        cos = sin = None
        if name.startswith("rotary"):
            theta = torch.rand(S + 4, 4, dtype=torch.float64) * 6.28
            cos, sin = torch.cos(theta).float(), torch.sin(theta).float()
        batch_idx = torch.tensor([2, 0], dtype=torch.int32) if name == "rotary-batch-idx" else None
        kc, vc = torch.randn(3, S, Hk, E), torch.randn(3, S, Hk, E)
        table = None
        if paged:
            pages = -(-S // paged)
            kc, vc = torch.randn(B * pages + 1, paged, Hk, E), torch.randn(B * pages + 1, paged, Hk, E)
            table = torch.randperm(B * pages + 1)[: B * pages].to(torch.int32).view(B, pages)
        s_aux = torch.randn(H) if name.endswith("sinks") else None
        window = (7, -1) if name.endswith("window") else (-1, -1)
        interleaved = name != "rotary-neox-window"
        ref_out, ref_lse, ref_k, ref_v = reference_varlen.kvcache_attention(
            q.double(), kc.double(), vc.double(), k_new.double(), v_new.double(), cos, sin, seqlens, batch_idx,
            table, E ** -0.5, window[0], 0, interleaved, sinks=None if s_aux is None else s_aux.double())
        out, lse = attnkern.flash_attn_with_kvcache(
            q, kc, vc, k_new, v_new, cos, sin, seqlens, batch_idx, None, table, None, True, window, 0.0, interleaved,
            None, 0, True, s_aux=s_aux, backend=BACKEND)
        assert out.shape == (B, Lq, H, E) and lse.shape == (B, H, Lq)
        assert_close(out, ref_out, torch.float32, "out")
        assert_close(lse, ref_lse, torch.float32, "lse")
        assert_close(kc, ref_k, torch.float32, "k_cache after the append")
        assert_close(vc, ref_v, torch.float32, "v_cache after the append")

    def test_compile_fullgraph(self, seed):
        """torch.compile traces the Triton packed op whole (shared fake kernels), forward and backward."""
        torch._dynamo.reset()
        lq = [9, 20]
        q, k, v = packed(lq, lq, 2, 1, 16, 16, torch.float32, 0)
        cq = cu(lq)

        def f(q, k, v, m):
            return attnkern.flash_attn_varlen_func(q, k, v, cq, cq, m, m, causal=True, softcap=0.5,
                                                   return_lse=True, backend=BACKEND)

        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        eager_in = [t.clone().requires_grad_(True) for t in (q, k, v)]
        compiled_in = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out_c, lse_c = compiled(*compiled_in, torch.tensor(20))
        out_e, lse_e = f(*eager_in, torch.tensor(20))
        assert torch.equal(out_c, out_e) and torch.equal(lse_c, lse_e)
        g = torch.randn_like(out_c)
        for a, b in zip(torch.autograd.grad(out_c, compiled_in, g), torch.autograd.grad(out_e, eager_in, g)):
            assert torch.equal(a, b)

    def test_num_splits_heuristic(self):
        from attnkern.triton.launch_varlen import MAX_SPLITS, num_splits

        assert num_splits([1] * 4, [4096] * 4, 8, 132) == 5  # 32 programs on 132 SMs
        assert num_splits([1] * 64, [4096] * 64, 8, 132) == 1  # the SMs are busy already
        assert num_splits([1], [100], 1, 132) == 1  # too few keys to split
        assert num_splits([1], [10**6], 1, 10**4) == MAX_SPLITS
        assert num_splits([0, 0], [50, 50], 2, 132) == 1

    def test_auto_picks_triton_for_cuda_tensors(self, monkeypatch):
        """The capability table: CUDA tensors go to Triton (sm80+), else math; CPU tensors to the CPU kernels.
        (The CUDA row, tested in test_cuda_varlen.py, is held out: on a GPU it would serve.)"""
        monkeypatch.setitem(dispatch.PACKED_WHY_NOT, "cuda", lambda problem: "held out of this test")
        problem = VarlenProblem(batch=70000, heads_q=4, heads_kv=2, total_q=9, head_dim=64, head_dim_v=64, scale=0.1,
                                window_left=-1, window_right=0, page_size=0, dtype=torch.bfloat16,
                                device_type="cuda")
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
        assert dispatch.choose_packed(problem, "auto") == "triton"  # any number of sequences
        assert dispatch.choose_packed(dataclasses.replace(problem, dropout_p=0.1), "auto") == "triton"
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
        assert dispatch.choose_packed(problem, "auto") == "math"
        with pytest.raises(RuntimeError, match="compute capability 8.0"):
            dispatch.choose_packed(problem, "triton")
        with pytest.raises(RuntimeError, match="backend='cuda' cannot run this call: held out"):
            dispatch.choose_packed(problem, "cuda")

    def test_bad_input(self):
        """The op checks its own arguments and index values before a kernel reads through them."""
        lq = [5, 7]
        q, k, v = packed(lq, lq, 2, 2, 16, 16, torch.float32, 0)
        op = ops_varlen.triton_varlen_fwd
        bad_cu = torch.tensor([0, 9, 5], dtype=torch.int32)
        with pytest.raises(ValueError, match="cu_seqlens_k must be non-decreasing"):
            op(q, k, v, cu(lq), bad_cu, None, None, 0.25, -1, -1)
        with pytest.raises(ValueError, match=r"cu_seqlens_q\[-1\] = 13 points past the 12 rows of q"):
            op(q, k, v, torch.tensor([0, 5, 13], dtype=torch.int32), cu(lq), None, None, 0.25, -1, -1)
        with pytest.raises(TypeError, match="cu_seqlens_q must be int32"):
            op(q, k, v, cu(lq).long(), cu(lq), None, None, 0.25, -1, -1)
        with pytest.raises(ValueError, match=r"seqused_k\[1\] = 8"):
            op(q, k, v, cu(lq), cu(lq), torch.tensor([5, 8], dtype=torch.int32), None, 0.25, -1, -1)
        with pytest.raises(ValueError, match="multiple of k/v heads"):
            op(torch.randn(12, 3, 16), k, v, cu(lq), cu(lq), None, None, 0.25, -1, -1)
        with pytest.raises(ValueError, match="rng_seed must be a CPU int64 tensor"):
            op(q, k, v, cu(lq), cu(lq), None, None, 0.25, -1, -1, 0.0, None, None, 0.5)
        with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
            op(q, k, v, cu(lq), cu(lq), None, None, 0.25, -1, -1, 0.0, None, None, 1.0, torch.tensor([1]))
        with pytest.raises(ValueError, match="head dims"):
            op(*(torch.randn(12, 1, 300) for _ in range(3)), cu(lq), cu(lq), None, None, 0.25, -1, -1)
        kp = k.view(3, 4, 2, 16)
        with pytest.raises(ValueError, match=r"block_table\[0, 1\] = 3 is outside the cache's 3 blocks"):
            op(q, kp, kp, cu(lq), cu(lq), None, torch.tensor([[0, 3], [1, 2]], dtype=torch.int32), 0.25, -1, -1)
        with pytest.raises(ValueError, match="beyond the block_table's coverage"):
            op(q, kp, kp, cu(lq), cu(lq), None, torch.tensor([[0], [1]], dtype=torch.int32), 0.25, -1, -1)
        with pytest.raises(RuntimeError, match="cannot run bfloat16"):
            attnkern.flash_attn_varlen_func(q.bfloat16(), k.bfloat16(), v.bfloat16(), cu(lq), cu(lq), 7, 7,
                                            backend=BACKEND)
        table = torch.tensor([[0, 1], [1, 2]], dtype=torch.int32)
        qg = q.clone().requires_grad_(True)
        out = attnkern.flash_attn_varlen_func(qg, kp, kp, cu(lq), cu(lq), 7, 7, block_table=table, backend=BACKEND)
        with pytest.raises(NotImplementedError, match="no backward"):
            out.sum().backward()

    def test_opcheck(self, seed):
        """Schema, fake kernels (shapes and strides) and autograd registration agree with the kernels."""
        lq, lk = [5, 0, 9], [8, 3, 9]
        q = torch.randn(16, 2, 16, requires_grad=True)
        k, v = torch.randn(21, 1, 16, requires_grad=True), torch.randn(21, 1, 8, requires_grad=True)
        args = (q, k, v, cu(lq), cu(lk), torch.tensor([8, 2, 9], dtype=torch.int32), None, 0.3, 4, 0, 0.5,
                torch.randn(2), torch.rand(3, 2))
        torch.library.opcheck(ops_varlen.triton_varlen_fwd, args,
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
        out, lse = ops_varlen.triton_varlen_fwd(q.detach(), k.detach(), v.detach(), *args[3:])
        bargs = (torch.randn_like(out), torch.randn_like(lse), q.detach(), k.detach(), v.detach(), out, lse,
                 *args[3:6], 0.3, 4, 0, 0.5, args[12])
        torch.library.opcheck(ops_varlen.triton_varlen_bwd, bargs, test_utils=("test_schema", "test_faketensor"))
        assert ops_varlen.schemas_match()
