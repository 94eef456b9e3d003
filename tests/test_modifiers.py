"""Score modifiers (softcap, attention sinks, ALiBi) on every fused backend against the float64
reference: outputs, LSE, dq/dk/dv, the sinks' and the float mask's gradients.

A compact matrix: each case composes the modifiers with a different slice of the existing
features (windows both ways, masks, GQA, dropout, decoding, E != Ev), rather than every case
times every modifier."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, replace
from typing import Optional, Tuple

import pytest
import torch

import attnkern
from attnkern import dispatch, ops
from attnkern._semantics import check_backend, normalize_torch_layout, with_modifiers
import conftest
from conftest import TOLERANCE, assert_close, device_backends, forced_isa_env

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class ModCase:
    id: str
    batch: int = 2
    heads_q: int = 4
    heads_kv: int = 2
    len_q: int = 45
    len_k: int = 70
    head_dim: int = 32
    head_dim_v: int = 32
    causal: bool = False
    window: Optional[Tuple[int, int]] = None
    bottom_right: bool = False
    mask: Optional[str] = None  # None | "bool" | "float"
    dropout_p: float = 0.0
    softcap: float = 0.0
    sinks: bool = False
    alibi: Optional[str] = None  # None | "head" (H,) | "batch" (B, H)
    dtype: torch.dtype = torch.float32


CASES = [
    ModCase("softcap-causal-gqa", causal=True, softcap=3.0),
    ModCase("sinks-window-bottomright", window=(9, 4), bottom_right=True, sinks=True),
    ModCase("alibi-floatmask", heads_kv=4, alibi="batch", mask="float", softcap=8.0),
    ModCase("all-boolmask-dropout", causal=True, mask="bool", dropout_p=0.25, softcap=4.0, sinks=True, alibi="head"),
    # L > S bottom-right causal: the first rows see no key (output 0, LSE = sink)
    ModCase("all-emptyrows", len_q=40, len_k=24, causal=True, bottom_right=True, softcap=5.0, sinks=True,
            alibi="head"),
    ModCase("all-decode-split", batch=1, heads_q=8, heads_kv=2, len_q=3, len_k=300, head_dim=64, head_dim_v=48,
            bottom_right=True, causal=True, softcap=6.0, sinks=True, alibi="head"),
    ModCase("all-fp16-window", window=(20, 20), softcap=10.0, sinks=True, alibi="batch", dtype=torch.float16),
    # bf16 with head dims of whole AMX tiles: the amx_bf16 variant where the CPU has it (its fused
    # scale + softcap pass; dQ tiles accumulated in place for whole 64-row tiles, through scratch
    # for the 22-row tail tile)
    ModCase("softcap-bf16-tiles", batch=1, heads_q=4, heads_kv=2, len_q=150, len_k=150, head_dim=64, head_dim_v=64,
            causal=True, softcap=1.0, dtype=torch.bfloat16),
    ModCase("all-bf16-tiles-window", batch=1, len_q=100, len_k=130, head_dim=32, head_dim_v=32, window=(40, 10),
            mask="float", softcap=1.5, sinks=True, alibi="head", dtype=torch.bfloat16),
    # Gemma-2-like on AMX at a small size (head dim 256: two 128-column halves of every tile row,
    # key blocks with tails, a bottom-right window)
    ModCase("softcap-bf16-gemma-window", batch=1, heads_q=4, heads_kv=2, len_q=300, len_k=333, head_dim=256,
            head_dim_v=256, window=(161, 0), bottom_right=True, softcap=2.0, dtype=torch.bfloat16),
    # the window starts the later tiles' key blocks on odd keys (29, 93): V pairs straddle them
    ModCase("softcap-bf16-odd-window", batch=1, heads_q=2, heads_kv=2, len_q=200, len_k=201, head_dim=256,
            head_dim_v=256, window=(99, 0), softcap=3.0, dtype=torch.bfloat16),
]


def _inputs(case: ModCase, device: str):
    B, Hq, Hkv, L, S = case.batch, case.heads_q, case.heads_kv, case.len_q, case.len_k
    q = torch.randn(B, Hq, L, case.head_dim, dtype=torch.float64)
    k = torch.randn(B, Hkv, S, case.head_dim, dtype=torch.float64)
    v = torch.randn(B, Hkv, S, case.head_dim_v, dtype=torch.float64)
    mask = None
    if case.mask == "bool":
        mask = torch.rand(B, 1, L, S) > 0.25
    elif case.mask == "float":
        mask = torch.randn(B, Hq, L, S, dtype=torch.float64)
    sinks = torch.randn(Hq, dtype=torch.float64) * 2 if case.sinks else None
    alibi = None
    if case.alibi:
        alibi = torch.rand((Hq,) if case.alibi == "head" else (B, Hq), dtype=torch.float32) * 0.5
    grad_out = torch.randn(B, Hq, L, case.head_dim_v, dtype=torch.float64)
    grad_lse = torch.randn(B, Hq, L, dtype=torch.float64)
    return q, k, v, mask, sinks, alibi, grad_out, grad_lse


def _attention(case: ModCase, q, k, v, mask, sinks, alibi, backend: str):
    """(out, lse) through the public normalisation and dispatch, in the case's alignment."""
    q4, k4, v4, m4, problem, _ = normalize_torch_layout(
        q, k, v, mask, case.dropout_p, case.causal, None, case.heads_q != case.heads_kv, case.window,
        bottom_right=case.bottom_right,
    )
    problem, sinks32, alibi32 = with_modifiers(problem, q4, case.softcap, sinks, alibi)
    return dispatch.run(problem, q4, k4, v4, m4, check_backend(backend), sinks32, alibi32)


