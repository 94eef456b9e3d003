"""Shared test machinery: tolerances, fresh random inputs, and the float64 oracle.

Every parity test compares a backend against attnkern.reference run in float64 on the same
inputs. The error measure is a relative norm,

    err = ||out - ref|| / max(||ref||, 0.1 * sqrt(numel))

(the floor keeps the measure meaningful for gradients that are mathematically ~0, such as
dq when every row attends exactly one key), and must stay below TOLERANCE[dtype].
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import subprocess
import sys
import sysconfig
import tempfile
import zlib
from dataclasses import dataclass, field
from typing import Optional, Tuple

import pytest
import torch

import attnkern
from attnkern import dispatch
from attnkern._semantics import check_backend, normalize_torch_layout

# relative-norm tolerance per input dtype (one place; every backend is held to it)
TOLERANCE = {
    torch.float32: 2e-5,
    torch.float16: 3e-3,
    torch.bfloat16: 2e-2,
    torch.float64: 1e-10,
}
NORM_FLOOR_RMS = 0.1


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), "non-finite values in output"
    if ref.numel() == 0:
        return 0.0
    denom = max(ref.norm().item(), NORM_FLOOR_RMS * math.sqrt(ref.numel()))
    return (out - ref).norm().item() / denom


def assert_close(out, ref, dtype, what=""):
    err = rel_err(out, ref)
    tol = TOLERANCE[dtype]
    assert err <= tol, f"{what}: relative error {err:.3e} > tolerance {tol:.1e} for {dtype}"


def assert_lse_close(lse, ref, dtype, what="lse"):
    """LSE against the reference: rows that see no key are -inf in both, the rest are close."""
    empty = torch.isneginf(ref.detach().cpu())
    assert torch.equal(torch.isneginf(lse.detach().cpu()), empty), f"{what}: -inf rows differ from the reference"
    assert_close(lse.detach().cpu()[~empty], ref.detach().cpu()[~empty], dtype, what)


_BASE_SEED = int(os.environ.get("ATTNKERN_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    return f"attnkern test seed: ATTNKERN_TEST_SEED={_BASE_SEED}; backends: {dispatch.available_backends()}"


@pytest.fixture
def seed(request):
    """A fresh seed per test (reproducible via ATTNKERN_TEST_SEED), applied to torch."""
    # crc32, not hash(): str hashes are salted per process, which would defeat ATTNKERN_TEST_SEED
    s = (_BASE_SEED + zlib.crc32(request.node.nodeid.encode())) % (2**31)
    torch.manual_seed(s)
    return s


@pytest.fixture(scope="session")
def emu():
    """The CUDA kernels' source built for the CPU emulator (csrc/cuda/emulator), once per session."""
    from torch.utils.cpp_extension import load

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # one build folder per checkout and Python ABI; ninja rebuilds when a header changes
    tag = f"{sysconfig.get_config_var('SOABI') or 'py'}_{hashlib.sha1(root.encode()).hexdigest()[:8]}"
    build_dir = os.environ.get("ATTNKERN_EMU_BUILD_DIR", os.path.join(tempfile.gettempdir(), f"attnkern_cuda_emu_{tag}"))
    os.makedirs(build_dir, exist_ok=True)
    return load(
        name="attnkern_cuda_emu",
        sources=[os.path.join(root, "csrc", "cuda", "emulator", "emulator.cpp")],
        extra_cflags=["-O1", "-DATTNKERN_CUDA_EMULATOR", "-Wno-unknown-pragmas"],
        build_directory=build_dir,
        verbose=False,
    )


def device_backends(device: str):
    """Fused backends to test on `device` (math is the oracle, not a subject)."""
    return [b for b in dispatch.available_backends(device) if b != "math"]


