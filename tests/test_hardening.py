"""Regressions of issue 11 (hostile inputs and peers' test suites): each test failed before its fix.

Crashes run in a child process. Results are held to the float64 reference (attnkern.reference)
on fresh random inputs; CPU backends only (Triton's part of items 4 and 6 is in
test_triton_interp.py, CUDA's in test_cuda.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import attnkern
from attnkern import reference
from attnkern.integrations import patch as patch_mod
from conftest import TOLERANCE, assert_close

sdpa = attnkern.scaled_dot_product_attention
BACKENDS = ["cpu", "math"]
F32 = TOLERANCE[torch.float32]


def ref(q, k, v, mask=None, scale=None, left=-1, right=-1, bottom_right=False):
    """float64 reference on canonical 4-D tensors (k/v heads repeated by the reference for GQA)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    m = None if mask is None else (mask if mask.dtype == torch.bool else mask.double())
    return reference.attention(q.double(), k.double(), v.double(), m, scale, left, right, bottom_right)


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


# ---------------------------------------------------------------------------------------
# 1. zero sizes: SIGFPE in the CPU kernels (heads_q / heads_kv), checked in a child process

ZERO_SIZE_SCRIPT = textwrap.dedent(
    """
    import torch, attnkern
    sdpa = attnkern.scaled_dot_product_attention
    shapes = [((2, 0, 10, 64),) * 3, ((0, 10, 64),) * 3, ((0, 3, 5, 8),) * 3,
              ((2, 3, 0, 8), (2, 3, 5, 8), (2, 3, 5, 8)), ((2, 3, 4, 8), (2, 3, 0, 8), (2, 3, 0, 8)),
              ((2, 3, 4, 8), (2, 3, 5, 8), (2, 3, 5, 0))]
    for backend in ("cpu", "math"):
        for sq, sk, sv in shapes:
            q, k, v = (torch.randn(s, requires_grad=True) for s in (sq, sk, sv))
            out = sdpa(q, k, v, backend=backend)
            # (not torch's SDPA for the expected shape: torch 2.11's dies of SIGFPE on 0 heads)
            want = torch.zeros(sq[:-1] + sv[-1:])
            assert out.shape == want.shape and torch.equal(out, want), (sq, sk)
            out.sum().backward()
            for t in (q, k, v):
                assert t.grad is not None and t.grad.shape == t.shape and not t.grad.isnan().any()
    # the op itself, with no heads at all
    z = torch.randn(2, 0, 10, 64)
    out, lse = torch.ops.attnkern.fwd(z, z, z, None, None, 0.125, -1, -1, False, 0.0)
    assert out.shape == (2, 0, 10, 64) and lse.shape == (2, 0, 10)
    print("ok")
    """
)


