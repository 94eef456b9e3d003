"""The Triton top-k kernels (attnkern/triton/topk.py) run by the Triton interpreter on CPU tensors.

Forward and backward in float32 and float16 against the float64 reference: head dims 16-64
(padded and not), GQA/MQA, causal and windowed bands in both alignments, bool/float masks
(with the float mask's gradient), rows with fewer than top_k keys or none, top_k in
{1, 2, 7, 64, >= S}, the returned indices, and the tie rule. As in test_triton_interp.py, a
plain ``pytest`` run holds one test that reruns this file in a child process with
TRITON_INTERPRET=1 (set before triton is imported); shapes are tiny because the interpreter
is slow. GPU: unverified (no GPU run); the kernels are compiled for sm90 below, as in test_triton_compile.py.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

pytest.importorskip("triton")

import attnkern  # noqa: E402
import conftest  # noqa: E402
import test_topk  # noqa: E402
from attnkern import dispatch, reference  # noqa: E402
from conftest import assert_close  # noqa: E402

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
DTYPES = [torch.float32, torch.float16]


def test_interpreter_suite():
    """Run TestTopkInterpreter in a child process that has TRITON_INTERPRET=1 from its start."""
    conftest.run_interpreted(__file__)


test_interpreter_suite.__test__ = not INTERPRETING  # collected in the parent process only


def test_triton_refuses_cpu_tensors_without_the_interpreter():
    if INTERPRETING:
        pytest.skip("the parent process checks this")
    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        attnkern.topk_attention(q, q, q, 2, backend="triton")


test_triton_refuses_cpu_tensors_without_the_interpreter.__test__ = not INTERPRETING

# test_topk.PARITY's features at interpreter sizes (query tile 16, key tile max(16, K_PAD)):
# several query and key blocks, lengths off the tile, edge and interior blocks
PARITY = [
    # (B, Hq, Hkv, L, S, E, Ev), top_k, mask, (left, right), causal
    ((1, 2, 2, 20, 37, 16, 16), 1, None, (-1, -1), False),
    ((1, 2, 1, 33, 70, 32, 24), 7, None, (-1, -1), True),  # GQA, E != Ev, 3 query x 5 key blocks
    ((2, 2, 1, 16, 50, 16, 16), 2, "bool", (12, 5), False),  # MQA, window, a row with no key
    ((1, 1, 1, 16, 150, 40, 40), 64, "float", (-1, -1), False),  # padded head dim, float mask gradient
    ((1, 1, 1, 19, 37, 64, 16), 64, "bool-bcast", (-1, -1), True),  # top_k >= S
    ((1, 1, 1, 16, 40, 16, 16), 7, None, (3, 3), False),  # rows with fewer than top_k keys
]


class TestTopkInterpreter:
    __test__ = INTERPRETING  # collected in the child process only

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("case", PARITY, ids=lambda c: f"{c[0]}-k{c[1]}-{c[2]}-w{c[3]}-c{c[4]}")
    def test_parity_with_reference(self, case, dtype, seed):
        test_topk.check_parity(case, dtype, "triton", seed)

    def test_bottom_right_alignment_through_the_op(self, seed):
        test_topk.check_bottom_right_alignment(torch.ops.attnkern.triton_topk_fwd)

    def test_exact_ties_go_to_the_lower_key_index(self, seed):
        test_topk.test_exact_ties_go_to_the_lower_key_index("triton", seed)

    def test_top_k_at_least_s_is_dense_attention(self, seed):
        q, k, v = torch.randn(1, 1, 21, 16), torch.randn(1, 1, 30, 16), torch.randn(1, 1, 30, 16)
        out = attnkern.topk_attention(q, k, v, 30, is_causal=True, backend="triton")
        dense = attnkern.scaled_dot_product_attention(q, k, v, is_causal=True, backend="math")
        assert_close(out, dense, torch.float32, "top-k vs dense")

    @pytest.mark.parametrize("shape", [(0, 5, 8, 8), (4, 0, 8, 8)], ids=str)
    def test_empty_sequences(self, shape):
        L, S, E, Ev = shape
        q, k, v = torch.randn(1, 2, L, E), torch.randn(1, 2, S, E), torch.randn(1, 2, S, Ev)
        for t in (q, k, v):
            t.requires_grad_(True)
        out, idx = attnkern.topk_attention(q, k, v, 3, return_indices=True, backend="triton")
        assert out.shape == (1, 2, L, Ev) and idx.shape == (1, 2, L, min(3, S))
        assert not out.any()
        grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True, materialize_grads=True)
        assert all(g.shape == t.shape and not g.any() for g, t in zip(grads, (q, k, v)))

    def test_opcheck(self, seed):
        B, Hq, Hkv, L, S, E = 1, 2, 1, 5, 12, 16
        q, k, v = torch.randn(B, Hq, L, E), torch.randn(B, Hkv, S, E), torch.randn(B, Hkv, S, 16)
        m = torch.randn(B, 1, L, S).expand(B, Hq, L, S)
        for t in (q, k, v):
            t.requires_grad_(True)
        torch.library.opcheck(torch.ops.attnkern.triton_topk_fwd.default, (q, k, v, m, 3, 0.25, 6, 0, False))
        out, lse, idx = torch.ops.attnkern.triton_topk_fwd(q.detach(), k.detach(), v.detach(), m, 3, 0.25, 6, 0,
                                                           False)
        bargs = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), lse, idx, m, 0.25, 6, 0, False, True)
        torch.library.opcheck(torch.ops.attnkern.triton_topk_bwd.default, bargs)

    def test_bad_input(self):
        q, k, v = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 300, 16), torch.randn(1, 2, 300, 16)
        with pytest.raises(RuntimeError, match="at most 256"):
            attnkern.topk_attention(q, k, v, 257, backend="triton")
        with pytest.raises(RuntimeError, match="indices"):  # top_k >= S > 256: the dense kernel, no indices
            attnkern.topk_attention(q, k, v, 300, return_indices=True, backend="triton")
        with pytest.raises(ValueError, match="top_k"):
            torch.ops.attnkern.triton_topk_fwd(q, k, v, None, 0, 0.25, -1, -1, False)
        with pytest.raises(RuntimeError, match="bfloat16"):
            attnkern.topk_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 2, backend="triton")
        out, lse, idx = torch.ops.attnkern.triton_topk_fwd(q, k, v, None, 3, 0.25, -1, -1, False)
        with pytest.raises(ValueError, match="indices"):
            torch.ops.attnkern.triton_topk_bwd(out, q, k, v, lse, idx + 300, None, 0.25, -1, -1, False, False)
        with pytest.raises(ValueError, match="mask_needs_grad"):
            torch.ops.attnkern.triton_topk_bwd(out, q, k, v, lse, idx, None, 0.25, -1, -1, False, True)

    def test_auto_picks_triton_on_cuda_tensors(self, monkeypatch):
        """The capability table: 'auto' takes the Triton kernel for CUDA tensors (ahead of 'cuda', which has
        no top-k kernel and says so), and never for CPU tensors."""
        q, k, v = torch.randn(1, 1, 8, 16), torch.randn(1, 1, 400, 16), torch.randn(1, 1, 400, 16)
        problem = attnkern._semantics.normalize_torch_layout(q, k, v, None, 0.0, False, None, False, None)[4]
        assert dispatch.choose_topk(problem, "auto", 16, True) in ("cpu", "math")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
        on_gpu = dataclasses.replace(problem, device_type="cuda")
        assert dispatch.choose_topk(on_gpu, "auto", 16, True) == "triton"
        assert dispatch.choose_topk(on_gpu, "auto", 300, True) == "math"  # more than 256 kept keys
        assert "no top-k kernel" in dispatch.topk_why_not("cuda", on_gpu, 16, False)
        assert dispatch.topk_why_not("triton", on_gpu, 16, True) is None


def test_kernels_compile_for_sm90():
    """The top-k kernels compile ahead of time (Triton's bundled ptxas, no GPU): constexpr rules, the
    while loop and the 3-D gathers and atomics only meet the real compiler here."""
    if INTERPRETING:
        pytest.skip("kernels are interpreted in this process")
    pytest.importorskip("triton.backends.nvidia")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from attnkern.triton import topk

    for kernel, constexprs in (
        (topk.topk_fwd_kernel, dict(BLOCK_D=64, BLOCK_DV=64, PAD_D=False, PAD_DV=False, MASK_KIND=2,
                                    DOT_PRECISION="tf32", K_PAD=64, BLOCK_M=32, BLOCK_N=64)),
        (topk.topk_bwd_kernel, dict(BLOCK_D=64, BLOCK_DV=64, PAD_D=False, PAD_DV=False, MASK_KIND=2,
                                    MASK_GRAD=True, BLOCK_M=32, CHUNK=4)),
    ):
        signature = {}
        for name in kernel.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name in ("Lse", "dMask", "dK", "dV"):
                signature[name] = "*fp32"
            elif name == "Indices":
                signature[name] = "*i64"
            elif name == "Mask":
                signature[name] = "*fp32"
            elif name[0].isupper() or name in ("dQ", "dOut"):
                signature[name] = "*bf16"
            elif name in ("scale", "qk_scale"):
                signature[name] = "fp32"
            else:
                signature[name] = "i32"
        # sm90 only (each compile takes seconds); sm80 compiled too when this was written
        compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": 4})
        assert "atom" in compiled.asm["ptx"] or kernel is topk.topk_fwd_kernel


test_kernels_compile_for_sm90.__test__ = not INTERPRETING