@dataclass
class Case:
    """One attention problem in torch layout (B, H, L, E)."""

    batch: int = 2
    heads_q: int = 2
    heads_kv: int = 2
    len_q: int = 67
    len_k: int = 67
    head_dim: int = 64
    head_dim_v: Optional[int] = None
    causal: bool = False
    window: Optional[Tuple[int, int]] = None
    bottom_right: bool = False  # causal/window alignment: query i sits at key position i + S - L
    mask: Optional[str] = None  # None | "bool" | "float" | "bool-bcast" | "float-bcast"
    dropout_p: float = 0.0
    three_d: bool = False
    layout: str = "contiguous"  # "contiguous" | "transposed" (BLHD memory) | "strided" (sliced)
    id: str = field(default="")

    def __post_init__(self):
        if self.head_dim_v is None:
            self.head_dim_v = self.head_dim


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "transposed":  # (B, H, L, E) view of (B, L, H, E) memory
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "strided":  # every other element of a wider buffer along the last dim
        wide = torch.empty(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t


def make_inputs(case: Case, dtype: torch.dtype, device: str = "cpu", requires_grad: bool = True):
    B, Hq, Hkv, L, S, E, Ev = (case.batch, case.heads_q, case.heads_kv, case.len_q, case.len_k, case.head_dim,
                               case.head_dim_v)
    q = torch.randn(B, Hq, L, E, dtype=torch.float64)
    k = torch.randn(B, Hkv, S, E, dtype=torch.float64)
    v = torch.randn(B, Hkv, S, Ev, dtype=torch.float64)
    # lay out on the target device: .to(device) would make a sliced (non-dense) view contiguous
    tensors = [_layout(t.to(dtype).to(device), case.layout) for t in (q, k, v)]
    if case.three_d:
        assert B == 1
        tensors = [t[0] for t in tensors]
    mask = None
    if case.mask is not None:
        shape = (B, Hq, L, S) if not case.mask.endswith("bcast") else (1, 1, L, S) if Hq > 1 else (B, 1, 1, S)
        if case.mask.startswith("bool"):
            mask = torch.rand(shape) > 0.25
            mask[..., 0, :] = False  # one fully masked row: must give 0, never NaN
        else:
            mask = torch.randn(shape, dtype=torch.float64).to(dtype)
        if case.three_d:
            mask = mask[0]
        mask = mask.to(device)
    if requires_grad:
        for t in tensors:
            t.requires_grad_(True)
    return tensors[0], tensors[1], tensors[2], mask


def case_attention(case: Case, q, k, v, mask, backend: str):
    """The case's attention through the public normalisation and dispatch. No public function
    takes both a mask and the bottom-right alignment, so this calls what
    scaled_dot_product_attention calls, with the case's alignment."""
    q4, k4, v4, m4, problem, out_shape = normalize_torch_layout(
        q, k, v, mask, case.dropout_p, case.causal, None, case.heads_q != case.heads_kv, case.window,
        bottom_right=case.bottom_right,
    )
    out, _ = dispatch.run(problem, q4, k4, v4, m4, check_backend(backend))
    return out.reshape(out_shape)


def reference_forward_backward(case: Case, q, k, v, mask, grad_out, seed: int, mask_grad: bool = False):
    """float64 oracle: outputs and gradients through attnkern.reference (backend='math')."""
    q64, k64, v64 = (t.detach().double().cpu().requires_grad_(True) for t in (q, k, v))
    m64 = None
    if mask is not None:
        m64 = mask.detach().cpu()
        if m64.is_floating_point():
            m64 = m64.double().requires_grad_(mask_grad)
    torch.manual_seed(seed)
    out = case_attention(case, q64, k64, v64, m64, "math")
    inputs = [q64, k64, v64] + ([m64] if mask_grad else [])
    grads = torch.autograd.grad(out, inputs, grad_out.detach().double().cpu())
    return out, grads


def forced_isa_env(isa: str) -> dict:
    """The environment that forces the CPU kernels' ``isa`` variant (ATTNKERN_CPU_ISA) in a child
    process. Skips the calling test where ``isa`` is this machine's default (the in-process tests
    cover it) or where this CPU/build lacks it."""
    from attnkern import ops

    default = ops._C.cpu_isa()
    if isa == default:
        pytest.skip(f"{isa} is this machine's default: the in-process tests cover it")
    if isa == "avx512" and default in ("avx512_bf16", "amx_bf16"):
        pytest.skip(f"avx512 differs from this machine's default {default} only in its bf16 block products, "
                    "which tests/test_cpu_isa.py forces")
    # the child runs with this run's seed, so the seed in this run's header reproduces its failures too
    env = {**os.environ, "ATTNKERN_CPU_ISA": isa, "ATTNKERN_TEST_SEED": str(_BASE_SEED)}
    probe = subprocess.run([sys.executable, "-c", "import attnkern.ops as o; print(o._C.cpu_isa())"], env=env,
                           capture_output=True, text=True)
    if probe.returncode != 0:
        assert "is not available on this CPU" in probe.stderr, probe.stderr
        pytest.skip(f"{isa} not available on this CPU")
    return env


# The interpreter suites of this session, as absolute paths: the files of the collected tests that
# call run_interpreted (found in pytest_collection_finish). The first call runs them all in one
# child process, so the child's start-up (torch, triton, attnkern, collection) is paid once.
_INTERPRETED_SUITES: list = []
_interpreter_results: dict = {}


def pytest_collection_finish(session):
    suites = set()
    for item in session.items:
        code = getattr(getattr(item, "obj", None), "__code__", None)
        if code is not None and "run_interpreted" in code.co_names:
            suites.add(os.path.realpath(str(item.path)))
    _INTERPRETED_SUITES[:] = sorted(suites)


def _run_interpreter_child(paths) -> dict:
    """Run the test files ``paths`` in one child process with TRITON_INTERPRET=1 from its start
    (triton decides between compiling and interpreting at import), with this run's seed;
    {path: (ok, summary, details)} from the child's JUnit XML."""
    import time
    import xml.etree.ElementTree as ET

    env = dict(os.environ, TRITON_INTERPRET="1", ATTNKERN_TEST_SEED=str(_BASE_SEED))
    # ATTNKERN_INTERP_SELECT narrows the child's run with -k (CI's oldest-versions block runs
    # the float32 half only: the float16 half repeats the same kernels and code paths)
    select = os.environ.get("ATTNKERN_INTERP_SELECT")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="attnkern_interp_") as tmp:
        junit = os.path.join(tmp, "junit.xml")
        child = subprocess.run(
            [sys.executable, "-m", "pytest", *paths, "-q", "-p", "no:cacheprovider", "-rfE", f"--junitxml={junit}",
             "-o", "junit_family=xunit1"] + (["-k", select] if select else []),
            cwd=root, env=env, capture_output=True, text=True,
        )
        try:
            cases = list(ET.parse(junit).getroot().iter("testcase"))
        except (OSError, ET.ParseError):  # the child died before writing it: every file fails below
            cases = []
        counts = {p: {"passed": 0, "failed": 0, "skipped": 0} for p in paths}
        details = {p: [] for p in paths}
        for case in cases:
            path = os.path.realpath(os.path.join(root, case.get("file", "")))
            if path not in counts:
                continue
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            outcome = "failed" if bad is not None else "skipped" if case.find("skipped") is not None else "passed"
            counts[path][outcome] += 1
            if bad is not None:
                details[path].append(f"{case.get('classname')}::{case.get('name')}\n{bad.text or bad.get('message')}")
    output = child.stdout + child.stderr
    took = time.monotonic() - started
    print(f"interpreter child for {len(paths)} file(s) ({took:.0f} s): "
          f"{output.strip().splitlines()[-1] if output.strip() else '(no output)'}")
    any_failed = any(c["failed"] for c in counts.values())
    results = {}
    for p in paths:
        c = counts[p]
        # a clean file still fails when the child failed for a reason no test case records
        ok = c["passed"] > 0 and c["failed"] == c["skipped"] == 0 and (child.returncode == 0 or any_failed)
        summary = ", ".join(f"{n} {k}" for k, n in c.items() if n)
        results[p] = (ok, summary or "no test ran", "\n\n".join(details[p])[-6000:] + f"\n\nchild output (exit "
                      f"{child.returncode}):\n{output[-4000:]}")
    return results


def run_interpreted(path: str) -> None:
    """Assert that the test file ``path`` passes under TRITON_INTERPRET=1 (every test passed,
    none skipped). The first call of a session runs every interpreter suite of the session in
    one child process (see _run_interpreter_child); later calls read their file's result."""
    path = os.path.realpath(path)
    if path not in _interpreter_results:
        pending = [p for p in _INTERPRETED_SUITES if p not in _interpreter_results]
        _interpreter_results.update(_run_interpreter_child(pending if path in pending else [path]))
    ok, summary, details = _interpreter_results[path]
    print(f"interpreter suite {os.path.basename(path)}: {summary}")
    assert ok, f"interpreter suite {os.path.basename(path)}: {summary}\n{details}"