def _forward_backward(case: ModCase, inputs, dtype, device: str, backend: str, seed: int):
    q, k, v, mask, sinks, alibi, grad_out, grad_lse = inputs
    qkv = [t.to(dtype).to(device).requires_grad_(True) for t in (q, k, v)]
    m = None if mask is None else mask.to(dtype if mask.is_floating_point() else torch.bool).to(device)
    if m is not None and m.is_floating_point():
        m.requires_grad_(True)
    s = None if sinks is None else sinks.to(torch.float32 if dtype != torch.float64 else dtype).to(device)
    if s is not None:
        s.requires_grad_(True)
    a = None if alibi is None else alibi.to(device)
    torch.manual_seed(seed)
    out, lse = _attention(case, *qkv, m, s, a, backend)
    wrt = qkv + [t for t in (m, s) if t is not None and t.requires_grad]
    grads = torch.autograd.grad((out, lse), wrt, (grad_out.to(out.dtype).to(device), grad_lse.float().to(device)
                                                  if lse.dtype == torch.float32 else grad_lse.to(device)))
    return out, lse, grads


def sink_grad_terms(inputs, ref_out, ref_lse):
    """The magnitudes of the terms whose signed sum is each head's sink gradient (attnkern.ops.sink_grad:
    d sink_h = -sum_{b,i} exp(sink_h - lse) * (rowsum(dO * O) - dLSE)), from the float64 reference."""
    sinks, grad_out, grad_lse = inputs[4], inputs[6], inputs[7]
    delta = (grad_out * ref_out.detach()).sum(-1) - grad_lse
    return (torch.exp(sinks.view(1, -1, 1) - ref_lse.detach()) * delta).abs().sum(dim=(0, 2))


def assert_sum_close(got, ref, terms, dtype, what):
    """A signed sum over every row (B * L terms): its rounding error grows with the sum of the terms'
    magnitudes, not with the sum, so the error is measured against the larger of the two. In fp16
    the terms carry O and dO rounded to 2^-11 and often cancel to a tenth of their magnitude; the
    float64 formula on fp16-rounded O and dO alone then reached 0.53 of the tolerance measured
    against the sum (the kernels 0.99: a flaky test, not a kernel error)."""
    err = (got.detach().double() - ref.detach().double()).norm().item()
    scale = max(ref.detach().double().norm().item(), terms.norm().item())
    assert err <= TOLERANCE[dtype] * scale, f"{what}: error {err:.3e} > tolerance {TOLERANCE[dtype]:.1e} x {scale:.3e}"


