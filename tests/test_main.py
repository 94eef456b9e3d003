"""`python -m attnkern`: version, compiled backends, a passing self-check, the speed line."""

from __future__ import annotations

import subprocess
import sys

import pytest

import attnkern
from attnkern import ops


@pytest.mark.skipif(ops._C is None, reason="C++ extension not built")
def test_python_m_attnkern_reports_and_self_checks():
    run = subprocess.run([sys.executable, "-m", "attnkern"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert f"attnkern {attnkern.__version__}" in out
    assert f"kernels for {ops._C.cpu_isa()}" in out
    assert f"parallel: {ops._C.cpu_parallel()}, " in out and " threads in use" in out
    assert "cuda backend:" in out and "triton backend:" in out
    assert "self-check cpu float32: ok" in out and "self-check cpu bfloat16: ok" in out
    assert "torch SDPA" in out and "x\n" in out
    if ops._C_cuda is not None:
        assert ops._C_cuda.archs() in out


def test_self_check_detects_a_wrong_backend(monkeypatch):
    """The self-check must be able to fail: corrupt the CPU op's output and it reports FAILED."""
    if ops._C is None:
        pytest.skip("C++ extension not built")
    from attnkern import __main__ as cli

    real = ops.native_fwd

    def broken(*args):
        out, lse = real(*args)
        return out * 1.01, lse

    monkeypatch.setattr(ops, "native_fwd", broken)
    failures = cli.self_check("cpu", "cpu", __import__("torch").float32)
    assert failures and all("relative error" in f for f in failures)
