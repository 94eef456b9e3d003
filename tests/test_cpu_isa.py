"""The CPU kernels exist in five instruction-set variants (AVX-512 with AMX tile matmuls for
bf16, AVX-512 with AVX512_BF16 dot products for the bf16 forward, AVX-512, AVX2, portable C++);
the machine picks one, so the others are exercised here by forcing them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import attnkern
from attnkern import ops

from conftest import assert_close

pytestmark = pytest.mark.skipif(ops._C is None, reason="C++ extension not built")
HERE = os.path.dirname(os.path.abspath(__file__))


# variants that differ from avx512 only on bf16 inputs
BF16_ONLY = ("avx512_bf16", "amx_bf16")


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512", "avx512_bf16", "amx_bf16"])
def test_parity_subset_under_isa(isa):
    default = ops._C.cpu_isa()
    if isa == default:
        pytest.skip(f"{isa} is this machine's default: test_parity.py covers it")
    probe = subprocess.run(
        [sys.executable, "-c", "import attnkern.ops as o; print(o._C.cpu_isa())"],
        env={**os.environ, "ATTNKERN_CPU_ISA": isa}, capture_output=True, text=True,
    )
    if probe.returncode != 0:
        assert "is not available on this CPU" in probe.stderr, probe.stderr
        why = [line for line in probe.stderr.splitlines() if "is not available" in line][-1]
        pytest.skip(why.split("Error: ", 1)[-1])
    assert probe.stdout.strip() == isa
    features = "dense or causal or window or mask or gqa or E40 or head_dims or dropout or decode or whole_row"
    # the avx512 kernels but for bf16: its cases only (also for avx512 itself where the default is
    # one of them, which test_parity.py then runs in full)
    if isa in BF16_ONLY or (isa == "avx512" and default in BF16_ONLY):
        features = f"bfloat16 and ({features})"
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", os.path.join(HERE, "test_parity.py"),
           os.path.join(HERE, "test_cpu_threads.py"), "-k", features]
    run = subprocess.run(cmd, env={**os.environ, "ATTNKERN_CPU_ISA": isa}, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout


def test_unknown_isa_is_an_error():
    run = subprocess.run([sys.executable, "-c", "import attnkern.ops as o; o._C.cpu_isa()"],
                         env={**os.environ, "ATTNKERN_CPU_ISA": "sse9"}, capture_output=True, text=True)
    assert run.returncode != 0 and "ATTNKERN_CPU_ISA=sse9" in run.stderr
    assert attnkern.ops._C.cpu_isa() in ("amx_bf16", "avx512_bf16", "avx512", "avx2", "generic")


def test_switching_variant_in_process():
    """_set_cpu_isa (the benchmarks' in-process switch) changes the kernels the op runs and
    'auto' restores the default; an unknown name is an error naming it."""
    default = ops._C.cpu_isa()
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 70, 64, dtype=torch.bfloat16) for _ in range(3))
    ref = attnkern.scaled_dot_product_attention(q.double(), k.double(), v.double(), backend="math")
    try:
        ops._C._set_cpu_isa("generic")
        assert ops._C.cpu_isa() == "generic"
        out = attnkern.scaled_dot_product_attention(q, k, v, backend="cpu")
        assert_close(out, ref, torch.bfloat16, "generic out")
        with pytest.raises(RuntimeError, match="ATTNKERN_CPU_ISA=sse9"):
            ops._C._set_cpu_isa("sse9")
        assert ops._C.cpu_isa() == "generic"
    finally:
        ops._C._set_cpu_isa("auto")
    assert ops._C.cpu_isa() == default


def test_amx_state_is_reported():
    state = ops._C.cpu_amx()
    assert state == "usable" or state.startswith("unusable: "), state
    if ops._C.cpu_isa() == "amx_bf16":
        assert state == "usable"