@pytest.mark.parametrize("backend", device_backends("cpu"))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_modifier_parity(case, backend, seed):
    if case.dtype == torch.bfloat16 and backend == "triton":
        pytest.skip("the Triton interpreter's bf16 dot is wrong")
    inputs = _inputs(case, "cpu")
    out, lse, grads = _forward_backward(case, inputs, case.dtype, "cpu", backend, seed)
    ref_out, ref_lse, ref_grads = _forward_backward(case, inputs, torch.float64, "cpu", "math", seed)
    tol_dtype = case.dtype
    assert_close(out, ref_out, tol_dtype, f"{case.id} out")
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "LSE is -inf exactly where the reference's is"
    assert_close(lse[finite], ref_lse[finite], torch.float32 if tol_dtype == torch.float32 else tol_dtype,
                 f"{case.id} lse")
    names = ["dq", "dk", "dv"] + (["dmask"] if case.mask == "float" else []) + (["dsinks"] if case.sinks else [])
    assert len(grads) == len(names)
    for g, r, name in zip(grads, ref_grads, names):
        if name == "dsinks":
            assert_sum_close(g, r, sink_grad_terms(inputs, ref_out, ref_lse), tol_dtype, f"{case.id} {name}")
        else:
            assert_close(g, r, tol_dtype, f"{case.id} {name}")
    if case.id == "all-emptyrows":
        empty = ref_out.abs().sum(-1) == 0
        assert empty.any(), "the case must have rows that see no key"
        assert (out[empty] == 0).all()
        sink_lse = inputs[4].float().view(1, -1, 1).expand_as(lse)
        torch.testing.assert_close(lse[empty], sink_lse[empty], rtol=0, atol=1e-6)


def _flash_call(q, k, v, backend, **kw):
    return attnkern.flash_attn_func(q, k, v, return_lse=True, backend=backend, **kw)