def test_zero_sizes_do_not_crash():
    proc = subprocess.run([sys.executable, "-c", ZERO_SIZE_SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, f"rc {proc.returncode}: {proc.stderr[-2000:]}"


# ---------------------------------------------------------------------------------------
# 1b. a process's first attention call: checking the arguments once imported torch._dynamo (to
# recognise CausalBias) and sympy (torch.broadcast_shapes), 0.35-1.8 s before the first call ran

FIRST_CALL_SCRIPT = textwrap.dedent(
    """
    import sys, torch, attnkern
    heavy = ("torch._dynamo", "sympy", "torch.fx.experimental.symbolic_shapes")
    before = [m for m in heavy if m in sys.modules]
    q = torch.randn(2, 4, 9, 16, requires_grad=True)
    k, v = (torch.randn(2, 2, 12, 16, requires_grad=True) for _ in range(2))
    masks = (None, torch.rand(9, 12) > 0.3, torch.randn(2, 1, 9, 12))
    for backend in ("auto", "cpu", "math"):
        for mask in masks:
            out = attnkern.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, backend=backend)
            out.sum().backward()
        out = attnkern.scaled_dot_product_attention(q, k, v, is_causal=True, window_size=(3, 0), enable_gqa=True,
                                                    softcap=5.0, backend=backend)
        out.sum().backward()
        out = attnkern.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                                       backend=backend)
        out.sum().backward()
    print("imported:", [m for m in heavy if m in sys.modules and m not in before])
    """
)


def test_first_call_does_not_import_the_compiler_stack():
    proc = subprocess.run([sys.executable, "-c", FIRST_CALL_SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"rc {proc.returncode}: {proc.stderr[-2000:]}"
    assert proc.stdout.strip().endswith("imported: []"), proc.stdout[-2000:]


# ---------------------------------------------------------------------------------------
# 2. torch's CausalBias, directly and under patch()


@pytest.mark.parametrize("lower_right", [False, True])
def test_causal_bias(lower_right, seed):
    q, k, v = rand(2, 3, 6, 16), rand(2, 3, 9, 16), rand(2, 3, 9, 16)
    bias = (causal_lower_right if lower_right else causal_upper_left)(6, 9)
    want, _ = ref(q, k, v, right=0, bottom_right=lower_right)
    for backend in BACKENDS:
        assert_close(sdpa(q, k, v, bias, backend=backend), want, torch.float32, f"{backend} direct")
    with attnkern.patch():
        assert_close(F.scaled_dot_product_attention(q, k, v, bias), want, torch.float32, "patched F.sdpa")
    with attnkern.patch(backend="cpu"):
        # float64: no fused backend serves it, so the call goes to torch's own CausalBias path
        before = patch_mod.stats.fell_back.total()
        out = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), bias)
        assert patch_mod.stats.fell_back.total() == before + 1
        assert_close(out, want, torch.float32, "patched, served by torch")


def test_other_tensor_subclass_masks_are_rejected():
    class Odd(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            return super().__torch_function__(func, types, args, kwargs or {})

    q = rand(1, 2, 4, 8)
    mask = torch.zeros(4, 4).as_subclass(Odd)
    with pytest.raises(TypeError, match="attn_mask of type Odd"):
        sdpa(q, q, q, mask)


# ---------------------------------------------------------------------------------------
# 3. windows beyond the sequences (int64 max and beyond) mean unbounded


@pytest.mark.parametrize("window", [(2**63 - 1, 2**63 - 1), (2**63 - 1, 0), (2**63, 2**63), (3, 2**70)])
def test_extreme_windows(window, seed):
    q, k, v = rand(1, 2, 7, 8), rand(1, 2, 11, 8), rand(1, 2, 11, 8)
    left, right = (-1 if w > 100 else w for w in window)
    want, _ = ref(q, k, v, left=left, right=right)
    for backend in BACKENDS:
        assert_close(sdpa(q, k, v, window_size=window, backend=backend), want, torch.float32, backend)
    # the op's own check clamps too (the public API already did above)
    out, _ = torch.ops.attnkern.fwd(q, k, v, None, None, 8**-0.5, 2**63 - 1, 2**63 - 1, True, 0.0)
    assert_close(out, ref(q, k, v, bottom_right=True)[0], torch.float32, "op")


EXTREME_SIDES = [2**62, 2**63 - 1]


@pytest.mark.parametrize("side", EXTREME_SIDES)
def test_extreme_windows_at_every_raw_op(side, seed):
    """Every op taking a window, called directly, reads a side past the sequences as unbounded
    (the public API's clamp is not on this path): varlen (dense and paged), top-k, the work plan."""
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    q, k, v = rand(12, 2, 8), rand(12, 2, 8), rand(12, 2, 8)
    want, lse = torch.ops.attnkern.varlen_fwd(q, k, v, cu, cu, None, None, 0.35, 3, -1)
    got, got_lse = torch.ops.attnkern.varlen_fwd(q, k, v, cu, cu, None, None, 0.35, 3, side)
    assert torch.equal(got, want) and torch.equal(got_lse, lse), "varlen_fwd"
    g = rand(12, 2, 8)
    grads = [torch.ops.attnkern.varlen_bwd(g, None, q, k, v, want, lse, cu, cu, None, 0.35, 3, w) for w in (-1, side)]
    for a, b in zip(*grads):
        assert torch.equal(a, b), "varlen_bwd"
    q4, k4, v4 = rand(1, 2, 7, 8), rand(1, 2, 11, 8), rand(1, 2, 11, 8)
    want4 = torch.ops.attnkern.topk_fwd(q4, k4, v4, None, 3, 0.35, -1, -1, True)
    got4 = torch.ops.attnkern.topk_fwd(q4, k4, v4, None, 3, 0.35, side, side, True)
    assert all(torch.equal(a, b) for a, b in zip(got4, want4)), "topk_fwd"
    plan = attnkern._C.cpu_work_plan(1, 2, 2, 7, 11, 8, side, side, 2)
    assert plan == attnkern._C.cpu_work_plan(1, 2, 2, 7, 11, 8, -1, -1, 2), "cpu_work_plan"
    with pytest.raises(ValueError, match="window_left/window_right must be >= -1"):
        attnkern._C.cpu_work_plan(1, 2, 2, 7, 11, 8, -2, 0, 2)


# ---------------------------------------------------------------------------------------
# 4. finite masks at finfo.min are finite (torch's and HF's padding value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_finfo_min_mask_is_finite(dtype, seed):
    q, k, v = rand(2, 2, 8, 16, dtype=dtype), rand(2, 2, 12, 16, dtype=dtype), rand(2, 2, 12, 16, dtype=dtype)
    mask = torch.zeros(2, 2, 8, 12)
    lowest = torch.finfo(torch.float32).min
    mask[:, :, 3, :] = lowest  # a padding row: every key at finfo.min, torch returns the mean of v
    mask[:, :, 5, 4:] = lowest  # a partly padded row
    mask[:, :, 6, ::2] = -2.5e38
    want, _ = ref(q, k, v, mask)
    assert torch.allclose(want[:, :, 3], v.double().mean(dim=2))
    for backend in BACKENDS:
        out = sdpa(q, k, v, mask.to(dtype) if dtype == torch.float32 else mask, backend=backend)
        assert_close(out, want, dtype, backend)


# ---------------------------------------------------------------------------------------
# 5. meta tensors reaching the ops


def test_meta_arguments_are_rejected():
    q, k, v = rand(1, 2, 4, 8), rand(1, 2, 4, 8), rand(1, 2, 4, 8)
    meta_mask = torch.zeros(1, 2, 4, 4, device="meta")
    with pytest.raises(ValueError, match="attn_mask must be on the query's device"):
        torch.ops.attnkern.fwd(q, k, v, meta_mask, None, 0.5, -1, -1, False, 0.0)
    out, lse = torch.ops.attnkern.fwd(q, k, v, None, None, 0.5, -1, -1, False, 0.0)
    with pytest.raises(ValueError, match="out must be on the query's device"):
        torch.ops.attnkern.bwd(torch.ones_like(out), None, q, k, v, out.to("meta"), lse, None, None, 0.5, -1, -1,
                               False, 0.0, False)
    with pytest.raises(ValueError, match="grad_lse must be on the query's device"):
        torch.ops.attnkern.bwd(torch.ones_like(out), lse.to("meta"), q, k, v, out, lse, None, None, 0.5, -1, -1,
                               False, 0.0, False)


# ---------------------------------------------------------------------------------------
# 6. NaN propagates the same way on every path: the NaN row (and every dv row) is NaN


@pytest.mark.parametrize("len_k", [40, 5000])  # 5000 with one query: the CPU's split-KV path
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_query_row(len_k, backend, seed):
    len_q = 1 if len_k > 1000 else 6
    q, k, v = rand(1, 2, len_q, 16), rand(1, 2, len_k, 16), rand(1, 2, len_k, 16)
    q[0, 0, len_q - 1, 3] = float("nan")
    q.requires_grad_()
    v.requires_grad_()
    out, lse = attnkern.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), return_lse=True,
                                        backend=backend)
    out = out.transpose(1, 2)
    assert out[0, 0, len_q - 1].isnan().all() and lse[0, 0, len_q - 1].isnan()
    assert_close(out[0, 1], ref(q, k, v)[0][0, 1], torch.float32, "the other head")
    out.sum().backward()
    assert v.grad[0, 0].isnan().all(), "dv of the NaN row's head must be NaN (as torch's)"
    assert torch.isfinite(v.grad[0, 1]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_float_mask(backend, seed):
    q, k, v = rand(1, 2, 5, 8), rand(1, 2, 7, 8), rand(1, 2, 7, 8)
    mask = torch.randn(1, 2, 5, 7)
    mask[0, 1, 2, 4] = float("nan")
    out = sdpa(q, k, v, mask, backend=backend)
    assert out[0, 1, 2].isnan().all()
    finite = torch.ones(1, 2, 5, dtype=torch.bool)
    finite[0, 1, 2] = False
    assert_close(out[finite], ref(q, k, v, mask.nan_to_num())[0][finite], torch.float32, backend)


# ---------------------------------------------------------------------------------------
# 7. double backward: a clear error from the fused backends (math differentiates twice)


def test_double_backward(seed):
    q = rand(1, 2, 5, 8, dtype=torch.float64).requires_grad_()
    k, v = rand(1, 2, 5, 8, dtype=torch.float64), rand(1, 2, 5, 8, dtype=torch.float64)
    (g,) = torch.autograd.grad(sdpa(q.float(), k.float(), v.float(), backend="cpu").sum(), q, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        g.square().sum().backward()
    assert torch.autograd.gradgradcheck(lambda x: sdpa(x, k, v, backend="math"), (q,))


# ---------------------------------------------------------------------------------------
# 8. forward-mode AD and torch.func


def test_forward_mode_ad(seed):
    q, k, v = (rand(1, 2, 5, 8, dtype=torch.float64) for _ in range(3))
    tangent = torch.randn_like(q)
    _, want = torch.func.jvp(lambda x: ref(x, k, v)[0], (q,), (tangent,))
    with fwAD.dual_level():
        dual = fwAD.make_dual(q.float(), tangent.float())
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            sdpa(dual, k.float(), v.float(), backend="cpu")
        got = fwAD.unpack_dual(sdpa(dual, k.float(), v.float())).tangent  # auto: served by math
    assert_close(got, want, torch.float32, "auto jvp")
    with pytest.raises(NotImplementedError, match="torch.func"):
        torch.func.jvp(lambda x: sdpa(x, k.float(), v.float(), backend="cpu"), (q.float(),), (tangent.float(),))


def test_torch_func_grad_and_vmap(seed):
    q, k, v = (rand(3, 2, 5, 8) for _ in range(3))
    want_grad = torch.func.grad(lambda x: ref(x, k, v)[0].sum())(q.double())
    assert_close(torch.func.grad(lambda x: sdpa(x, k, v).sum())(q), want_grad, torch.float32, "grad")
    assert_close(torch.func.vmap(lambda a, b, c: sdpa(a, b, c))(q, k, v), ref(q, k, v)[0], torch.float32, "vmap")
    with pytest.raises(NotImplementedError, match="torch.func"):
        torch.func.vmap(lambda a, b, c: sdpa(a, b, c, backend="cpu"))(q, k, v)


# ---------------------------------------------------------------------------------------
# 9. patch() state: any exit order, any exiting thread, a user's mode left open


def _clean():
    return (not patch_mod.is_patched() and F.scaled_dot_product_attention is not patch_mod.scaled_dot_product_attention
            and patch_mod._state().mode is None and torch._C._len_torch_function_stack() == 0)


def test_patch_scope_closed_from_another_thread():
    def gen():
        with attnkern.patch(window_size=(0, 0)):
            yield

    g = gen()
    next(g)
    assert patch_mod.is_patched()
    errors = []
    t = threading.Thread(target=lambda: errors.append(None) if g.close() is None else None)
    t.start()
    t.join()
    assert errors == [None]
    assert not patch_mod.is_patched()
    q, k, v = rand(1, 2, 6, 8), rand(1, 2, 6, 8), rand(1, 2, 6, 8)
    assert_close(F.scaled_dot_product_attention(q, k, v), ref(q, k, v)[0], torch.float32, "no window left behind")
    assert F.scaled_dot_product_attention is not patch_mod.scaled_dot_product_attention
    with attnkern.patch():  # the thread's next scope takes the inert mode off its stack
        pass
    assert _clean()


def test_patch_exits_in_any_order_and_with_user_modes_open():
    outer, inner = attnkern.patch(window_size=(1, 0)), attnkern.patch(window_size=(0, 0))
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)  # out of order: the inner scope stays in force
    q, k, v = rand(1, 1, 5, 4), rand(1, 1, 5, 4), rand(1, 1, 5, 4)
    assert_close(F.scaled_dot_product_attention(q, k, v), v, torch.float32, "inner window (0, 0)")
    inner.__exit__(None, None, None)
    assert _clean()

    class UserMode(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    scope = attnkern.patch()
    scope.__enter__()
    user = UserMode()
    user.__enter__()
    scope.__exit__(None, None, None)  # the user's mode is still open
    assert torch._C._len_torch_function_stack() == 1
    user.__exit__(None, None, None)
    assert _clean()

    with pytest.raises(ZeroDivisionError):
        with attnkern.patch():
            1 / 0
    assert _clean()


# ---------------------------------------------------------------------------------------
# drop-in gaps


def test_flash_attn_window_tensors_and_deterministic(seed):
    q, k, v = rand(2, 7, 2, 8), rand(2, 9, 2, 8), rand(2, 9, 2, 8)
    want, _ = ref(*(t.transpose(1, 2) for t in (q, k, v)), left=2, right=1, bottom_right=True)
    for window in (torch.tensor([2, 1]), (torch.tensor(2), torch.tensor(1))):
        out = attnkern.flash_attn_func(q, k, v, window_size=window, deterministic=True)
        assert_close(out.transpose(1, 2), want, torch.float32, str(window))
    with pytest.raises(TypeError, match="deterministic"):
        attnkern.flash_attn_func(q, k, v, deterministic=1)


@pytest.mark.parametrize(
    "q_shape,kv_shape",
    [
        ((4, 6, 8), (2, 4, 7, 8)),  # different ranks
        ((2, 4, 6, 8), (2, 1, 7, 8)),  # one kv head, no enable_gqa
        ((2, 4, 6, 8), (1, 4, 7, 8)),  # kv batch 1
        ((6, 8), (7, 8)),  # 2-D
        ((2, 1, 6, 8), (2, 3, 7, 8)),  # one query head against three
    ],
)
def test_sdpa_broadcasting(q_shape, kv_shape, seed):
    q, k, v = rand(*q_shape), rand(*kv_shape), rand(*kv_shape)
    shape = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    q4, k4, v4 = (t.expand(shape + t.shape[-2:]).reshape((-1,) + t.shape[-2:]).unsqueeze(0) for t in (q, k, v))
    want = ref(q4, k4, v4)[0].reshape(shape + (q.shape[-2], v.shape[-1]))
    for backend in BACKENDS:
        assert_close(sdpa(q, k, v, backend=backend), want, torch.float32, backend)


def test_head_dim_zero_and_dropout_one(seed):
    q, k, v = rand(2, 3, 5, 0), rand(2, 3, 7, 0), rand(2, 3, 7, 4)
    for backend in BACKENDS:
        assert_close(sdpa(q, k, v, backend=backend), v.mean(dim=2, keepdim=True).expand(2, 3, 5, 4), torch.float32,
                     f"{backend} head dim 0")
    q, k, v = (rand(2, 3, 5, 8).requires_grad_() for _ in range(3))
    for backend in BACKENDS:
        out = sdpa(q, k, v, dropout_p=1.0, backend=backend)
        assert out.shape == (2, 3, 5, 8) and torch.equal(out, torch.zeros_like(out))
        out.sum().backward()
        assert torch.equal(v.grad, torch.zeros_like(v))
        v.grad = None


# ---------------------------------------------------------------------------------------
# 10. dropout under torch.compile draws the masks eager draws for the same manual_seed


def test_compiled_dropout_matches_eager(seed):
    q, k, v = rand(1, 2, 16, 8), rand(1, 2, 16, 8), rand(1, 2, 16, 8)

    def two_layers(q, k, v):  # two calls on equal inputs: no graph pass may merge their seeds
        a = sdpa(q, k, v, dropout_p=0.5, backend="cpu")
        return a, sdpa(q, k, v, dropout_p=0.5, backend="cpu")

    torch.manual_seed(seed)
    eager = two_layers(q, k, v)
    assert not torch.equal(eager[0], eager[1])
    compiled = torch.compile(two_layers, backend="inductor", fullgraph=True)
    torch.manual_seed(seed)
    got = compiled(q, k, v)
    assert torch.equal(got[0], eager[0]) and torch.equal(got[1], eager[1])


# ---------------------------------------------------------------------------------------
# 12 and 13: the CLI refuses bad arguments and paths up front, writes as it goes, and ends
# with one line and a non-zero status

from attnkern.__main__ import main as attnkern_main  # noqa: E402
from attnkern.bench import cli, memory as bench_memory, sweep  # noqa: E402

TINY = ["--backends", "sdpa-math", "--seqlens", "16,32", "--head-dims", "8", "--budget", "0.01", "--min-reps", "2",
        "--warmup", "0.01", "--modes", "fwd", "--no-progress"]


@pytest.mark.parametrize("args", [["--max-memory", "nan"], ["--max-memory", "inf"], ["--budget", "nan"],
                                  ["--warmup", "nan"], ["--windows", "100000000000000000000,0"]])
def test_cli_rejects_non_finite_and_huge_values(args, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench"] + args)
    assert exc.value.code == 2 and args[0] in capsys.readouterr().err


def test_cli_negative_window_is_a_value(capsys):
    assert cli.main(["bench", "--dry-run", "--windows", "-1,0", "4,-1"] + TINY) == 0
    out = capsys.readouterr().out
    assert "w(-1,0)" in out.replace(" ", "") or "-1,0" in out


def test_cli_refuses_output_paths_before_measuring(tmp_path, monkeypatch):
    target = tmp_path / "real.json"
    target.write_text("keep")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    measured = []
    monkeypatch.setattr(sweep, "run_case", lambda *a, **k: measured.append(1) or [])
    for flag, path, why in [("--json", link, "not a regular file"), ("--json", tmp_path, "not a regular file"),
                            ("--json", tmp_path / "missing" / "x.json", "does not exist"),
                            ("--csv", "/dev/null", "not a regular file"), ("--plot", target, "not a directory")]:
        with pytest.raises(SystemExit, match=why):
            cli.main(["bench", flag, str(path)] + TINY)
    assert not measured and link.is_symlink() and target.read_text() == "keep"
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")


def test_cli_write_failure_interrupt_and_oom_rows(tmp_path, monkeypatch, capsys):
    from attnkern.bench import report

    calls = []

    def full_disk(path, rows):
        calls.append(len(rows))
        raise OSError(28, "No space left on device", path)

    monkeypatch.setattr(report, "write_csv", full_disk)
    assert cli.main(["bench", "--csv", str(tmp_path / "r.csv")] + TINY) == 1
    err = capsys.readouterr().err
    assert calls == [1] and "No space left on device" in err and "Traceback" not in err  # failed at the first case
    monkeypatch.undo()

    real = sweep.make_input_sets

    def oom_on_short(case, *args):
        if case.len_q == 16:
            raise RuntimeError("DefaultCPUAllocator: not enough memory")
        return real(case, *args)

    monkeypatch.setattr(sweep, "make_input_sets", oom_on_short)
    out = tmp_path / "oom.json"
    assert cli.main(["bench", "--json", str(out)] + TINY) == 0
    rows = __import__("json").loads(out.read_text())["results"]
    assert [r["status"] for r in rows] == ["error", "ok"] and "not enough memory" in rows[0]["reason"]
    monkeypatch.undo()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    seen = []
    real_case = bench_memory.measure_case

    def second_interrupts(case, *args, **kwargs):
        if seen:
            interrupted()
        seen.append(case)
        return real_case(case, *args, **kwargs)

    monkeypatch.setattr(bench_memory, "measure_case", second_interrupts)
    out = tmp_path / "memory.json"
    argv = ["memory", "--json", str(out), "--backends", "sdpa-math", "--seqlens", "16,32", "--head-dims", "8",
            "--no-progress"]
    with pytest.raises(KeyboardInterrupt):  # a caller in the same process (pytest) sees the interrupt
        cli.main(argv)
    assert len(__import__("json").loads(out.read_text())["results"]) == 1
    seen.clear()
    assert attnkern_main(argv) == 130  # the command: a status and one line
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err
    assert len(__import__("json").loads(out.read_text())["results"]) == 1  # the finished case was written


# ---------------------------------------------------------------------------------------
# items 4 and 6 for the op-level backends (Triton under the interpreter, CUDA under the emulator)


def check_lowest_mask_and_nan(fwd, bwd, dtype):
    """fwd(q, k, v, mask, scale) -> (out, lse); bwd(grad_out, q, k, v, out, lse, mask, scale) -> (dq, dk, dv)."""
    q, k, v = rand(1, 2, 6, 32, dtype=dtype), rand(1, 2, 40, 32, dtype=dtype), rand(1, 2, 40, 32, dtype=dtype)
    scale = 32**-0.5
    lowest = torch.finfo(torch.float32).min
    mask = torch.randn(1, 2, 6, 40)
    mask[:, :, 2, :] = lowest  # every key at finfo.min: the mean of v, as torch
    mask[:, :, 4, 5:] = lowest
    out, _ = fwd(q, k, v, mask, scale)
    assert_close(out, ref(q, k, v, mask, scale)[0], dtype, "finfo.min mask")

    q[0, 0, 3, 1] = float("nan")
    mask = torch.randn(1, 2, 6, 40)
    mask[0, 1, 1, 7] = float("nan")
    out, lse = fwd(q, k, v, mask, scale)
    nan_rows = torch.zeros(1, 2, 6, dtype=torch.bool)
    nan_rows[0, 0, 3] = nan_rows[0, 1, 1] = True
    assert out[nan_rows].isnan().all() and lse[nan_rows].isnan().all()
    want, want_lse = ref(q.nan_to_num(), k, v, mask.nan_to_num(), scale)
    assert_close(out[~nan_rows], want[~nan_rows], dtype, "rows without NaN")
    assert_close(lse[~nan_rows], want_lse[~nan_rows], torch.float32 if dtype == torch.float32 else dtype, "lse")
    _, _, dv = bwd(torch.randn_like(out), q, k, v, out, lse, mask, scale)
    assert dv.isnan().all(), "every dv row takes a share of the NaN rows"
