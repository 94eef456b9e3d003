"""The CUDA backend (csrc/cuda), in three groups.

* build: the extension's build information, the host-side rules (``why_not``), the dispatch
  row and the generated instantiation files. No GPU needed; skipped where ``attnkern._C_cuda``
  was not built (no nvcc), except the generator checks.
* emulator: the kernels' own source compiled for the CPU (csrc/cuda/emulator: one fiber per
  CUDA thread, ldmatrix/mma/cp.async carried out as the PTX ISA defines them) and held to the
  float64 reference: index math, fragment layouts, swizzle, the cp.async pipeline, band
  skipping, masks, dropout, GQA, split-KV. Needs only a C++ compiler. It cannot show speed, and
  it shares the kernels' reading of the PTX fragment layouts, so it does not replace a GPU run.
* gpu: the parity matrix of test_parity.py and more on a CUDA device (marked gpu).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import sys

import pytest
import torch

import attnkern
from attnkern import _semantics, dispatch, ops, reference
from conftest import Case, assert_close, make_inputs
from test_parity import CASES, HEAD_DIMS, run_case

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
HALF = [torch.float16, torch.bfloat16]
BUCKETS = (32, 64, 96, 128, 256)

needs_cuda_ext = pytest.mark.skipif(ops._C_cuda is None, reason=f"CUDA extension not built: {ops.CUDA_IMPORT_ERROR}")
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and "cuda" in dispatch.available_backends("cuda")),
    reason="needs a CUDA device and the CUDA extension",
)


def _build_sources():
    spec = importlib.util.spec_from_file_location("attnkern_build_sources", os.path.join(CUDA_DIR, "build_sources.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# build


def test_instantiation_files_match_generator():
    bs = _build_sources()
    folder = os.path.join(CUDA_DIR, "instantiations")
    committed = {name for name in os.listdir(folder) if name.endswith(".cu")}
    assert committed == set(bs.instantiation_files()), "run python csrc/cuda/build_sources.py --write"
    for name, text in bs.generated_files().items():
        with open(os.path.join(CUDA_DIR, name)) as f:
            assert f.read() == text, f"{name} differs from the generator"


def test_default_build_compiles_every_source(monkeypatch):
    bs = _build_sources()
    monkeypatch.delenv("ATTNKERN_CUDA_HDIMS", raising=False)
    monkeypatch.delenv("ATTNKERN_CUDA_DTYPES", raising=False)
    listed = {os.path.normpath(p) for p in bs.sources(ROOT)}
    on_disk = {
        os.path.normpath(os.path.relpath(os.path.join(d, f), ROOT))
        for d, _, files in os.walk(CUDA_DIR)
        for f in files
        if f.endswith((".cu", ".cpp")) and "emulator" not in d
    }
    assert listed == on_disk


def test_build_restriction_by_environment(monkeypatch):
    bs = _build_sources()
    monkeypatch.setenv("ATTNKERN_CUDA_HDIMS", "128, 64")
    monkeypatch.setenv("ATTNKERN_CUDA_DTYPES", "bf16")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    names = sorted(os.path.basename(p) for p in bs.sources(ROOT) if "instantiations" in p)
    assert names == ["bwd_hdim128_bf16_sm80.cu", "bwd_hdim64_bf16_sm80.cu", "fwd_hdim128_bf16_sm80.cu",
                     "fwd_hdim64_bf16_sm80.cu"]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")  # the wgmma forward needs sm_90a
    names_90 = sorted(os.path.basename(p) for p in bs.sources(ROOT) if "instantiations" in p)
    assert sorted(set(names_90) - set(names)) == ["bwd_hdim128_bf16_sm90.cu", "bwd_hdim64_bf16_sm90.cu",
                                                  "fwd_hdim128_bf16_sm90.cu", "fwd_hdim64_bf16_sm90.cu"]
    monkeypatch.setenv("ATTNKERN_CUDA_HDIMS", "96")
    assert not any("sm90" in p for p in bs.sources(ROOT))
    assert any(p.endswith("bindings_cuda.cpp") for p in bs.sources(ROOT))
    monkeypatch.setenv("ATTNKERN_CUDA_HDIMS", "64,80")
    with pytest.raises(ValueError, match="ATTNKERN_CUDA_HDIMS.*'80'"):
        bs.sources(ROOT)
    monkeypatch.setenv("ATTNKERN_CUDA_HDIMS", "64")
    monkeypatch.setenv("ATTNKERN_CUDA_DTYPES", "fp32")
    with pytest.raises(ValueError, match="ATTNKERN_CUDA_DTYPES"):
        bs.sources(ROOT)


@pytest.mark.skipif(os.environ.get("ATTNKERN_REQUIRE_CUDA", "0") != "1", reason="ATTNKERN_REQUIRE_CUDA not set")
def test_cuda_extension_present_when_required():
    """CI sets ATTNKERN_REQUIRE_CUDA=1 for the install and the tests: a missing extension fails."""
    assert ops._C_cuda is not None, ops.CUDA_IMPORT_ERROR


@needs_cuda_ext
def test_build_info():
    ext = ops._C_cuda
    assert ext.version() == attnkern.__version__
    assert ext.archs()  # TORCH_CUDA_ARCH_LIST of the build
    instances = ext.instances()
    assert instances, "no kernel instantiation registered itself"
    for head_dim, dtype in instances:
        assert head_dim in BUCKETS and dtype in ("float16", "bfloat16")
    assert ext.max_head_dim == 256


@needs_cuda_ext
def test_why_not_states_what_is_served():
    why = ops._C_cuda.why_not
    built = {(d, t) for d, t in ops._C_cuda.instances()}
    for dtype in ("float16", "bfloat16"):
        largest = max((d for d, t in built if t == dtype), default=0)
        for head_dim in (1, 8, 17, 40, 64, 100, 128, 200, 256):
            served = head_dim <= largest
            assert (why(head_dim, head_dim, dtype) == "") == served, (head_dim, dtype)
        if largest:
            assert why(24, largest, dtype) == ""  # Ev != E: the larger picks the bucket
    assert "float16 and bfloat16" in why(64, 64, "float32")
    assert "up to 256" in why(257, 64, "bfloat16") and "(257, 64)" in why(257, 64, "bfloat16")
    assert "up to 256" in why(64, 320, "float16")
    assert ">= 1" in why(0, 64, "float16")


@needs_cuda_ext
def test_sass_has_tensor_core_code_for_every_arch():
    """cuobjdump of the built extension: HMMA.16816 (fp32 accumulate), ldmatrix and cp.async in
    every attention kernel, for every arch of TORCH_CUDA_ARCH_LIST, and no register spills."""
    spec = importlib.util.spec_from_file_location("attnkern_check_sass", os.path.join(CUDA_DIR, "check_sass.py"))
    check_sass = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check_sass)
    tool = check_sass.find_cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or Triton's bundled copy)")
    report = check_sass.inspect(ops._C_cuda.__file__, tool)
    archs = [a for a in re.split(r"[;\s]+", ops._C_cuda.archs()) if a]
    wanted = {"sm_" + a.replace(".", "").replace("+PTX", "") for a in archs}
    assert wanted <= set(report), f"archs in the binary {sorted(report)}, build list {sorted(wanted)}"
    assert check_sass.check(report) == []
    hopper = [c for name, c in report.get("sm_90a", {}).items() if check_sass.is_sm90_kernel(name)]
    # forward, dK/dV and dQ, each with and without masks/dropout, per (bucket, dtype)
    assert len(hopper) == 6 * len(ops._C_cuda.sm90_instances())
    assert all(c["HGMMA"] > 0 and c["UTMALDG"] > 0 for c in hopper)


@needs_cuda_ext
@pytest.mark.parametrize("preset", ["gpu-dense", "gpu-window", "gpu-decode"])
def test_gpu_benchmark_cases_are_served(preset):
    """The CUDA row (the extension's own why_not included) accepts every case of the GPU
    benchmarks (attnkern bench --gpu-*), so none of them is skipped on a GPU."""
    from attnkern.bench.cases import PRESETS

    row = dataclasses.replace(dispatch.CAPABILITIES["cuda"], available=lambda: None)
    for case in PRESETS[preset]("cuda").cases:
        assert row.why_not(case.problem("cuda")) is None, case.label()


@needs_cuda_ext
def test_dispatch_row_consults_the_extension():
    cap = dispatch.CAPABILITIES["cuda"]
    problem = _semantics.Problem(
        batch=1, heads_q=2, heads_kv=1, len_q=4, len_k=4, head_dim=300, head_dim_v=300, scale=1.0, window_left=-1,
        window_right=-1, bottom_right=False, dropout_p=0.0, mask_kind=None, dtype=torch.bfloat16, device_type="cuda",
    )
    assert "up to 256" in cap.extra(problem)
    assert cap.extra(problem) == ops._C_cuda.why_not(300, 300, "bfloat16")
    assert cap.extra(dataclasses.replace(problem, head_dim=40, head_dim_v=72)) is None
    if not torch.cuda.is_available():
        assert "no CUDA device" in cap.why_not(problem)
        assert "cuda" not in dispatch.available_backends()


# ---------------------------------------------------------------------------------------------
# emulator


def emulate(emu, case: Case, dtype, seed, mask_grad=False, sm_count=4, late_copies=True, order=0, bottom_right=False,
            backward=True):
    """Forward and backward of `case` through the emulated kernels against the float64 reference
    (attnkern.reference on the same canonical tensors, gradients by autograd, the float mask's
    gradient per element). Returns the emulator's counters of the forward and of the backward
    (None with backward=False, which checks the forward only).
    """
    q, k, v, mask = make_inputs(case, dtype, requires_grad=False)
    qc, kc, vc, mc, problem, _ = _semantics.normalize_torch_layout(
        q, k, v, mask, case.dropout_p, case.causal, None, case.heads_q != case.heads_kv, case.window
    )
    sem = (problem.scale, problem.window_left, problem.window_right, bottom_right, problem.dropout_p)
    torch.manual_seed(seed)
    rng = dispatch.new_rng_seed() if case.dropout_p > 0 else None
    emu.set_options(late_copies, order, seed)
    out, lse = emu.fwd(qc, kc, vc, mc, rng, *sem, sm_count)
    fwd_stats = emu.stats()
    grad_out = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    grads, bwd_stats = (), None
    if backward:
        emu.set_options(late_copies, order, seed)
        grads = emu.bwd(grad_out, None, qc, kc, vc, out, lse, mc, rng, *sem, mask_grad)
        bwd_stats = emu.stats()

    inputs = [t.detach().double().requires_grad_(True) for t in (qc, kc, vc)]
    m64 = mc
    if mc is not None and mc.is_floating_point():
        m64 = mc.double().clone().requires_grad_(mask_grad)
        if mask_grad:
            inputs.append(m64)
    seed64 = None if rng is None else int(rng.item()) & 0xFFFFFFFFFFFFFFFF
    ref_out, ref_lse = reference.attention(*inputs[:3], m64, *sem, seed64)
    ref_grads = torch.autograd.grad(ref_out, inputs, grad_out.double()) if backward else ()

    # shapes, dtypes and strides as the fake kernels (torch.compile) promise them
    fake_out, fake_lse = ops._fake_fwd(qc, kc, vc, mc, rng, *sem)
    assert (out.shape, out.stride(), out.dtype) == (fake_out.shape, fake_out.stride(), fake_out.dtype)
    assert (lse.shape, lse.stride(), lse.dtype) == (fake_lse.shape, fake_lse.stride(), fake_lse.dtype)
    if backward:
        fakes = ops._fake_bwd(grad_out, None, qc, kc, vc, out, lse, mc, rng, *sem, mask_grad)
        for g, f in zip(grads, fakes):
            assert (g.shape, g.stride(), g.dtype) == (f.shape, f.stride(), f.dtype)
    assert_close(out, ref_out, dtype, "out")
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "rows without keys must have LSE -inf, the others finite"
    assert_close(lse.where(finite, 0), ref_lse.where(finite, 0), torch.float32, "lse")
    for name, g, r in zip(("dq", "dk", "dv", "dmask"), grads, ref_grads):
        assert g.dtype == (torch.float32 if name == "dmask" else dtype), name
        assert_close(g, r, dtype, name)
    return fwd_stats, bwd_stats


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_emulated_parity(emu, case, dtype, seed):
    emulate(emu, case, dtype, seed)


@pytest.mark.parametrize("head_dim", HEAD_DIMS + [24, 96, 200])
def test_emulated_head_dims(emu, head_dim, seed):
    dtype = torch.bfloat16 if head_dim % 2 else torch.float16
    emulate(emu, Case(head_dim=head_dim, len_q=45, len_k=70, causal=head_dim % 2 == 0), dtype, seed)


@pytest.mark.parametrize("head_dims", [(32, 96), (128, 40), (17, 256), (256, 8)])
def test_emulated_value_head_dim_differs(emu, head_dims, seed):
    emulate(emu, Case(head_dim=head_dims[0], head_dim_v=head_dims[1], len_q=37, len_k=81, heads_q=4, heads_kv=2),
            torch.bfloat16, seed)


@pytest.mark.parametrize("shape", ["float", "float-bcast"])
def test_emulated_float_mask_gradient(emu, shape, seed):
    emulate(emu, Case(mask=shape, len_q=50, len_k=60, causal=True), torch.float16, seed, mask_grad=True)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_emulated_dropout_matches_reference(emu, p, seed):
    """The Philox pattern of the kernels is the reference's, forward and backward."""
    emulate(emu, Case(dropout_p=p, heads_q=4, heads_kv=2, len_q=70, len_k=90, window=(20, 5)), torch.float16, seed)


@pytest.mark.parametrize("len_q", [1, 16])
@pytest.mark.parametrize("heads", [(8, 1), (4, 4)], ids=["gqa8", "mha"])
@pytest.mark.parametrize("sm_count", [0, 40])
def test_emulated_decode_split_kv(emu, len_q, heads, sm_count, seed):
    """L <= 16 takes the packed split-KV path (the backward is the general one, tested above).
    With 40 SMs the keys split over several CTAs and merge; sm_count 0 stands for a device too
    busy for splits to pay, one CTA per row tile."""
    case = Case(batch=2, heads_q=heads[0], heads_kv=heads[1], len_q=len_q, len_k=1200, head_dim=64,
                causal=len_q > 1, id="")
    splits = emu.decode_num_splits(len_q, heads[0], heads[1], case.len_k, 64, 2, sm_count)
    assert splits == 1 if sm_count == 0 else splits >= 4
    emulate(emu, case, torch.bfloat16, seed, sm_count=sm_count, bottom_right=True, backward=False)


@pytest.mark.parametrize("late_copies,order", [(False, 0), (True, 1), (False, 2), (True, 2)])
@pytest.mark.parametrize(
    "case",
    [Case(window=(40, 3), len_q=300, len_k=260, heads_q=4, heads_kv=2, batch=1, id="window-gqa"),
     Case(causal=True, len_q=130, len_k=200, head_dim=128, batch=1, id="causal-128"),
     Case(len_q=7, len_k=400, heads_q=8, heads_kv=2, head_dim=96, batch=1, id="decode-96")],
    ids=lambda c: c.id,
)
def test_emulated_pipeline_under_other_timings(emu, case, late_copies, order, seed):
    """cp.async copies landing at issue (catches a stage overwritten while read) or only at the
    wait (catches a stage read before it landed), threads scheduled in other orders."""
    emulate(emu, case, torch.float16, seed, late_copies=late_copies, order=order, sm_count=16)


@pytest.mark.parametrize("head_dim", BUCKETS)
def test_emulated_ldmatrix_free_of_bank_conflicts(emu, head_dim, seed):
    """The swizzled shared-memory layout serves every ldmatrix phase in one pass."""
    fwd, bwd = emulate(emu, Case(head_dim=head_dim, len_q=70, len_k=90, batch=1, heads_q=2, heads_kv=1),
                       torch.bfloat16, seed)
    assert fwd["ldmatrix"] > 0 and bwd["ldmatrix"] > 0
    assert fwd["ldmatrix_conflicts"] == 0 and bwd["ldmatrix_conflicts"] == 0


def test_emulated_window_cost_is_linear_in_length(emu, seed):
    """Only key blocks meeting the band are visited: with a window, the matrix instructions grow
    with L * W, not L * S."""
    counts = {}
    for length in (256, 512):
        for window in ((32, 0), None):
            case = Case(batch=1, heads_q=1, heads_kv=1, len_q=length, len_k=length, head_dim=32, window=window,
                        causal=window is None, id="")
            fwd, bwd = emulate(emu, case, torch.float16, seed)
            counts[length, window is not None] = fwd["mma"] + bwd["mma"]
    assert counts[512, True] <= 2.3 * counts[256, True], counts  # linear in L
    assert counts[512, False] >= 3.0 * counts[256, False], counts  # causal: quadratic
    assert counts[512, True] * 2 < counts[512, False], counts


def test_emulated_backward_is_deterministic(emu, seed):
    case = Case(heads_q=4, heads_kv=1, len_q=100, len_k=140, mask="float", window=(30, 30))
    q, k, v, mask = make_inputs(case, torch.bfloat16, requires_grad=False)
    args = (1.0 / 8, 30, 30, False, 0.0)
    out, lse = emu.fwd(q, k, v, mask, None, *args, 4)
    grad = torch.randn_like(out)
    first = emu.bwd(grad, None, q, k, v, out, lse, mask, None, *args, True)
    emu.set_options(True, 2, seed)  # another schedule must not change a bit
    second = emu.bwd(grad, None, q, k, v, out, lse, mask, None, *args, True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ---- the Hopper wgmma/TMA forward (fwd_sm90_kernel.cuh) on the emulator

@pytest.fixture
def wgmma(emu, monkeypatch):
    """The emulator posing as compute capability 9.0 with the wgmma forward switched on."""
    monkeypatch.setenv("ATTNKERN_CUDA_WGMMA", "1")
    emu.set_device_arch(90)
    yield emu
    emu.set_device_arch(80)


WGMMA_CASES = [
    Case(batch=2, heads_q=2, heads_kv=2, len_q=200, len_k=300, head_dim=64, id="d64"),
    Case(batch=1, heads_q=4, heads_kv=2, len_q=130, len_k=257, head_dim=128, id="d128-gqa"),
    Case(batch=1, heads_q=2, heads_kv=1, len_q=300, len_k=300, head_dim=64, causal=True, id="causal"),
    Case(batch=1, heads_q=2, heads_kv=2, len_q=90, len_k=333, head_dim=128, causal=True, id="causal-l<s"),
    Case(batch=1, heads_q=3, heads_kv=1, len_q=400, len_k=380, head_dim=64, window=(70, 9), id="window"),
    Case(batch=1, heads_q=2, heads_kv=2, len_q=150, len_k=150, head_dim=40, head_dim_v=100, id="padded-ev"),
    Case(batch=2, heads_q=2, heads_kv=1, len_q=129, len_k=131, head_dim=128, layout="transposed", id="blhd"),
    Case(batch=1, heads_q=1, heads_kv=1, len_q=17, len_k=5, head_dim=64, id="short"),
    Case(batch=1, heads_q=2, heads_kv=2, len_q=100, len_k=140, head_dim=96, causal=True, id="d96-in-128"),
    Case(batch=2, heads_q=4, heads_kv=2, len_q=150, len_k=170, head_dim=64, mask="bool", causal=True, id="bool-mask"),
    Case(batch=1, heads_q=2, heads_kv=1, len_q=140, len_k=200, head_dim=128, mask="float-bcast", window=(50, 10),
         id="float-mask"),
    Case(batch=1, heads_q=4, heads_kv=2, len_q=130, len_k=150, head_dim=64, dropout_p=0.3, id="dropout"),
]


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("case", WGMMA_CASES, ids=lambda c: c.id)
def test_emulated_wgmma_parity(wgmma, case, dtype, seed):
    """The Hopper forward and backward against the float64 reference; the counters show that
    both ran wgmma and no mma.sync."""
    bottom_right = case.id == "causal-l<s"
    fwd, bwd = emulate(wgmma, case, dtype, seed, bottom_right=bottom_right, mask_grad=case.mask == "float-bcast")
    assert fwd["wgmma"] > 0 and fwd["mma"] == 0, fwd
    assert bwd["wgmma"] > 0 and bwd["mma"] == 0, bwd


@pytest.mark.parametrize("late_copies,order", [(False, 0), (True, 1), (False, 2), (True, 2)])
def test_emulated_wgmma_under_other_timings(wgmma, late_copies, order, seed):
    """TMA copies landing at issue or only when a consumer waits, threads in other orders."""
    case = Case(batch=1, heads_q=2, heads_kv=1, len_q=260, len_k=300, head_dim=64, window=(100, 20), id="")
    fwd, bwd = emulate(wgmma, case, torch.float16, seed, late_copies=late_copies, order=order)
    assert fwd["wgmma"] > 0 and bwd["wgmma"] > 0


@pytest.mark.parametrize("what", ["decode", "head_dim_160", "switched_off", "sm80_device"])
def test_emulated_wgmma_leaves_the_rest_to_sm80(wgmma, monkeypatch, what, seed):
    """Decoding (forward) and head dims past 128 run the sm80 kernels, as does everything when
    the switch is off or the device is not compute capability 9.0."""
    case = {
        "decode": Case(len_q=4, len_k=300, heads_q=4, heads_kv=1, id=""),
        "head_dim_160": Case(head_dim=160, len_q=70, len_k=90, id=""),
    }.get(what, Case(len_q=70, len_k=90, id=""))
    if what == "switched_off":
        monkeypatch.setenv("ATTNKERN_CUDA_WGMMA", "0")
    if what == "sm80_device":
        wgmma.set_device_arch(80)
    fwd, _ = emulate(wgmma, case, torch.bfloat16, seed, backward=False)
    assert fwd["wgmma"] == 0 and fwd["mma"] > 0, fwd


def test_emulated_wgmma_window_cost_is_linear_in_length(wgmma, seed):
    """The producer loads, and the consumers multiply, only key blocks meeting the band: past
    the first row block, each further 256 rows add the same number of wgmma (a quadratic cost
    would add more each time)."""
    counts = []
    for length in (256, 512, 768):
        case = Case(batch=1, heads_q=1, heads_kv=1, len_q=length, len_k=length, head_dim=64, window=(100, 0), id="")
        fwd, _ = emulate(wgmma, case, torch.float16, seed, backward=False)
        counts.append(fwd["wgmma"])
    assert counts[2] - counts[1] == counts[1] - counts[0] > 0, counts


def test_emulated_rows_without_keys(emu, seed):
    # bottom-right causal with L > S: the first L - S rows see no key
    case = Case(batch=1, heads_q=2, heads_kv=2, len_q=70, len_k=20, id="")
    q, k, v, _ = make_inputs(case, torch.float16, requires_grad=False)
    out, lse = emu.fwd(q, k, v, None, None, 0.125, -1, 0, True, 0.0, 4)
    assert torch.equal(out[:, :, :50], torch.zeros_like(out[:, :, :50]))
    assert torch.isneginf(lse[:, :, :50]).all() and torch.isfinite(lse[:, :, 50:]).all()
    grads = emu.bwd(torch.randn_like(out), torch.randn_like(lse), q, k, v, out, lse, None, None, 0.125, -1, 0, True,
                    0.0, False)
    assert torch.equal(grads[0][:, :, :50], torch.zeros_like(grads[0][:, :, :50]))
    assert all(torch.isfinite(g).all() for g in grads[:3])


@pytest.mark.parametrize("len_q,len_k", [(0, 10), (10, 0), (0, 0)])
def test_emulated_empty_sequences(emu, len_q, len_k):
    q, k, v = torch.randn(2, 3, len_q, 16).half(), torch.randn(2, 3, len_k, 16).half(), torch.randn(2, 3, len_k, 24).half()
    out, lse = emu.fwd(q, k, v, None, None, 0.25, -1, -1, False, 0.0, 4)
    assert out.shape == (2, 3, len_q, 24) and torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()
    dq, dk, dv, _ = emu.bwd(torch.randn_like(out), None, q, k, v, out, lse, None, None, 0.25, -1, -1, False, 0.0, False)
    for g, t in zip((dq, dk, dv), (q, k, v)):
        assert g.shape == t.shape and torch.equal(g, torch.zeros_like(g))


def test_emulated_finfo_min_masks_are_finite_and_nan_propagates(emu, seed):
    import test_hardening

    test_hardening.check_lowest_mask_and_nan(
        lambda q, k, v, m, s: emu.fwd(q, k, v, m, None, s, -1, -1, False, 0.0, 4),
        lambda g, q, k, v, o, lse, m, s: emu.bwd(g, None, q, k, v, o, lse, m, None, s, -1, -1, False, 0.0, False)[:3],
        torch.float16)


@pytest.mark.parametrize("dtype,level", [(torch.float16, "finfo.min"), (torch.bfloat16, "-1e9")], ids=str)
def test_emulated_backward_of_huge_rows(emu, dtype, level, seed):
    import test_huge_lse

    test_huge_lse.check_huge_rows(
        lambda q, k, v, m, rng, *sem: emu.fwd(q, k, v, m, rng, *sem, 4), emu.bwd, dtype, level, window=(5, 3),
        dropout_p=0.25, grad_lse=True, mask_grad=True)


@pytest.mark.parametrize("sm_count", [0, 4])
def test_emulated_decode_merge_of_huge_tied_scores(emu, sm_count, seed):
    """Split-KV decoding merges its key slices and splits by their (max, sum), not an fp32 LSE each,
    which next to a huge max has lost log(sum): 1000 identical keys score 3.2e9 each (exactly, in
    any order of summation), split unevenly (sm_count 0: over the CTA's warps only; 4: over CTAs
    too), so the output must be the plain mean of v."""
    q = torch.full((1, 4, 1, 32), 1e4).half()
    k = torch.full((1, 2, 1000, 32), 1e4).half()
    v = torch.randn(1, 2, 1000, 32).half()
    assert emu.decode_num_splits(1, 4, 2, 1000, 32, 1, sm_count) == (1 if sm_count == 0 else 4)
    out, lse = emu.fwd(q, k, v, None, None, 1.0, -1, -1, False, 0.0, sm_count)
    assert_close(out, v.double().mean(dim=2, keepdim=True).repeat_interleave(2, dim=1), torch.float16, "out")
    g = torch.randn_like(out)
    grads = emu.bwd(g, None, q, k, v, out, lse, None, None, 1.0, -1, -1, False, 0.0, False)[:3]
    inputs = [t.double().requires_grad_(True) for t in (q, k, v)]
    want_out, _ = reference.attention(*inputs, None, 1.0)  # float64 ties the scores exactly too
    want_grads = torch.autograd.grad(want_out, inputs, g.double())
    # dq = k * sum_j dS_j is 0 for tied keys: what remains is the fp16 rounding of dS summed over
    # 1000 keys, times 1e4 (a P off by the lost log(sum) makes it ~1e7)
    assert grads[0].abs().max() <= 10, grads[0].abs().max()
    for name, got, want in zip(("dk", "dv"), grads[1:], want_grads[1:]):
        assert_close(got, want, torch.float16, name)


def test_emulated_kernel_errors_name_arguments(emu):
    q = torch.randn(1, 2, 8, 64)
    with pytest.raises(ValueError, match="float16 and bfloat16, not float32"):
        emu.fwd(q, q, q, None, None, 1.0, -1, -1, False, 0.0, 4)
    q = torch.randn(1, 2, 8, 300).half()
    with pytest.raises(ValueError, match="up to 256"):
        emu.fwd(q, q, q, None, None, 1.0, -1, -1, False, 0.0, 4)
    q = torch.randn(1, 2, 8, 64).half()
    with pytest.raises(ValueError, match="key head dim 32"):
        emu.fwd(q, q[..., :32], q, None, None, 1.0, -1, -1, False, 0.0, 4)


# ---------------------------------------------------------------------------------------------
# gpu: the real kernels


def require_served(case: Case, dtype):
    """Skip head dims a trimmed build (ATTNKERN_CUDA_HDIMS / _DTYPES) left out."""
    reason = ops._C_cuda.why_not(case.head_dim, case.head_dim_v, str(dtype).replace("torch.", ""))
    if reason:
        pytest.skip(reason)


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_gpu_parity(case, dtype, seed):
    require_served(case, dtype)
    run_case(case, dtype, "cuda", seed, device="cuda")


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_gpu_head_dims(head_dim, dtype, seed):
    case = Case(head_dim=head_dim, len_q=45, len_k=70, causal=head_dim % 2 == 0, id="")
    require_served(case, dtype)
    run_case(case, dtype, "cuda", seed, device="cuda")


@gpu
@needs_gpu
@pytest.mark.parametrize("shape", ["float", "float-bcast"])
def test_gpu_float_mask_gradient(shape, seed):
    run_case(Case(mask=shape, len_q=50, len_k=60, causal=True, id=""), torch.bfloat16, "cuda", seed, device="cuda",
             mask_grad=True)


@gpu
@needs_gpu
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_gpu_dropout_matches_reference(p, seed):
    run_case(Case(dropout_p=p, heads_q=4, heads_kv=2, len_q=70, len_k=90, id=""), torch.float16, "cuda", seed,
             device="cuda")


@gpu
@needs_gpu
@pytest.mark.parametrize(
    "case",
    [Case(batch=4, heads_q=16, heads_kv=2, len_q=1, len_k=8191, head_dim=128, id="decode-L1-gqa8"),
     Case(batch=2, heads_q=8, heads_kv=8, len_q=16, len_k=3000, head_dim=64, causal=True, id="decode-L16"),
     Case(batch=1, heads_q=4, heads_kv=1, len_q=2048, len_k=2048, head_dim=128, window=(255, 0), id="window-2k"),
     Case(batch=1, heads_q=2, heads_kv=2, len_q=1000, len_k=1500, head_dim=256, causal=True, id="hdim256")],
    ids=lambda c: c.id,
)
def test_gpu_larger_shapes(case, seed):
    require_served(case, torch.bfloat16)
    run_case(case, torch.bfloat16, "cuda", seed, device="cuda")


def _sm90_ready():
    return (torch.cuda.is_available() and ops._C_cuda is not None and torch.cuda.get_device_capability() == (9, 0)
            and bool(ops._C_cuda.sm90_instances()))


needs_sm90 = pytest.mark.skipif(not _sm90_ready(), reason="needs an sm_90 device and a build with 9.0a")


def _kernel_names(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events()}


@gpu
@needs_gpu
@needs_sm90
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("case", WGMMA_CASES + [
    Case(batch=2, heads_q=16, heads_kv=2, len_q=2048, len_k=2048, head_dim=128, causal=True, id="2k-causal"),
    Case(batch=1, heads_q=8, heads_kv=8, len_q=4096, len_k=4096, head_dim=64, window=(1023, 0), id="4k-window"),
], ids=lambda c: c.id)
def test_gpu_wgmma_parity(monkeypatch, case, dtype, seed):
    """The Hopper kernels (ATTNKERN_CUDA_WGMMA=1) on the device against the float64 reference,
    forward and backward, and the profiler shows that they, not the sm80 kernels, ran."""
    monkeypatch.setenv("ATTNKERN_CUDA_WGMMA", "1")
    require_served(case, dtype)
    names = _kernel_names(lambda: run_case(case, dtype, "cuda", seed, device="cuda"))
    for kernel in ("fwd_sm90_kernel", "bwd_kv_sm90_kernel", "bwd_q_sm90_kernel"):
        assert any(kernel in n for n in names), (kernel, sorted(names))
    assert not any("fwd_kernel" in n.split("<")[0] or "bwd_q_kernel" in n for n in names), sorted(names)


@gpu
@needs_gpu
def test_gpu_backward_is_deterministic(seed):
    q, k, v = (torch.randn(2, 8, 700, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out = attnkern.scaled_dot_product_attention(q, k, v, is_causal=True, backend="cuda")
    grad = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v), grad)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@gpu
@needs_gpu
@pytest.mark.parametrize("mask", [None, "float"])
def test_gpu_opcheck(mask):
    """torch.library.opcheck: schema, fake tensors (shapes and strides), autograd registration."""
    q = torch.randn(1, 4, 40, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 2, 50, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, 2, 50, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    m = None if mask is None else torch.randn(1, 4, 40, 50, device="cuda", dtype=torch.float32, requires_grad=True)
    torch.library.opcheck(torch.ops.attnkern.fwd.default, (q, k, v, m, None, 0.125, 8, 0, True, 0.0))
    qf = q.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)  # flash memory order
    torch.library.opcheck(torch.ops.attnkern.fwd.default, (qf, k, v, None, None, 0.125, -1, -1, False, 0.0))


@gpu
@needs_gpu
def test_gpu_auto_picks_a_gpu_kernel_and_falls_back():
    q = torch.randn(1, 2, 64, 64, device="cuda", dtype=torch.float16)
    problem = _semantics.normalize_torch_layout(q, q, q, None, 0.0, False, None, False, None)[4]
    assert dispatch.choose(problem, "auto") in ("triton", "cuda")
    q32 = q.float()
    problem32 = _semantics.normalize_torch_layout(q32, q32, q32, None, 0.0, False, None, False, None)[4]
    assert dispatch.choose(problem32, "auto") != "cuda"


@gpu
@needs_gpu
def test_gpu_op_errors_name_arguments():
    q = torch.randn(1, 2, 8, 300, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="up to 256"):
        torch.ops.attnkern.fwd(q, q, q, None, None, 1.0, -1, -1, False, 0.0)
    q = torch.randn(1, 2, 8, 64, device="cuda")
    with pytest.raises(ValueError, match="float16 and bfloat16"):
        torch.ops.attnkern.fwd(q, q, q, None, None, 1.0, -1, -1, False, 0.0)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
