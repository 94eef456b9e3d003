"""The CUDA kernels' score-modifier variant (kModified: softcap, sinks, ALiBi) on the CPU emulator
(csrc/cuda/emulator), held to the float64 reference: outputs, LSE, dq/dk/dv, the float mask's
gradient and the sinks' gradient (ops.sink_grad on the kernels' out and LSE, what the CUDA op's
autograd runs). Each case composes the modifiers with a different slice of the existing features
(GQA, windows in both alignments, masks, dropout, decoding L <= 16 with and without split-KV,
rows without keys, head dims that take other tile shapes). Small shapes: the emulator runs every
CUDA thread as a fiber.

The emulator shares the kernels' reading of the PTX fragment layouts; these kernels have not run
on a GPU (README: emulator-verified, GPU-unverified).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import test_modifiers
from attnkern import _semantics, dispatch, ops, reference
from conftest import assert_close
from test_cuda import gpu, needs_gpu


@dataclass
class EmuModCase(test_modifiers.ModCase):
    """test_modifiers' case, plus the split-KV SM count (40: decoding splits the keys over CTAs
    and merges them) and whether to run the backward."""

    sm_count: int = 4
    backward: bool = True


F16, BF16 = torch.float16, torch.bfloat16
CASES = [
    EmuModCase("softcap-causal-gqa", causal=True, softcap=3.0, dtype=F16),
    EmuModCase("sinks-window-bottomright", window=(9, 4), bottom_right=True, sinks=True, dtype=BF16),
    EmuModCase("alibi-window-floatmask", heads_kv=4, window=(20, 20), alibi="batch", mask="float", dtype=F16),
    EmuModCase("all-boolmask-dropout", causal=True, mask="bool", dropout_p=0.25, softcap=4.0, sinks=True,
               alibi="head", dtype=BF16),
    # L > S bottom-right causal: the first rows see no key (output 0, LSE = sink)
    EmuModCase("all-emptyrows", len_q=40, len_k=24, causal=True, bottom_right=True, softcap=5.0, sinks=True,
               alibi="head", dtype=F16),
    EmuModCase("all-d128-ev96", batch=1, len_q=40, len_k=50, head_dim=128, head_dim_v=96, window=(30, 0),
               softcap=6.0, sinks=True, alibi="batch", dtype=BF16),
    # head dim 256: dK and dV in two passes
    EmuModCase("all-d256", batch=1, heads_q=2, heads_kv=1, len_q=20, len_k=33, head_dim=256, head_dim_v=256,
               causal=True, bottom_right=True, softcap=8.0, sinks=True, alibi="head", dtype=F16),
    # decoding (the packed split-KV forward): keys split over CTAs and merged, the sink joining the merge
    EmuModCase("decode-split-all", batch=1, heads_q=8, heads_kv=2, len_q=3, len_k=470, head_dim=64, head_dim_v=64,
               causal=True, bottom_right=True, softcap=6.0, sinks=True, alibi="head", dtype=BF16, sm_count=40),
    # one CTA per row tile: the sink joins the CTA's merge of its key slices
    EmuModCase("decode-L16-sinks-alibi", batch=2, heads_q=4, heads_kv=1, len_q=16, len_k=100, head_dim=64,
               head_dim_v=64, window=(50, 0), bottom_right=True, sinks=True, alibi="batch", dtype=F16, sm_count=0),
    EmuModCase("decode-L1-softcap", heads_kv=4, len_q=1, len_k=520, softcap=2.0, dtype=F16, sm_count=40,
               backward=False),
]


def _kernel_inputs(case: EmuModCase):
    """test_modifiers' random inputs in the kernels' form: q/k/v and a float mask in the case's
    dtype, the bool mask broadcast over heads (stride 0), sinks fp32, slopes fp32 (B, Hq)."""
    q, k, v, mask, sinks, alibi, grad_out, grad_lse = test_modifiers._inputs(case, "cpu")
    q, k, v = (t.to(case.dtype) for t in (q, k, v))
    if mask is not None:
        shape = (case.batch, case.heads_q, case.len_q, case.len_k)
        mask = mask.expand(shape) if mask.dtype == torch.bool else mask.to(case.dtype)
    sinks = None if sinks is None else sinks.float()
    alibi = None if alibi is None else alibi.expand(case.batch, case.heads_q).contiguous()
    return q, k, v, mask, sinks, alibi, grad_out.to(case.dtype), grad_lse.float()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_emulated_modifier_parity(emu, case, seed):
    q, k, v, mask, sinks, alibi, grad_out, grad_lse = _kernel_inputs(case)
    problem = _semantics.normalize_torch_layout(q, k, v, mask, case.dropout_p, case.causal, None,
                                                case.heads_q != case.heads_kv, case.window,
                                                bottom_right=case.bottom_right)[4]
    sem = (problem.scale, problem.window_left, problem.window_right, case.bottom_right, case.dropout_p)
    rng = dispatch.new_rng_seed() if case.dropout_p > 0 else None
    mask_grad = case.mask == "float"
    if case.sm_count == 40:  # the decode cases that must split the keys (and merge with the sink)
        assert emu.decode_num_splits(case.len_q, case.heads_q, case.heads_kv, case.len_k, case.head_dim, case.batch,
                                     case.sm_count) > 1
    emu.set_options(True, 0, seed)
    out, lse = emu.fwd(q, k, v, mask, rng, *sem, case.sm_count, softcap=case.softcap, sinks=sinks,
                       alibi_slopes=alibi)
    grads = ()
    if case.backward:
        emu.set_options(True, 0, seed)
        grads = emu.bwd(grad_out, grad_lse, q, k, v, out, lse, mask, rng, *sem, mask_grad, softcap=case.softcap,
                        alibi_slopes=alibi)
        grads = grads[:3] + ((grads[3],) if mask_grad else ())
        if sinks is not None:
            grads += (ops.sink_grad(grad_out, grad_lse, out, lse, sinks),)

    inputs = [t.double().requires_grad_(True) for t in (q, k, v)]
    m64 = mask
    if mask is not None and mask.is_floating_point():
        m64 = mask.double().requires_grad_(mask_grad)
        if mask_grad:
            inputs.append(m64)
    s64 = None
    if sinks is not None:
        s64 = sinks.double().requires_grad_(True)
        inputs.append(s64)
    seed64 = None if rng is None else int(rng.item()) & 0xFFFFFFFFFFFFFFFF
    ref_out, ref_lse = reference.attention(*inputs[:3], m64, *sem, seed64, softcap=case.softcap, sinks=s64,
                                           alibi_slopes=None if alibi is None else alibi.double())

    assert_close(out, ref_out, case.dtype, f"{case.id} out")
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "LSE is -inf exactly where the reference's is"
    assert_close(lse.where(finite, 0), ref_lse.where(finite, 0), torch.float32, f"{case.id} lse")
    if case.id == "all-emptyrows":
        empty = ref_out.abs().sum(-1) == 0
        assert empty.any(), "the case must have rows that see no key"
        assert (out[empty] == 0).all()
        torch.testing.assert_close(lse[empty], sinks.view(1, -1, 1).expand_as(lse)[empty], rtol=0, atol=1e-6)
    if case.backward:
        ref_grads = torch.autograd.grad((ref_out, ref_lse), inputs, (grad_out.double(), grad_lse.double()))
        names = ["dq", "dk", "dv"] + (["dmask"] if mask_grad else []) + (["dsinks"] if sinks is not None else [])
        assert len(grads) == len(ref_grads) == len(names)
        for g, r, name in zip(grads, ref_grads, names):
            assert_close(g, r, case.dtype, f"{case.id} {name}")


@pytest.mark.parametrize("len_q,len_k,sm_count", [(20, 30, 4), (3, 470, 40), (16, 100, 0)],
                         ids=["prefill", "decode-split", "decode-cta"])
def test_emulated_modifier_edge_values(emu, seed, len_q, len_k, sm_count):
    """mask.h softcap_tanh and the sinks' limits in the CUDA kernels (test_modifiers'
    test_modifier_parity_edge_values on the other backends): a cap far above the scores keeps the
    plain call's accuracy, a NaN score stays NaN under a cap, a NaN sink makes its head NaN and a
    sink of +inf gives output 0 and LSE +inf; in the prefill epilogue (row_total), the split-KV
    merge kernel and a CTA's merge of its key slices."""
    case = EmuModCase("edge", batch=1, heads_q=8, heads_kv=2, len_q=len_q, len_k=len_k, head_dim=64, head_dim_v=64,
                      dtype=F16, sm_count=sm_count)
    if sm_count == 40:
        assert emu.decode_num_splits(len_q, 8, 2, len_k, 64, 1, sm_count) > 1
    q, k, v = _kernel_inputs(case)[:3]
    sem = (64 ** -0.5, -1, -1, False, 0.0)
    q64, k64, v64 = q.double(), k.double(), v.double()
    for cap in (1e4, 3e38):
        out, lse = emu.fwd(q, k, v, None, None, *sem, sm_count, softcap=cap)
        ref, ref_lse = reference.attention(q64, k64, v64, None, *sem, None, softcap=cap)
        assert_close(out, ref, F16, f"softcap {cap:g} out")
        assert_close(lse, ref_lse, torch.float32, f"softcap {cap:g} lse")
    qn = q.clone()
    qn[0, 1, len_q // 2, 3] = float("nan")
    out, lse = emu.fwd(qn, k, v, None, None, *sem, sm_count, softcap=2.0)
    nan_row = torch.zeros_like(lse, dtype=torch.bool)
    nan_row[0, 1, len_q // 2] = True
    assert out[nan_row].isnan().all() and lse[nan_row].isnan().all(), "a NaN score under a cap"
    assert torch.isfinite(out[~nan_row]).all() and torch.isfinite(lse[~nan_row]).all()
    sinks = torch.tensor([float("nan"), float("inf"), float("-inf"), 0.5] * 2)
    out, lse = emu.fwd(q, k, v, None, None, *sem, sm_count, sinks=sinks)
    ref, ref_lse = reference.attention(q64, k64, v64, None, *sem, None, sinks=sinks.double())
    for h in (0, 4):
        assert out[:, h].isnan().all() and lse[:, h].isnan().all(), "a NaN sink makes its head NaN"
        assert (out[:, h + 1] == 0).all() and (lse[:, h + 1] == float("inf")).all(), "a +inf sink takes all the weight"
        for g in (h + 2, h + 3):
            assert_close(out[:, g], ref[:, g], F16, f"head {g} out")
            assert_close(lse[:, g], ref_lse[:, g], torch.float32, f"head {g} lse")


def test_emulated_modifiers_change_the_result(emu, seed):
    """The variant is not the plain kernel under another name: each modifier alone moves the
    output away from the plain call's (and the plain call still matches its own reference in
    test_cuda.py)."""
    case = EmuModCase("plain", batch=1, heads_q=2, heads_kv=1, len_q=20, len_k=30, dtype=F16)
    q, k, v = _kernel_inputs(case)[:3]
    sem = (case.head_dim ** -0.5, -1, 0, False, 0.0)
    plain, plain_lse = emu.fwd(q, k, v, None, None, *sem, 4)
    for kw in (dict(softcap=0.5), dict(sinks=torch.full((2,), 3.0)), dict(alibi_slopes=torch.full((1, 2), 0.5))):
        out, lse = emu.fwd(q, k, v, None, None, *sem, 4, **kw)
        assert (out.float() - plain.float()).abs().max() > 1e-2, kw
        assert (lse - plain_lse).abs().max() > 1e-2, kw


def test_emulated_hopper_routes_modifiers_to_sm80(emu, monkeypatch, seed):
    """The wgmma kernels have no modifier variant: on an emulated sm_90 with ATTNKERN_CUDA_WGMMA=1,
    modifier calls run the sm80 kernels (mma.sync, no wgmma) and still match the reference; a
    plain call there runs wgmma."""
    monkeypatch.setenv("ATTNKERN_CUDA_WGMMA", "1")
    emu.set_device_arch(90)
    try:
        case = EmuModCase("hopper", batch=1, heads_q=2, heads_kv=1, len_q=70, len_k=90, head_dim=64, head_dim_v=64,
                          dtype=F16)
        q, k, v = _kernel_inputs(case)[:3]
        sem = (0.125, -1, 0, False, 0.0)
        sinks = torch.randn(2)
        emu.set_options(True, 0, seed)
        out, lse = emu.fwd(q, k, v, None, None, *sem, 4, softcap=5.0, sinks=sinks)
        fwd = emu.stats()
        emu.set_options(True, 0, seed)
        emu.bwd(torch.randn_like(out), None, q, k, v, out, lse, None, None, *sem, False, softcap=5.0)
        bwd = emu.stats()
        assert fwd["wgmma"] == 0 and fwd["mma"] > 0 and bwd["wgmma"] == 0 and bwd["mma"] > 0, (fwd, bwd)
        ref, _ = reference.attention(q.double(), k.double(), v.double(), None, *sem, softcap=5.0,
                                     sinks=sinks.double())
        assert_close(out, ref, torch.float16, "out")
        emu.set_options(True, 0, seed)
        emu.fwd(q, k, v, None, None, *sem, 4)
        assert emu.stats()["wgmma"] > 0
    finally:
        emu.set_device_arch(80)


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
@pytest.mark.parametrize("case", test_modifiers.CASES, ids=lambda c: c.id)
def test_gpu_modifier_parity(case, dtype, seed):
    """The modifier matrix of test_modifiers.py through backend="cuda" on a device (not yet run)."""
    inputs = test_modifiers._inputs(case, "cpu")
    out, lse, grads = test_modifiers._forward_backward(case, inputs, dtype, "cuda", "cuda", seed)
    ref_out, ref_lse, ref_grads = test_modifiers._forward_backward(case, inputs, torch.float64, "cpu", "math", seed)
    assert_close(out, ref_out, dtype, f"{case.id} out")
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    assert_close(lse.cpu()[finite], ref_lse[finite], dtype, f"{case.id} lse")
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, dtype, case.id)