@pytest.mark.parametrize("backend", device_backends("cpu"))
def test_modifier_parity_edge_values(backend, seed):
    """Softcaps far above the scores, NaN scores under a cap, and non-finite sinks, against the
    float64 reference: a cap of 1e3 or 1e6 keeps fp32 accuracy, and one near FLT_MAX is the plain
    call (stop 23's fuzzing: the kernels' tanh lost accuracy as the cap grew, every score became 0
    from a cap of about 1e8 and NaN near FLT_MAX); a NaN score makes its row NaN with a cap as
    without; a NaN sink makes its head NaN, a sink of +inf gives output 0 and LSE +inf, and a -inf
    sink has gradient 0, also on rows that see no key."""
    # (600 keys for 2 queries: the CPU's split decode path; the Triton interpreter takes a smaller case)
    S, lengths = (40, (17,)) if backend == "triton" else (600, (2, 37))
    for L in lengths:
        q, k, v = torch.randn(2, L, 4, 32), torch.randn(2, S, 4, 32), torch.randn(2, S, 4, 32)
        for cap in (1e3, 1e6, 3e38):
            out, lse = _flash_call(q, k, v, backend, softcap=cap)
            ref, ref_lse = _flash_call(q.double(), k.double(), v.double(), "math", softcap=cap)
            assert_close(out, ref, torch.float32, f"L={L} softcap={cap:g} out")
            assert_close(lse, ref_lse, torch.float32, f"L={L} softcap={cap:g} lse")
        qn = q.clone()
        qn[1, L // 2, 2, 5] = float("nan")  # every score of that row is NaN
        out, lse = _flash_call(qn, k, v, backend, softcap=2.0)
        nan_row = torch.zeros_like(lse, dtype=torch.bool)
        nan_row[1, 2, L // 2] = True
        assert out.transpose(1, 2)[nan_row].isnan().all() and lse[nan_row].isnan().all(), "a NaN score under a cap"
        assert torch.isfinite(out.transpose(1, 2)[~nan_row]).all() and torch.isfinite(lse[~nan_row]).all()
        # heads: a NaN sink, +inf, -inf, an ordinary one; causal with L > S leaves rows without keys
        sinks = torch.tensor([float("nan"), float("inf"), float("-inf"), 0.5])
        for Lq, Sk, causal in ((L, S, False), (9, 4, True)):
            qs, ks, vs = (torch.randn(2, n, 4, 32, requires_grad=True) for n in (Lq, Sk, Sk))
            sk = sinks.clone().requires_grad_(True)
            out, lse = _flash_call(qs, ks, vs, backend, causal=causal, s_aux=sk)
            ref, ref_lse = _flash_call(qs.double(), ks.double(), vs.double(), "math", causal=causal, s_aux=sinks.double())
            assert out[:, :, 0].isnan().all() and lse[:, 0].isnan().all(), "a NaN sink makes its head NaN"
            assert (out[:, :, 1] == 0).all() and (lse[:, 1] == float("inf")).all(), "a +inf sink takes all the weight"
            assert_close(out[:, :, 2:], ref[:, :, 2:], torch.float32, f"sinks, L={Lq} S={Sk} out")
            finite = torch.isfinite(ref_lse[:, 2:])
            assert torch.equal(torch.isfinite(lse[:, 2:]), finite)
            assert_close(lse[:, 2:][finite], ref_lse[:, 2:][finite], torch.float32, f"sinks, L={Lq} S={Sk} lse")
            (d_sink,) = torch.autograd.grad(out[:, :, 2:].sum(), sk)
            assert d_sink[2] == 0, "a -inf sink has no weight, so no gradient"


def test_modifiers_are_noops_at_their_neutral_values(seed):
    """softcap 0, no sinks and no slopes is the plain call; a -inf sink and zero slopes change nothing."""
    q, k, v = (torch.randn(1, 2, 33, 16) for _ in range(3))
    plain = attnkern.scaled_dot_product_attention(q, k, v, is_causal=True, backend="cpu")
    same = attnkern.scaled_dot_product_attention(q, k, v, is_causal=True, softcap=0.0, backend="cpu",
                                                 sinks=torch.full((2,), float("-inf")), alibi_slopes=torch.zeros(2))
    torch.testing.assert_close(same, plain, rtol=1e-6, atol=1e-6)


def test_flash_attn_func_positional_order_is_flash_attn_2s(seed):
    """q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic."""
    B, L, H, D = 2, 20, 4, 16
    q, k, v = (torch.randn(B, L, H, D) for _ in range(3))
    slopes = torch.rand(H) * 0.3
    sinks = torch.randn(H)
    out, lse = attnkern.flash_attn_func(q, k, v, 0.0, 0.3, True, (5, 0), 4.0, slopes, True, False, s_aux=sinks,
                                        return_lse=True)
    ref, ref_lse = attnkern.flash_attn_func(
        q.double(), k.double(), v.double(), softmax_scale=0.3, causal=True, window_size=(5, 0), softcap=4.0,
        alibi_slopes=slopes, s_aux=sinks.double(), return_lse=True, backend="math")
    assert_close(out, ref, torch.float32, "out")
    assert_close(lse, ref_lse, torch.float32, "lse")
    with pytest.raises(TypeError, match="softcap"):  # the old positional return_lse now lands on softcap
        attnkern.flash_attn_func(q, k, v, 0.0, None, False, (-1, -1), True)
    with pytest.raises(ValueError, match="return_attn_probs"):
        attnkern.flash_attn_func(q, k, v, return_attn_probs=True)


@pytest.mark.parametrize(
    "kw,exc,name",
    [
        (dict(softcap=-1.0), ValueError, "softcap"),
        (dict(softcap=float("nan")), ValueError, "softcap"),
        (dict(softcap=float("inf")), ValueError, "softcap"),
        (dict(softcap="50"), TypeError, "softcap"),
        (dict(sinks=torch.zeros(3)), ValueError, "sinks"),
        (dict(sinks=torch.zeros(4, dtype=torch.float64)), TypeError, "sinks"),
        (dict(sinks=torch.zeros(4, dtype=torch.int64)), TypeError, "sinks"),
        (dict(sinks=torch.zeros(4, device="meta")), ValueError, "sinks"),
        (dict(sinks=[0.0] * 4), TypeError, "sinks"),
        (dict(alibi_slopes=torch.zeros(3)), ValueError, "alibi_slopes"),
        (dict(alibi_slopes=torch.zeros(2, 4, 1)), ValueError, "alibi_slopes"),
        (dict(alibi_slopes=torch.zeros(4, dtype=torch.float16)), TypeError, "alibi_slopes"),
        (dict(alibi_slopes=torch.zeros(4, device="meta")), ValueError, "alibi_slopes"),
        (dict(alibi_slopes=torch.zeros(4, requires_grad=True)), ValueError, "alibi_slopes"),
    ],
)
def test_bad_modifier_arguments_name_the_argument(kw, exc, name):
    q, k, v = (torch.randn(2, 4, 8, 16, dtype=torch.float32) for _ in range(3))
    with pytest.raises(exc, match=name):
        attnkern.scaled_dot_product_attention(q, k, v, **kw)
    if "sinks" in kw:  # flash_attn_func names it s_aux
        with pytest.raises(exc, match="s_aux"):
            attnkern.flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v)), s_aux=kw["sinks"])


def test_every_backend_row_serves_the_modifiers():
    """Every row (cuda included: its kModified kernels) accepts softcap/sinks/ALiBi; a refusal on
    this machine names something else (no device, no extension), never the modifiers."""
    q = torch.randn(1, 2, 8, 16, dtype=torch.float16)
    problem = normalize_torch_layout(q, q, q, None, 0.0, False, None, False, None)[4]
    problem, _, _ = with_modifiers(problem, q, 30.0, torch.zeros(2), torch.zeros(2))
    assert problem.has_modifiers
    for name, cap in dispatch.CAPABILITIES.items():
        assert cap.modifiers, name
        reason = cap.why_not(replace(problem, device_type=cap.devices[0]))
        assert reason is None or "softcap" not in reason, (name, reason)


