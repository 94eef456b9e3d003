"""Random calls against the float64 reference: shapes (zero sizes included), strides, GQA, masks
(bool, float with -inf and finfo.min entries, broadcast), windows (up to far past the
sequences), both alignments and both layouts, forward and (for a share of the cases) backward,
on every backend that runs on CPU here (cpu and math; Triton needs TRITON_INTERPRET set before
import and runs its own matrix in test_triton_interp.py).

A failure names the case's seed: ``ATTNKERN_FUZZ_CASE=<seed> pytest tests/test_fuzz.py`` reruns it
alone. ``ATTNKERN_FUZZ_CASES`` changes the number of cases (default 300).
"""

from __future__ import annotations

import os
import random

import torch

import attnkern
from attnkern import reference
from attnkern.integrations._attend import attend
from conftest import TOLERANCE, rel_err

CASES = int(os.environ.get("ATTNKERN_FUZZ_CASES", "300"))
BACKENDS = [b for b in ("cpu", "math") if b in attnkern.available_backends("cpu")]
LOWEST = torch.finfo(torch.float32).min


def _tensor(r: random.Random, shape, dtype, flash: bool) -> torch.Tensor:
    """Values of shape (B, H, N, D) in one of three memory layouts (the kernels read strides)."""
    layout = r.choice(["contiguous", "transposed", "strided"])
    b, h, n, d = shape
    if layout == "transposed" or flash:  # (B, N, H, D) memory
        return torch.randn(b, n, h, d, dtype=dtype).transpose(1, 2)
    if layout == "strided":  # every other row and column of a bigger tensor
        return torch.randn(b, h, 2 * n, 2 * d + 1, dtype=dtype)[:, :, ::2, 1::2]
    return torch.randn(shape, dtype=dtype)


def _mask(r: random.Random, shape):
    kind = r.choice([None, None, "bool", "float", "float-min"])
    if kind is None:
        return None
    b, h, n, s = shape
    bshape = r.choice([(b, h, n, s), (1, 1, n, s), (b, 1, 1, s), (n, s)])
    if kind == "bool":
        return torch.rand(bshape) < 0.75
    mask = torch.randn(bshape)
    mask[torch.rand(bshape) < 0.15] = float("-inf")
    if kind == "float-min":
        mask[torch.rand(bshape) < 0.25] = LOWEST  # HF's padding value: finite
        mask[torch.rand(bshape[:-1]) < 0.2] = LOWEST  # whole rows of it (padding queries)
    return mask


def run_case(case_seed: int) -> str:
    r = random.Random(case_seed)
    torch.manual_seed(case_seed)
    batch = r.choice([0, 1, 1, 2, 3])
    heads_kv = r.choice([0, 1, 1, 2, 2, 3]) if r.random() < 0.1 else r.choice([1, 2, 3])
    heads_q = heads_kv * r.choice([1, 1, 2, 3])
    len_q, len_k = r.choice([0, 1, 1, 2, 5, 17, 33, 70]), r.choice([0, 1, 3, 16, 40, 129, 300])
    head_dim = r.choice([0, 1, 8, 16, 24, 40]) if r.random() < 0.15 else r.choice([8, 16, 32, 64])
    head_dim_v = r.choice([head_dim, head_dim, 1, 8, 48])
    dtype = r.choice([torch.float32, torch.float32, torch.float16])
    flash = r.random() < 0.25  # flash_attn_func: (B, L, H, D), bottom-right, no mask, LSE returned
    bottom_right = flash or r.random() < 0.5
    causal = r.random() < 0.3
    window = r.choice([None, None, (r.choice([-1, 0, 1, 4, 37]), r.choice([-1, 0, 2, 9])), (2**40, 3), (2**63 - 1,) * 2])
    scale = r.choice([None, 0.3]) if head_dim else r.choice([None, 1.0])
    q = _tensor(r, (batch, heads_q, len_q, head_dim), dtype, flash)
    k = _tensor(r, (batch, heads_kv, len_k, head_dim), dtype, flash)
    v = _tensor(r, (batch, heads_kv, len_k, head_dim_v), dtype, flash)
    mask = None if flash else _mask(r, (batch, heads_q, len_q, len_k))
    backward = r.random() < 0.35  # for a share of the cases (finfo.min rows included)
    what = (f"B{batch} Hq{heads_q} Hkv{heads_kv} L{len_q} S{len_k} E{head_dim} Ev{head_dim_v} {dtype} "
            f"{'flash' if flash else 'torch'} causal={causal} window={window} bottom_right={bottom_right} "
            f"mask={None if mask is None else (mask.dtype, tuple(mask.shape))} backward={backward}")

    left, right = (-1, -1) if window is None else window
    left, right = (-1 if w >= len_q + len_k else w for w in (left, right))
    right = 0 if causal else right
    eff_scale = (head_dim ** -0.5 if head_dim else 1.0) if scale is None else scale
    q64, k64, v64 = (t.detach().double().requires_grad_(backward) for t in (q, k, v))
    m64 = None if mask is None else mask.expand(batch, heads_q, len_q, len_k)
    m64 = m64 if m64 is None or m64.dtype == torch.bool else m64.double()
    want, want_lse = reference.attention(q64, k64, v64, m64, eff_scale, left, right, bottom_right)
    grad_out = torch.randn_like(want)
    if backward:
        want_grads = torch.autograd.grad(want, (q64, k64, v64), grad_out)
    tol = TOLERANCE[dtype]

    for backend in BACKENDS:
        xs = [t.detach().clone().requires_grad_(backward) for t in (q, k, v)]
        if flash:
            out, lse = attnkern.flash_attn_func(*(x.transpose(1, 2) for x in xs), 0.0, scale, causal,
                                                (-1, -1) if window is None else window, return_lse=True,
                                                backend=backend)
            out = out.transpose(1, 2)
            finite = torch.isfinite(want_lse)
            assert torch.equal(finite, torch.isfinite(lse)), f"{backend}: LSE -inf rows differ\n{what}"
            assert rel_err(lse[finite], want_lse[finite]) <= max(tol, 1e-4), f"{backend}: LSE\n{what}"
        else:
            out = attend(*xs, mask, is_causal=causal, scale=scale, window_size=window, bottom_right=bottom_right,
                         backend=backend)
        err = rel_err(out, want)
        assert err <= tol, f"{backend}: output error {err:.2e} > {tol:.0e}\n{what}"
        if backward:
            grads = torch.autograd.grad(out, xs, grad_out.to(dtype).transpose(1, 2).transpose(1, 2), allow_unused=True)
            for name, got, ref in zip(("dq", "dk", "dv"), grads, want_grads):
                got = torch.zeros_like(ref) if got is None else got
                err = rel_err(got, ref)
                assert err <= 5 * tol, f"{backend}: {name} error {err:.2e} > {5 * tol:.0e}\n{what}"
    return what


def test_fuzz_against_float64_reference(seed):
    only = os.environ.get("ATTNKERN_FUZZ_CASE")
    case_seeds = [int(only)] if only else [random.Random(seed).randrange(2**31) ^ i for i in range(CASES)]
    for case_seed in case_seeds:
        try:
            run_case(case_seed)
        except Exception as exc:
            raise AssertionError(f"fuzz case failed; rerun it with ATTNKERN_FUZZ_CASE={case_seed}: {exc}") from exc
