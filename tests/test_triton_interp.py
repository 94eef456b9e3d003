"""The Triton backend's kernels run by the Triton interpreter on CPU tensors (no GPU in CI).

Every feature of the kernels, forward and backward, in float32 and float16, against the
float64 reference: dense, causal and windowed bands in both alignments (with edge and
interior blocks, since the interpreter's tile is 16 x 16), GQA/MQA, Ev != E, padded head
dims, bool/float masks with broadcasting and mask gradients, fully masked rows, dropout
(bit-exact Philox), LSE and its gradient, arbitrary strides. bfloat16 is left to the GPU
test (test_triton_gpu.py): the interpreter's bf16 dot multiplies raw bit patterns.

TRITON_INTERPRET must be set before triton is imported (triton's own library functions are
decorated at import), and by the time a test module is collected conftest has imported it.
So a plain ``pytest`` run holds one test here, which reruns this file in a child process
with TRITON_INTERPRET=1 and the same seed; there the tests of TestInterpreter run. Running
``TRITON_INTERPRET=1 pytest tests/test_triton_interp.py`` runs them directly.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

pytest.importorskip("triton")

import attnkern  # noqa: E402
import conftest  # noqa: E402
import test_parity as parity  # noqa: E402
from attnkern import reference  # noqa: E402
from conftest import Case, assert_close  # noqa: E402

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
DTYPES = [torch.float32, torch.float16]
BACKEND = "triton"


def test_interpreter_suite():
    """Run TestInterpreter in a child process that has TRITON_INTERPRET=1 from its start."""
    conftest.run_interpreted(__file__)


test_interpreter_suite.__test__ = not INTERPRETING  # collected in the parent process only


@pytest.fixture(scope="module")
def interpreted_kernels():
    from triton.runtime.interpreter import InterpretedFunction

    from attnkern.triton import backward, forward

    for kernel in (forward.fwd_kernel, backward.dkdv_kernel, backward.dq_kernel):
        assert isinstance(kernel, InterpretedFunction), "kernels compiled although TRITON_INTERPRET=1"


# smaller than test_parity's CASES (the interpreter is slow), same features; lengths are not
# multiples of the 16-wide tile, and bands are wide enough to have interior blocks
CASES = [
    Case(batch=1, len_q=45, len_k=45, head_dim=32, id="dense"),
    Case(batch=1, len_q=20, len_k=70, head_dim=32, id="L<S"),
    Case(batch=1, len_q=70, len_k=20, head_dim=32, id="L>S"),
    Case(batch=1, len_q=1, len_k=37, head_dim=32, id="L=1"),
    Case(batch=1, len_q=70, len_k=70, head_dim=32, causal=True, id="causal"),
    Case(batch=1, len_q=30, len_k=90, head_dim=16, causal=True, id="causal-L<S"),
    Case(batch=1, len_q=90, len_k=30, head_dim=16, causal=True, id="causal-L>S"),
    Case(batch=1, len_q=60, len_k=60, head_dim=16, window=(0, 0), id="window(0,0)"),
    Case(batch=1, len_q=70, len_k=80, head_dim=16, window=(3, 5), id="window(3,5)"),
    Case(batch=1, len_q=120, len_k=120, head_dim=16, window=(40, 20), id="window(40,20)"),
    Case(batch=1, len_q=70, len_k=60, head_dim=16, window=(-1, 17), id="window(-1,17)"),
    Case(batch=1, len_q=60, len_k=60, head_dim=16, window=(3, 5), causal=True, id="window(3,5)+causal"),
    Case(batch=2, len_q=40, len_k=50, head_dim=16, mask="bool", id="mask-bool"),
    Case(batch=2, len_q=40, len_k=50, head_dim=16, mask="float", id="mask-float"),
    Case(batch=2, len_q=40, len_k=50, head_dim=16, mask="bool-bcast", id="mask-bool-bcast"),
    Case(batch=2, len_q=40, len_k=50, head_dim=16, mask="float-bcast", id="mask-float-bcast"),
    Case(batch=1, len_q=50, len_k=50, head_dim=16, mask="bool", window=(10, 10), causal=True,
         id="mask+window+causal"),
    Case(batch=1, heads_q=4, heads_kv=2, len_q=40, len_k=40, head_dim=16, id="gqa"),
    Case(batch=1, heads_q=4, heads_kv=1, len_q=30, len_k=50, head_dim=16, causal=True, id="mqa-causal"),
    Case(batch=1, three_d=True, heads_q=3, heads_kv=3, len_q=30, len_k=30, head_dim=16, id="3d"),
    Case(batch=2, len_q=40, len_k=40, head_dim=16, layout="transposed", causal=True, id="transposed"),
    Case(batch=1, heads_q=4, heads_kv=2, len_q=30, len_k=30, head_dim=16, layout="strided", id="strided"),
    Case(batch=1, len_q=30, len_k=40, head_dim=40, head_dim_v=72, id="E40-Ev72"),
]
# float16 runs the same kernels as float32 with 16-bit loads and casts (the feature branches do not
# depend on the dtype). It runs every case except three of the slowest, whose float16 runs are
# covered below: the float masks, full and broadcast, by test_float_mask_gradient (the same mask
# kinds, plus causal and the mask's gradient); the bool mask by the "mask+window+causal" case here
# and test_dropout_matches_reference's "mask+window".
FLOAT16_COVERED_ELSEWHERE = {"mask-float", "mask-float-bcast", "mask-bool"}
PARITY_PARAMS = [(case, dtype) for case in CASES for dtype in DTYPES
                 if dtype != torch.float16 or case.id not in FLOAT16_COVERED_ELSEWHERE]
HEAD_DIMS = [17, 100, 256]


@pytest.mark.usefixtures("interpreted_kernels")
class TestInterpreter:
    __test__ = INTERPRETING  # collected in the child process only
    @pytest.mark.parametrize("case,dtype", PARITY_PARAMS, ids=[f"{c.id}-{d}" for c, d in PARITY_PARAMS])
    def test_parity(self, case, dtype, seed):
        parity.run_case(case, dtype, BACKEND, seed)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("head_dim", HEAD_DIMS)
    def test_head_dims(self, head_dim, dtype, seed):
        case = Case(batch=1, heads_q=1, heads_kv=1, head_dim=head_dim, len_q=20, len_k=35, causal=head_dim % 2 == 0)
        parity.run_case(case, dtype, BACKEND, seed)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("shape", ["full", "bcast"])
    def test_float_mask_gradient(self, shape, dtype, seed):
        case = Case(batch=2, head_dim=16, mask="float" if shape == "full" else "float-bcast", len_q=30, len_k=40,
                    causal=True)
        parity.run_case(case, dtype, BACKEND, seed, mask_grad=True)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize(
        "case",
        [Case(batch=1, heads_q=4, heads_kv=2, len_q=24, len_k=37, head_dim=16, dropout_p=0.2, id="gqa"),
         Case(batch=2, heads_q=1, heads_kv=1, len_q=30, len_k=30, head_dim=16, dropout_p=0.5, mask="bool",
              window=(6, 0), id="mask+window")],
        ids=lambda c: c.id,
    )
    def test_dropout_matches_reference(self, case, dtype, seed):
        """The same torch seed gives the reference's Philox pattern, forward and backward."""
        parity.run_case(case, dtype, BACKEND, seed)

    def test_dropout_statistics_and_reproducibility(self, seed):
        parity.test_dropout_statistics_and_reproducibility(BACKEND, seed)

    @pytest.mark.parametrize("seed_value", [0, 12345, 2**31 + 7, 2**63 - 1, -1, -(2**63)])
    def test_philox_words_bit_exact(self, seed_value):
        """Every word the kernels draw equals reference.philox4x32 at counter (j >> 2, i, head, 0), word j & 3."""
        from attnkern.triton.philox import dropout_words_table

        len_q, len_k, head = 21, 45, 5
        seed = seed_value & 0xFFFFFFFFFFFFFFFF
        words = dropout_words_table(len_q, len_k, head, seed)
        i = torch.arange(len_q).view(-1, 1).expand(len_q, len_k)
        j = torch.arange(len_k).view(1, -1).expand(len_q, len_k)
        ref = reference.philox4x32(j >> 2, i, torch.full_like(i, head), torch.zeros_like(i), seed)
        ref = torch.stack(ref, -1).gather(-1, (j & 3).unsqueeze(-1)).squeeze(-1)
        assert torch.equal(words, ref)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize(
        "len_q,len_k,causal,window",
        [(20, 50, True, (-1, -1)), (50, 20, True, (-1, -1)), (40, 40, False, (8, 0)), (30, 60, False, (4, 4))],
    )
    def test_flash_attn_func_bottom_right(self, len_q, len_k, causal, window, dtype, seed):
        """Bottom-right alignment, (B, L, H, D) layout, GQA, LSE output and its gradient."""
        parity.test_flash_attn_func_bottom_right(len_q, len_k, causal, window, dtype, BACKEND, seed)

    def test_fully_masked_rows_give_zero_and_finite_gradients(self, seed):
        parity.test_fully_masked_rows_give_zero_and_finite_gradients(BACKEND, seed)

    @pytest.mark.parametrize("len_q,len_k", [(0, 10), (10, 0), (0, 0)])
    def test_empty_sequences(self, len_q, len_k):
        parity.test_empty_sequences(len_q, len_k, BACKEND)

    def test_output_layout_follows_query(self):
        parity.test_output_layout_follows_query(BACKEND)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_finfo_min_masks_are_finite_and_nan_propagates(self, dtype, seed):
        import test_hardening

        test_hardening.check_lowest_mask_and_nan(
            lambda q, k, v, m, s: torch.ops.attnkern.triton_fwd(q, k, v, m, None, s, -1, -1, False, 0.0),
            lambda g, q, k, v, o, lse, m, s: torch.ops.attnkern.triton_bwd(g, None, q, k, v, o, lse, m, None, s, -1, -1,
                                                                          False, 0.0, False)[:3],
            dtype)

    @pytest.mark.parametrize("side", [2**62, 2**63 - 1])
    def test_extreme_windows_at_the_raw_ops(self, side, seed):
        """triton_fwd/triton_bwd called directly read a window side past the sequences as unbounded."""
        q, k, v = (torch.randn(1, 2, n, 16) for n in (7, 11, 11))
        args = (None, None, 0.25)
        want, lse = torch.ops.attnkern.triton_fwd(q, k, v, *args, 2, -1, True, 0.0)
        got, got_lse = torch.ops.attnkern.triton_fwd(q, k, v, *args, 2, side, True, 0.0)
        assert torch.equal(got, want) and torch.equal(got_lse, lse)
        ref_out, _ = reference.attention(q.double(), k.double(), v.double(), None, 0.25, 2, -1, True)
        assert_close(got, ref_out, torch.float32, "out")
        g = torch.randn_like(want)
        grads = [torch.ops.attnkern.triton_bwd(g, None, q, k, v, want, lse, *args, 2, w, True, 0.0, False)[:3]
                 for w in (-1, side)]
        for a, b in zip(*grads):
            assert torch.equal(a, b)

    @pytest.mark.parametrize("dtype,level", [(torch.float32, "finfo.min"), (torch.float16, "-1e9")], ids=str)
    def test_backward_of_huge_rows(self, dtype, level, seed):
        import test_huge_lse

        test_huge_lse.check_huge_rows(torch.ops.attnkern.triton_fwd, torch.ops.attnkern.triton_bwd, dtype, level,
                                      heads=(2, 1), window=(5, 3), dropout_p=0.25, grad_lse=True, mask_grad=True)

    @pytest.mark.parametrize("tile", [(32, 16), (16, 64), (64, 32), (128, 64)], ids=str)
    @pytest.mark.parametrize(
        "case",
        [Case(batch=1, len_q=150, len_k=170, head_dim=16, window=(37, 21), id="window"),
         Case(batch=1, heads_q=2, heads_kv=1, len_q=90, len_k=200, head_dim=16, causal=True, id="causal-L<S"),
         Case(batch=1, len_q=200, len_k=90, head_dim=16, window=(50, 0), mask="bool", id="window-L>S-mask")],
        ids=lambda c: c.id,
    )
    def test_other_tile_shapes(self, case, tile, seed, monkeypatch):
        """The block ranges hold for unequal query/key tiles like the GPU configs' (16x16 elsewhere)."""
        from attnkern.triton import configs

        monkeypatch.setattr(configs, "INTERPRETER", {"BLOCK_M": tile[0], "BLOCK_N": tile[1]})
        parity.run_case(case, torch.float32, BACKEND, seed)

    @pytest.mark.parametrize(
        "alignment,window",
        [("top-left", (-1, 0)), ("top-left", (4, 4)), ("bottom-right", (4, 0)), ("bottom-right", (4, 4))],
        ids=str,
    )
    def test_key_blocks_outside_the_band_are_skipped(self, alignment, window, seed):
        """Keys in tiles that no query's band reaches are NaN: a kernel that used them would return NaN.

        With L = 40 queries against S = 200 keys, top-left bands end by key 40 + right and
        bottom-right bands start at key 160 - left; key tiles (16 wide under the interpreter)
        beyond those must be skipped by the forward and both backward passes, so outputs match
        the reference on clean inputs and dK, dV there are exactly 0.
        """
        from attnkern.triton import configs

        tile = configs.INTERPRETER["BLOCK_N"]
        len_q, len_k, dim = 40, 200, 16
        left, right = window
        q = torch.randn(1, len_q, 2, dim, requires_grad=True)
        k, v = torch.randn(1, len_k, 2, dim), torch.randn(1, len_k, 2, dim)
        if alignment == "top-left":
            unread = slice(math.ceil((len_q + right) / tile) * tile, None)
        else:
            first = len_k - len_q - left if left >= 0 else 0
            unread = slice(0, (first // tile) * tile)
        assert len(range(len_k)[unread]) >= 2 * tile
        clean = [t.clone().requires_grad_(True) for t in (k, v)]
        poisoned = [t.clone() for t in (k, v)]
        for t in poisoned:
            t[:, unread] = float("nan")
        poisoned = [t.requires_grad_(True) for t in poisoned]

        def run(kk, vv, backend):
            if alignment == "bottom-right":
                return attnkern.flash_attn_func(q, kk, vv, window_size=window, backend=backend)
            out = attnkern.scaled_dot_product_attention(q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2),
                                                        window_size=window, backend=backend)
            return out.transpose(1, 2)

        out = run(*poisoned, BACKEND)
        grad_out = torch.randn_like(out)
        dq, dk, dv = torch.autograd.grad(out, (q, *poisoned), grad_out)
        ref = run(*clean, "math")
        ref_dq, ref_dk, ref_dv = torch.autograd.grad(ref, (q, *clean), grad_out)
        assert_close(out, ref, torch.float32, "out")
        assert_close(dq, ref_dq, torch.float32, "dq")
        assert torch.equal(dk[:, unread], torch.zeros_like(dk[:, unread]))
        assert torch.equal(dv[:, unread], torch.zeros_like(dv[:, unread]))
        assert_close(dk, ref_dk, torch.float32, "dk")
        assert_close(dv, ref_dv, torch.float32, "dv")

    def test_op_rejects_bad_arguments(self):
        """The op checks its own arguments (it can be called without attnkern's front end)."""
        q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
        op = torch.ops.attnkern.triton_fwd
        with pytest.raises(ValueError, match="mask must have shape"):
            op(q, k, v, torch.ones(1, 2, 8, 9, dtype=torch.bool), None, 0.25, -1, -1, False, 0.0)
        with pytest.raises(ValueError, match="rng_seed"):
            op(q, k, v, None, None, 0.25, -1, -1, False, 0.1)
        for dim in (300, 0):
            with pytest.raises(ValueError, match="head dims"):
                op(*(torch.randn(1, 1, 4, dim) for _ in range(3)), None, None, 0.1, -1, -1, False, 0.0)
        with pytest.raises(ValueError, match="multiple of k/v heads"):
            op(torch.randn(1, 3, 8, 16), k, v, None, None, 0.25, -1, -1, False, 0.0)
        with pytest.raises(TypeError, match="share a dtype"):
            op(q, k.half(), v, None, None, 0.25, -1, -1, False, 0.0)
        with pytest.raises(RuntimeError, match="cannot run bfloat16"):
            attnkern.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), backend=BACKEND)

    def test_opcheck(self, seed):
        """Schema, fake kernel (shapes and strides), and autograd registration agree with the kernels."""
        q = torch.randn(1, 6, 2, 16).transpose(1, 2).requires_grad_(True)  # (B, H, L, E) view of BLHD memory
        k, v = (torch.randn(1, 2, 9, 16, requires_grad=True) for _ in range(2))
        mask = torch.randn(1, 1, 6, 9).expand(1, 2, 6, 9)
        args = (q, k, v, mask, None, 0.3, 2, -1, True, 0.0)
        torch.library.opcheck(torch.ops.attnkern.triton_fwd.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
        out, lse = torch.ops.attnkern.triton_fwd(*args)
        grad = torch.randn_like(out)
        bwd_args = (grad, None, q.detach(), k.detach(), v.detach(), out.detach(), lse, mask, None, 0.3, 2, -1, True,
                    0.0, True)
        torch.library.opcheck(torch.ops.attnkern.triton_bwd.default, bwd_args,
                              test_utils=("test_schema", "test_faketensor"))
