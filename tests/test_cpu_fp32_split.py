"""fp32 inputs in the amx_bf16 kernel variant: the forward's block products on AMX tiles as sums
of bf16 products of three-way split operands (csrc/cpu/gemm_amx.h; opt-in, ATTNKERN_CPU_FP32_AMX=6
or 9, switched here in process). The split must keep fp32's accuracy: held to the FMA path's own
error against float64 on the same inputs, and to a bound that the bf16x3 split (and a plain bf16
product) exceed, which the test also checks, so it can tell a dropped term."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import attnkern
from attnkern import ops

pytestmark = pytest.mark.skipif(ops._C is None or ops._C.cpu_isa() != "amx_bf16",
                                reason="the fp32 split runs in the amx_bf16 kernel variant (CPUs with AMX-BF16)")

# relative RMS error of the fp32 forward against float64 on the accuracy benchmark's inputs
# (benchmarks/quiet/cpu-fp32-split-accuracy-*.json): FMA path 0.3e-6 to 1.2e-6, 6-term split 0.15e-6
# to 0.4e-6, bf16x3 5e-6 to 1.4e-5
FP32_LEVEL = 1.5e-6
SPLIT_TERMS = 6  # the count ATTNKERN_CPU_FP32_AMX documents, chosen by that measurement


def rel_rms(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def fp32_forward(q, k, v, causal, terms):
    ops._C._set_cpu_fp32_amx_terms(terms)
    try:
        return attnkern.flash_attn_func(q, k, v, causal=causal, backend="cpu", return_lse=True)
    finally:
        ops._C._set_cpu_fp32_amx_terms(-1)


# (B, H, L, S, D, causal, q multiplier): key tails that are not whole tiles, D 64/128, and scores
# scaled by 8 (softmax near one-hot: the products' error is no longer averaged away)
CASES = [
    (1, 2, 200, 333, 64, False, 1.0),
    (1, 2, 256, 256, 128, True, 1.0),
    (2, 1, 130, 130, 64, True, 8.0),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"L{c[2]}-S{c[3]}-D{c[4]}-{'causal' if c[5] else 'dense'}-q{c[6]:g}")
def test_split_forward_is_fp32_accurate(case, seed):
    b, h, length, keys, d, causal, mult = case
    q = torch.randn(b, length, h, d) * mult
    k, v = torch.randn(b, keys, h, d), torch.randn(b, keys, h, d)
    ref, ref_lse = attnkern.flash_attn_func(q.double(), k.double(), v.double(), causal=causal, backend="math",
                                            return_lse=True)
    before = ops._C._cpu_fp32_split_items()
    out, lse = fp32_forward(q, k, v, causal, SPLIT_TERMS)
    assert ops._C._cpu_fp32_split_items() > before, "the fp32 call did not run the split"
    fma, fma_lse = fp32_forward(q, k, v, causal, 0)
    err, fma_err = rel_rms(out, ref), rel_rms(fma, ref)
    assert err <= FP32_LEVEL and err <= 2.0 * fma_err, f"split {err:.2e}, FMA path {fma_err:.2e}"
    lse_err, fma_lse_err = (lse.double() - ref_lse).abs().max().item(), (fma_lse.double() - ref_lse).abs().max().item()
    assert lse_err <= 4.0 * fma_lse_err + 1e-6, f"lse: split {lse_err:.2e}, FMA path {fma_lse_err:.2e}"
    # the bound tells: three terms (bf16x3) exceed it on the same inputs
    three, _ = fp32_forward(q, k, v, causal, 3)
    assert rel_rms(three, ref) > FP32_LEVEL


def test_split_runs_only_where_it_applies(seed):
    q, k, v = (torch.randn(1, 2, 40, 64) for _ in range(3))
    runs = ops._C._cpu_fp32_split_items
    before = runs()
    attnkern.scaled_dot_product_attention(q, k, v, backend="cpu")  # the default: the FMA path
    ops._C._set_cpu_fp32_amx_terms(SPLIT_TERMS)
    try:
        attnkern.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), backend="cpu")
        q40, k40, v40 = (torch.randn(1, 2, 40, 40) for _ in range(3))  # head dim not whole tiles
        attnkern.scaled_dot_product_attention(q40, k40, v40, backend="cpu")
        assert runs() == before
        attnkern.scaled_dot_product_attention(q, k, v, backend="cpu")
        assert runs() > before
    finally:
        ops._C._set_cpu_fp32_amx_terms(-1)


def test_environment_switch_and_bad_values():
    code = ("import attnkern.ops as o; from attnkern.__main__ import cpu_fp32_line; "
            "print(o._C.cpu_fp32_amx_terms()); print(cpu_fp32_line())")
    on = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ATTNKERN_CPU_FP32_AMX": "9"},
                        capture_output=True, text=True)
    assert on.returncode == 0, on.stderr
    terms, line = on.stdout.strip().splitlines()
    assert terms == "9" and "AMX tiles" in line and "9 terms" in line and "ATTNKERN_CPU_FP32_AMX=9" in line
    bad = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ATTNKERN_CPU_FP32_AMX": "5"},
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "ATTNKERN_CPU_FP32_AMX=5" in bad.stderr
    with pytest.raises(RuntimeError, match="must be 0, 1, 3, 6 or 9"):
        ops._C._set_cpu_fp32_amx_terms(5)


def test_parity_subset_under_split():
    """The fp32 parity cases (masks, windows, GQA, decoding, dropout, score modifiers) with the split
    switched on for the whole process."""
    here = os.path.dirname(os.path.abspath(__file__))
    select = ("(float32 and (test_parity[ or test_decode[ or dropout_matches)) or "
              "(modifier_parity and cpu and not bf16 and not fp16)")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", os.path.join(here, "test_parity.py"),
           os.path.join(here, "test_modifiers.py"), "-k", select]
    run = subprocess.run(cmd, env={**os.environ, "ATTNKERN_CPU_FP32_AMX": str(SPLIT_TERMS)}, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout


@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")], ids=["inf", "-inf", "nan"])
def test_non_finite_inputs_stay_non_finite(where, value, seed):
    """An Inf or NaN input never turns finite on the split: wherever the FMA path's output is
    non-finite, the split's is too (Inf may become NaN: the Inf meets zero pieces, README)."""
    x = [torch.randn(1, 2, 40, 64) for _ in range(3)]
    x["qkv".index(where)][0, 1, 5, 3] = value
    outs = []
    for terms in (0, SPLIT_TERMS):
        ops._C._set_cpu_fp32_amx_terms(terms)
        try:
            outs.append(attnkern.scaled_dot_product_attention(*x, backend="cpu"))
        finally:
            ops._C._set_cpu_fp32_amx_terms(-1)
    fma, split = outs
    assert (~torch.isfinite(fma)).any()
    assert not (~torch.isfinite(fma) & torch.isfinite(split)).any()
    assert torch.isfinite(split[:, 0]).all()  # the other head is untouched
