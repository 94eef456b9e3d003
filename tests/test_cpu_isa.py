"""The CPU kernels exist in four instruction-set variants (AVX-512 with AVX512_BF16 dot
products for the bf16 forward, AVX-512, AVX2, portable C++); the machine picks one, so the
others are exercised here by forcing them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import attnkern
from attnkern import ops

pytestmark = pytest.mark.skipif(ops._C is None, reason="C++ extension not built")
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512", "avx512_bf16"])
def test_parity_subset_under_isa(isa):
    if isa == ops._C.cpu_isa():
        pytest.skip(f"{isa} is this machine's default: test_parity.py covers it")
    probe = subprocess.run(
        [sys.executable, "-c", "import attnkern.ops as o; print(o._C.cpu_isa())"],
        env={**os.environ, "ATTNKERN_CPU_ISA": isa}, capture_output=True, text=True,
    )
    if probe.returncode != 0:
        assert "is not available on this CPU" in probe.stderr, probe.stderr
        pytest.skip(f"{isa} not available on this CPU")
    assert probe.stdout.strip() == isa
    features = "dense or causal or window or mask or gqa or E40 or head_dims or dropout or decode"
    if isa == "avx512_bf16":  # the avx512 kernels but for the bf16 forward: its cases only
        features = f"bfloat16 and ({features})"
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", os.path.join(HERE, "test_parity.py"),
           "-k", features]
    run = subprocess.run(cmd, env={**os.environ, "ATTNKERN_CPU_ISA": isa}, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout


def test_unknown_isa_is_an_error():
    run = subprocess.run([sys.executable, "-c", "import attnkern.ops as o; o._C.cpu_isa()"],
                         env={**os.environ, "ATTNKERN_CPU_ISA": "sse9"}, capture_output=True, text=True)
    assert run.returncode != 0 and "ATTNKERN_CPU_ISA=sse9" in run.stderr
    assert attnkern.ops._C.cpu_isa() in ("avx512_bf16", "avx512", "avx2", "generic")
