"""``python -m attnkern`` (also the ``attnkern`` command).

Without arguments: the version, the compiled backends, a parity self-check of every usable
backend against the math reference, and a one-line speed comparison with torch's SDPA.
``attnkern bench ...``, ``attnkern memory ...`` and ``attnkern packed ...`` (varlen and paged decode)
run the benchmark tools.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from typing import List, Optional

import torch

from . import __version__, dispatch, ops
from .reference import relative_error
from .functional import scaled_dot_product_attention


# (name, kwargs, mask?) problems the self-check runs on every backend
SELF_CHECK = [
    ("dense", dict(), False),
    ("causal+gqa", dict(is_causal=True, enable_gqa=True), False),
    ("window(32,8)", dict(window_size=(32, 8)), False),
    ("bool-mask", dict(), True),
]
SELF_CHECK_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def self_check(backend: str, device: str, dtype: torch.dtype) -> List[str]:
    """Parity of `backend` against the float64 reference; returns the failures (empty if none)."""
    failures = []
    for name, kw, with_mask in SELF_CHECK:
        heads_kv = 2 if kw.get("enable_gqa") else 4
        q = torch.randn(2, 4, 130, 64, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(2, heads_kv, 150, 64, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(2, heads_kv, 150, 64, device=device, dtype=dtype, requires_grad=True)
        mask = (torch.rand(130, 150, device=device) > 0.2) if with_mask else None
        out = scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=backend, **kw)
        grad = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), grad)
        ref_in = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
        ref = scaled_dot_product_attention(*ref_in, attn_mask=mask, backend="math", **kw)
        ref_grads = torch.autograd.grad(ref, ref_in, grad.double())
        errs = [relative_error(out, ref)] + [relative_error(g, r) for g, r in zip(grads, ref_grads)]
        worst = max(errs)
        if not worst <= SELF_CHECK_TOL[dtype]:
            failures.append(f"{name}: relative error {worst:.2e}")
    return failures


def _median_time(fn, device: str, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def speed_line(device: str) -> str:
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    L = 1024 if device == "cpu" else 4096
    q, k, v = (torch.randn(1, 8, L, 64, device=device, dtype=dtype) for _ in range(3))
    ours = _median_time(lambda: scaled_dot_product_attention(q, k, v, is_causal=True), device)
    theirs = _median_time(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True), device)
    backend = dispatch.choose(_problem(q), "auto")
    return (f"speed ({device}, {str(dtype).replace('torch.', '')}, B=1 H=8 L=S={L} D=64 causal): "
            f"attnkern[{backend}] {ours * 1e3:.2f} ms, torch SDPA {theirs * 1e3:.2f} ms -> {theirs / ours:.2f}x")


def cpu_threads_line() -> str:
    """How the CPU kernels fork: the build's parallel backend and torch's thread count now."""
    return f"parallel: {ops._C.cpu_parallel()}, {ops._C.cpu_threads()} threads in use"


def cpu_amx_line() -> str:
    """The AMX variant's state: in use (bf16 block products on tiles), available, or why not."""
    state = ops._C.cpu_amx()
    if state != "usable":
        return f"AMX bf16 tiles: not used ({state.removeprefix('unusable: ')})"
    if ops._C.cpu_isa() == "amx_bf16":
        return "AMX bf16 tiles: in use for bf16 inputs with head dims multiple of 32 (q/k) and 16 (v)"
    return "AMX bf16 tiles: usable, not selected (ATTNKERN_CPU_ISA)"


def cpu_fp32_line() -> str:
    """Which unit runs the fp32 forward's block products: AMX tiles (the bf16 split, opt-in) or FMAs."""
    terms = ops._C.cpu_fp32_amx_terms()
    if terms:
        return (f"fp32 forward block products: AMX tiles, three-way bf16 split, {terms} terms (head dims multiple of "
                f"32 (q/k) and 16 (v); ATTNKERN_CPU_FP32_AMX={terms})")
    note = "; ATTNKERN_CPU_FP32_AMX=6 puts the forward's on AMX tiles" if ops._C.cpu_isa() == "amx_bf16" else ""
    return f"fp32 block products: fp32 multiply-adds ({ops._C.cpu_isa()} kernels){note}"


def _problem(q):
    from ._semantics import normalize_torch_layout

    return normalize_torch_layout(q, q, q, None, 0.0, True, None, False, None)[4]


def report() -> int:
    print(f"attnkern {__version__} (torch {torch.__version__}, python {platform.python_version()})")
    if ops._C is not None:
        print(f"  cpu backend: compiled, kernels for {ops._C.cpu_isa()}; {cpu_threads_line()}")
        print(f"    {cpu_amx_line()}")
        print(f"    {cpu_fp32_line()}")
        if ops._C.cpu_parallel().startswith("none"):
            print("  WARNING: the CPU kernels were built without OpenMP and run single-threaded; "
                  "rebuild with a compiler that accepts -fopenmp")
    else:
        print(f"  cpu backend: not available ({ops.C_IMPORT_ERROR})")
    if ops._C_cuda is not None:
        buckets = sorted({hd for hd, _ in ops._C_cuda.instances()})
        dtypes = sorted({dt for _, dt in ops._C_cuda.instances()})
        print(f"  cuda backend: compiled for archs {ops._C_cuda.archs()}, head-dim buckets {buckets}, {dtypes}")
        hopper = sorted({hd for hd, _ in ops._C_cuda.sm90_instances()})
        if hopper:
            state = "on" if os.environ.get("ATTNKERN_CUDA_WGMMA") == "1" else "off (ATTNKERN_CUDA_WGMMA=1 enables it)"
            print(f"    Hopper wgmma kernels: head-dim buckets {hopper}, {state}; unverified on a GPU")
    else:
        print(f"  cuda backend: not available ({ops.CUDA_IMPORT_ERROR})")
    print(f"  triton backend: {dispatch.CAPABILITIES['triton'].available() or 'available'}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    status = 0
    for device in devices:
        backends = [b for b in dispatch.available_backends(device) if b != "math"]
        print(f"usable backends for {device} tensors: {', '.join(backends + ['math'])}")
        for backend in backends:
            for dtype in (torch.float32, torch.bfloat16) if device == "cpu" else (torch.bfloat16, torch.float16):
                failures = self_check(backend, device, dtype)
                verdict = "ok" if not failures else "FAILED: " + "; ".join(failures)
                print(f"  self-check {backend} {str(dtype).replace('torch.', '')}: {verdict}")
                status |= bool(failures)
        print("  " + speed_line(device))
    return status


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("bench", "memory"):
        from .bench import cli

        try:
            return cli.main(argv)
        except KeyboardInterrupt:  # the JSON/CSV files are written after every case
            print("\nattnkern: interrupted (the files hold the cases finished so far)", file=sys.stderr)
            return 130
    if argv and argv[0] == "packed":
        from .bench import packed

        return packed.main(argv[1:])
    parser = argparse.ArgumentParser(prog="attnkern", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    return report()


if __name__ == "__main__":
    sys.exit(main())