@pytest.mark.skipif(ops.native_fwd is None, reason="C++ extension not built")
def test_opcheck_and_compile_with_modifiers(seed):
    B, Hq, Hkv, L, S, E = 2, 4, 2, 19, 27, 16
    q, k, v = torch.randn(B, Hq, L, E), torch.randn(B, Hkv, S, E), torch.randn(B, Hkv, S, E)
    sinks = torch.randn(Hq).requires_grad_(True)
    slopes = torch.rand(B, Hq) * 0.2
    args = (q, k, v, None, None, 0.25, 6, 0, True, 0.0, 5.0, sinks, slopes)
    torch.library.opcheck(torch.ops.attnkern.fwd.default, args)
    out, lse = torch.ops.attnkern.fwd(q, k, v, None, None, 0.25, 6, 0, True, 0.0, 5.0, sinks.detach(), slopes)
    bargs = (torch.randn_like(out), torch.randn_like(lse), q, k, v, out, lse, None, None, 0.25, 6, 0, True, 0.0, False,
             5.0, slopes)
    torch.library.opcheck(torch.ops.attnkern.bwd.default, bargs)

    def f(q, k, v, sinks):
        return attnkern.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, softcap=5.0,
                                                     sinks=sinks, alibi_slopes=slopes, backend="cpu").sum(-1)

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    qkv = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref = f(*qkv, sinks)
    got = cf(*qkv, sinks)
    assert_close(got, ref, torch.float32, "compiled out")
    for g, r in zip(torch.autograd.grad(got.square().sum(), qkv + [sinks]),
                    torch.autograd.grad(ref.square().sum(), qkv + [sinks])):
        assert_close(g, r, torch.float32, "compiled grads")


@pytest.mark.skipif(ops._C is None, reason="C++ extension not built")
@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_modifier_parity_under_isa(isa):
    """The other instruction-set variants of the CPU kernels, forced (see test_cpu_isa.py)."""
    env = forced_isa_env(isa)
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", os.path.join(HERE, __file__),
           "-k", "test_modifier_parity and cpu and not under_isa"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=os.path.dirname(HERE))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") == "1", reason="the parity tests above run triton here")
def test_modifier_parity_triton_interpreter():
    """The Triton kernels under TRITON_INTERPRET=1, which must be set before triton is imported:
    rerun this file's parity matrix for backend triton in a child process (see test_triton_interp.py)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "ATTNKERN_TEST_SEED": str(conftest._BASE_SEED)}  # reproducible
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", os.path.join(HERE, __file__),
           "-k", "test_modifier_parity and triton and not interpreter and not under_isa"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=os.path.dirname(HERE))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "8 passed" in run.stdout, run.stdout[-2000:]


def test_local_self_attention_modifiers(seed):
    """attnkern.nn.LocalSelfAttention with softcap, a learned sink per head and ALiBi: the
    kernels' output and gradients (the sinks' included) equal the reference backend's."""
    from attnkern.nn import LocalSelfAttention, alibi_slopes

    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -i for i in range(1, 9)]))
    assert alibi_slopes(6).shape == (6,) and (alibi_slopes(6)[4:] == torch.tensor([0.5, 0.125])).all()
    fused = LocalSelfAttention(64, 4, (9, 0), num_kv_heads=2, softcap=6.0, sinks=True, alibi=True, backend="cpu")
    with torch.no_grad():
        fused.sinks.normal_(0.0, 1.0)
    oracle = LocalSelfAttention(64, 4, (9, 0), num_kv_heads=2, softcap=6.0, sinks=True, alibi=True,
                                backend="math").double()
    oracle.load_state_dict(fused.state_dict())
    x = torch.randn(2, 30, 64)
    out = fused(x)
    ref = oracle(x.double())
    assert_close(out, ref, torch.float32, "module output")
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [fused.sinks, fused.qkv_proj.weight], grad)
    want = torch.autograd.grad(ref, [oracle.sinks, oracle.qkv_proj.weight], grad.double())
    for g, w, name in zip(got, want, ("sinks", "qkv_proj.weight")):
        assert_close(g, w, torch.float32, f"module grad {name}")
