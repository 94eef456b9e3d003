"""Backend selection: the capability table and ``backend="auto"``.

Each backend states here what it can serve. ``auto`` walks the backends in speed order
and takes the first whose row accepts the problem; ``math`` accepts everything, so
``auto`` never fails where ``math`` would succeed. No backend is tried and caught.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import ops, ops_varlen, reference
from ._limits import TRITON_MAX_GRID_DIM, TRITON_MAX_HEAD_DIM, triton_interpreting
from ._semantics import Problem

HALF_DTYPES = (torch.float16, torch.bfloat16)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class Capability:
    """What one backend can serve. ``limits`` returns a reason string, or None if it can serve."""

    name: str
    devices: Tuple[str, ...]
    dtypes: Tuple[torch.dtype, ...]
    max_head_dim: Optional[int]  # None: any
    dropout: bool
    float_mask: bool
    bool_mask: bool
    available: Callable[[], Optional[str]]  # reason it is not usable on this machine, or None
    modifiers: bool = True  # softcap, sinks, ALiBi
    extra: Callable[[Problem], Optional[str]] = lambda problem: None

    def why_not_shape(self, problem) -> Optional[str]:
        """Availability, device, dtype and head dims: what a dense Problem and a packed
        VarlenProblem both carry."""
        reason = self.available()
        if reason:
            return reason
        if problem.device_type not in self.devices:
            return f"backend {self.name!r} does not run on {problem.device_type} tensors"
        if problem.dtype not in self.dtypes:
            return f"backend {self.name!r} does not support dtype {problem.dtype}"
        if self.max_head_dim is not None and max(problem.head_dim, problem.head_dim_v) > self.max_head_dim:
            return f"backend {self.name!r} supports head dims up to {self.max_head_dim}"
        return None

    def why_not(self, problem: Problem) -> Optional[str]:
        reason = self.why_not_shape(problem)
        if reason:
            return reason
        if problem.dropout_p > 0 and not self.dropout:
            return f"backend {self.name!r} does not support dropout"
        if problem.mask_kind == "float" and not self.float_mask:
            return f"backend {self.name!r} does not support float masks"
        if problem.mask_kind == "bool" and not self.bool_mask:
            return f"backend {self.name!r} does not support bool masks"
        if problem.has_modifiers and not self.modifiers:
            return f"backend {self.name!r} does not serve softcap, sinks or ALiBi yet"
        return self.extra(problem)


def _cpu_available() -> Optional[str]:
    return None if ops._C is not None else (ops.C_IMPORT_ERROR or "C++ extension missing")


def _cuda_available() -> Optional[str]:
    if ops._C_cuda is None:
        return ops.CUDA_IMPORT_ERROR or "CUDA extension not built"
    if not torch.cuda.is_available():
        return "no CUDA device"
    # compute capability >= 8.0 and a kernel image for it in this build (cached by the extension)
    return ops._C_cuda.device_why_not(torch.cuda.current_device()) or None


def _triton_available() -> Optional[str]:
    if not _triton_importable():
        return "triton is not installed"
    try:
        from .triton import launch  # noqa: F401
    except ImportError as exc:
        return f"attnkern.triton could not be imported: {exc}"
    if torch.cuda.is_available() or triton_interpreting():
        return None
    return "no CUDA device (set TRITON_INTERPRET=1 to run Triton on CPU tensors)"


def _triton_limits(problem: Problem) -> Optional[str]:
    """Limits of the Triton kernels beyond the row's fields."""
    if problem.device_type == "cpu":
        if not triton_interpreting():
            return "backend 'triton' runs on CPU tensors only under TRITON_INTERPRET=1"
        if problem.dtype == torch.bfloat16:
            return "backend 'triton' cannot run bfloat16 under TRITON_INTERPRET=1 (the interpreter's bf16 dot is wrong)"
    elif torch.cuda.get_device_capability() < (8, 0):
        return "backend 'triton' needs a GPU of compute capability 8.0 or newer"
    if min(problem.head_dim, problem.head_dim_v) < 1:
        return "backend 'triton' needs head dims >= 1"
    if max(problem.batch, problem.heads_q) > TRITON_MAX_GRID_DIM:
        return f"backend 'triton' supports at most {TRITON_MAX_GRID_DIM} batch entries and query heads"
    return None


def _cuda_extra(problem: Problem) -> Optional[str]:
    """The compiled head-dim buckets and dtypes (csrc/cuda/torch_ops.h why_not is the one rule)."""
    if ops._C_cuda is None:
        return None
    return ops._C_cuda.why_not(problem.head_dim, problem.head_dim_v, str(problem.dtype).replace("torch.", "")) or None


CAPABILITIES: Dict[str, Capability] = {
    # csrc/cuda: sm80+ (mma.sync kernels: Ampere, Ada, Hopper), fp16/bf16, any head dims <= 256 with
    # E != Ev (served by the next compiled bucket of 32/64/96/128/256, zero-padded), GQA, windows in
    # both alignments, bool/float masks with broadcast, dropout; split-KV forward for L <= 16; softcap,
    # sinks and ALiBi with all of these (the sm80 kernels' kModified variant, also on Hopper: the opt-in
    # wgmma kernels have no modifier variant; emulator-verified, not yet run on a GPU).
    "cuda": Capability(
        name="cuda", devices=("cuda",), dtypes=HALF_DTYPES, max_head_dim=256, dropout=True, float_mask=True,
        bool_mask=True, available=_cuda_available, extra=_cuda_extra,
    ),
    # Triton (attnkern/triton): CUDA tensors on sm80+, fp16/bf16/fp32 (fp32 with exact fp32 dots, not TF32),
    # any head dims up to 256 (E != Ev allowed), GQA, windows/causal in both alignments, bool and float masks
    # (with mask gradient), Philox dropout, softcap/sinks/ALiBi; CPU tensors only under TRITON_INTERPRET=1 and
    # never in bf16.
    "triton": Capability(
        name="triton", devices=("cuda", "cpu"), dtypes=KERNEL_DTYPES, max_head_dim=TRITON_MAX_HEAD_DIM, dropout=True,
        float_mask=True, bool_mask=True, available=_triton_available, extra=_triton_limits,
    ),
    "cpu": Capability(
        name="cpu", devices=("cpu",), dtypes=KERNEL_DTYPES, max_head_dim=None, dropout=True, float_mask=True,
        bool_mask=True, available=_cpu_available,
    ),
    "math": Capability(
        name="math", devices=("cpu", "cuda"), dtypes=KERNEL_DTYPES + (torch.float64,), max_head_dim=None,
        dropout=True, float_mask=True, bool_mask=True, available=lambda: None,
    ),
}

# order for "auto": the first backend whose row accepts the problem wins. The hand-written CUDA
# kernels should lead on CUDA tensors once a GPU run has verified them; until then (they are
# checked only by a CPU emulator, benchmarks/RESULTS.md has no GPU run) Triton, whose kernels
# the interpreter runs through the full parity matrix, comes first. backend="cuda" selects them.
AUTO_ORDER = {"cuda": ("triton", "cuda", "math"), "cpu": ("cpu", "math")}


def available_backends(device: Optional[str] = None) -> List[str]:
    """Backends usable on this machine (for ``device`` tensors if given: "cpu" or "cuda")."""
    names = []
    for name, cap in CAPABILITIES.items():
        if cap.available() is not None:
            continue
        if device is not None and device not in cap.devices:
            continue
        if name == "triton" and device == "cpu" and not triton_interpreting():
            continue
        names.append(name)
    return names


def choose(problem: Problem, backend: str) -> str:
    if backend != "auto":
        cap = CAPABILITIES[backend]
        reason = cap.why_not(problem)
        if reason:
            raise RuntimeError(f"backend={backend!r} cannot run this call: {reason}")
        return backend
    for name in AUTO_ORDER.get(problem.device_type, ("math",)):
        if CAPABILITIES[name].why_not(problem) is None:
            return name
    return "math"


def new_rng_seed() -> torch.Tensor:
    """A fresh 64-bit dropout seed drawn from torch's default CPU generator."""
    return ops.rng_seed()  # an op, so compiled code draws the seeds eager code draws


def _math(q, k, v, mask, rng_seed, problem: Problem, sinks, alibi_slopes):
    dtype = q.dtype
    compute = torch.float32 if dtype in HALF_DTYPES else dtype
    seed = int(rng_seed.item()) if rng_seed is not None else None
    out, lse = reference.attention(
        q.to(compute), k.to(compute), v.to(compute),
        mask if mask is None or mask.dtype == torch.bool else mask.to(compute),
        problem.scale, problem.window_left, problem.window_right, problem.bottom_right, problem.dropout_p,
        seed if seed is None else seed & 0xFFFFFFFFFFFFFFFF,
        softcap=problem.softcap, sinks=sinks, alibi_slopes=alibi_slopes,
    )
    return out.to(dtype), lse.to(torch.float32)


def _transformed(tensors) -> Optional[str]:
    """What makes the fused ops unusable on these tensors: forward-mode AD duals or torch.func
    transforms (the ops have backward formulas only, and no vmap rules). None if neither."""
    if torch.compiler.is_compiling():  # dynamo cannot trace these checks
        return None
    dual_level = torch.autograd.forward_ad._current_level >= 0  # (cheap: no dual tensors outside one)
    for t in tensors:
        if t is None:
            continue
        if torch._C._functorch.is_functorch_wrapped_tensor(t):
            return "torch.func transforms (grad, vmap, jvp, ...)"
        if dual_level and torch.autograd.forward_ad.unpack_dual(t).tangent is not None:
            return "forward-mode AD (torch.autograd.forward_ad)"
    return None


def _drop_everything(problem: Problem, q, k, v, mask, backend: str, sinks=None, alibi_slopes=None):
    """dropout_p == 1: every weight is dropped, so out = 0 @ v (NaN where v holds NaN or inf, as in
    torch); the LSE (of the scores, which dropout does not touch) comes from the undropped call."""
    _, lse = run(dataclasses.replace(problem, dropout_p=0.0), q, k, v, mask, backend, sinks, alibi_slopes)
    zero = (v * 0).sum(dim=2, keepdim=True).repeat_interleave(problem.group_size, dim=1)
    return zero.expand(problem.batch, problem.heads_q, problem.len_q, problem.head_dim_v).contiguous(), lse


def run(problem: Problem, q, k, v, mask, backend: str, sinks=None, alibi_slopes=None):
    """Forward through the chosen backend; returns ``(out, lse)``, differentiable.

    ``sinks`` / ``alibi_slopes`` come from ``_semantics.with_modifiers`` (fp32 ``(Hq,)`` / ``(B, Hq)``)."""
    if problem.dropout_p == 1.0:
        return _drop_everything(problem, q, k, v, mask, backend, sinks, alibi_slopes)
    name = choose(problem, backend)
    if name != "math":
        reason = _transformed((q, k, v, mask))
        if reason is not None:
            if backend != "auto":
                raise NotImplementedError(
                    f"backend={backend!r} does not support {reason}: its kernels have a backward formula only; "
                    "use backend='math' (or 'auto', which then picks it)"
                )
            name = "math"
    rng_seed = new_rng_seed() if problem.dropout_p > 0 else None
    if name == "math":
        return _math(q, k, v, mask, rng_seed, problem, sinks, alibi_slopes)
    fwd = ops.triton_fwd if name == "triton" else ops.native_fwd
    args = (q, k, v, mask, rng_seed, problem.scale, problem.window_left, problem.window_right, problem.bottom_right,
            problem.dropout_p)
    if problem.has_modifiers:  # (the plain call passes the schema's defaults for them)
        args += (problem.softcap, sinks, alibi_slopes)
    return call_op(fwd, args)


def call_op(op, args):
    """``op(*args)`` for the fused ops; when no gradient can flow (grad mode off, or no input that
    requires grad) the call goes below the Autograd keys at once. The ops' autograd kernels are
    torch.library's, in Python, and would only redispatch there when no input needs a gradient
    (26-31 us of a small call on the AMD EPYC: README, benchmarks/quiet/small_call_overhead.py).
    Under torch.compile the op is called as is (the compiled graph handles autograd)."""
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and torch._C._any_requires_grad(*args)):
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


# ---------------------------------------------------------------------------------------
# top-k attention (attnkern.topk_attention): its own op, attnkern::topk_fwd / topk_bwd

# The fused top-k kernels keep min(top_k, S) scores per row: csrc/cpu/topk_kernels.h kTopkMax,
# attnkern/triton/topk.py MAX_SLOTS (a power of two: the Triton merge sorts K_PAD-wide rows).
TOPK_MAX_SLOTS = 256
TOPK_NOT_SERVED = {
    "cuda": "backend 'cuda' has no top-k kernel yet (top-k attention runs on 'triton', 'cpu' or 'math')",
}


def topk_why_not(name: str, problem: Problem, slots: int, return_indices: bool) -> Optional[str]:
    """Why backend ``name`` cannot run this top-k call (None: it can). The fused kernels serve
    everything the dense row of their backend serves except dropout and the score modifiers
    (top-k attention takes neither), with ``min(top_k, S) <= TOPK_MAX_SLOTS``; ``top_k >= S``
    beyond that runs their dense kernel, which has no indices to return."""
    if name in TOPK_NOT_SERVED:
        return TOPK_NOT_SERVED[name]
    reason = CAPABILITIES[name].why_not(problem)
    if reason or name == "math":
        return reason
    if slots > TOPK_MAX_SLOTS:
        if slots < problem.len_k:
            return f"backend {name!r} keeps at most {TOPK_MAX_SLOTS} keys per query (top_k < S here)"
        if return_indices:
            # top_k >= S is dense attention, which the dense kernel serves without indices
            return f"backend {name!r} cannot return indices for top_k >= S > {TOPK_MAX_SLOTS} (it runs dense attention)"
    return None


def choose_topk(problem: Problem, backend: str, slots: int, return_indices: bool) -> str:
    if backend != "auto":
        reason = topk_why_not(backend, problem, slots, return_indices)
        if reason:
            raise RuntimeError(f"backend={backend!r} cannot run this top-k call: {reason}")
        return backend
    for name in AUTO_ORDER.get(problem.device_type, ("math",)):
        if topk_why_not(name, problem, slots, return_indices) is None:
            return name
    return "math"


# Packed (varlen) and paged (kvcache) calls: attnkern::varlen_fwd (the CPU kernels, and on CUDA
# tensors the CUDA kernels' varlen variants: the op dispatches on the device) and
# attnkern::triton_varlen_fwd, a schema of their own; the math reference serves the rest. "auto"
# prefers Triton on CUDA tensors, as for dense calls.
PACKED_AUTO_ORDER = {"cuda": ("triton", "cuda"), "cpu": ("cpu",)}


def _packed_cpu_why_not(problem) -> Optional[str]:
    if ops_varlen.varlen_fwd is None:
        return _cpu_available() or "the C++ extension has no attnkern::varlen_fwd (rebuild it)"
    if problem.device_type != "cpu":
        return f"backend 'cpu' does not run on {problem.device_type} tensors"
    if problem.dtype not in KERNEL_DTYPES:
        return f"backend 'cpu' does not support dtype {problem.dtype}"
    return None


def _packed_triton_why_not(problem) -> Optional[str]:
    """The dense Triton row (device, dtype, head dims, interpreter limits); heads only on a grid dim."""
    reason = CAPABILITIES["triton"].why_not_shape(problem)
    if reason:
        return reason
    return _triton_limits(dataclasses.replace(problem, batch=1))  # sequences run on grid dim 0: no limit


def _packed_cuda_why_not(problem) -> Optional[str]:
    """csrc/cuda/varlen_ops.h: the dense CUDA row (availability, device, dtype, the compiled head-dim
    buckets). The varlen variants serve every packed call that row's kernels serve: plain, or with
    softcap, sinks, ALiBi and dropout (the kernels' kModified variant, per sequence). Emulator-verified,
    not yet run on a GPU."""
    reason = CAPABILITIES["cuda"].why_not_shape(problem) or _cuda_extra(problem)
    if reason:
        return reason
    if ops_varlen.varlen_fwd is None:
        return "the C++ extension has no attnkern::varlen_fwd (rebuild it)"
    return None


# each row decides everything from the VarlenProblem (dropout_p included)
PACKED_WHY_NOT = {"cpu": _packed_cpu_why_not, "triton": _packed_triton_why_not, "cuda": _packed_cuda_why_not}


def choose_packed(problem, backend: str) -> str:
    """Backend for a packed/paged call (problem: attnkern._varlen_semantics.VarlenProblem)."""
    if backend == "math":
        return "math"
    if backend != "auto":
        reason = PACKED_WHY_NOT[backend](problem)
        if reason:
            raise RuntimeError(f"backend={backend!r} cannot run this call: {reason}")
        return backend
    for name in PACKED_AUTO_ORDER.get(problem.device_type, ()):
        if PACKED_WHY_NOT[name](problem) is None:
            return name
    return "math"


def run_packed(problem, q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, block_table, backend: str, sinks=None,
               alibi=None):
    """Forward of a packed call through the chosen backend; returns ``(out, lse (Hq, total_q))``.
    ``sinks`` fp32 (Hq,) and ``alibi`` fp32 (B, Hq) as ``_semantics.with_modifiers`` gives them."""
    dropout_p = problem.dropout_p
    if dropout_p == 1.0:  # every weight dropped: out 0, the LSE of the undropped scores (as run())
        out, lse = run_packed(dataclasses.replace(problem, dropout_p=0.0), q, k, v, cu_seqlens_q, cu_seqlens_k,
                              seqused_k, block_table, backend, sinks, alibi)
        return out * 0.0, lse
    name = choose_packed(problem, backend)
    dropout = () if dropout_p == 0.0 else (dropout_p, new_rng_seed())  # the seed drawn alike for both
    if name != "math":
        # attnkern::varlen_fwd dispatches on the device: the CPU kernels or the CUDA varlen variants
        fwd = ops_varlen.triton_varlen_fwd if name == "triton" else ops_varlen.varlen_fwd
        return call_op(fwd, (q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, block_table, problem.scale,
                             problem.window_left, problem.window_right, problem.softcap, sinks, alibi, *dropout))
    compute = torch.float32 if q.dtype in HALF_DTYPES else q.dtype
    from . import reference_varlen

    out, lse = reference_varlen.varlen_attention(
        q.to(compute), k.to(compute), v.to(compute), cu_seqlens_q, cu_seqlens_k, problem.scale, problem.window_left,
        problem.window_right, seqused_k, block_table, problem.softcap, sinks, alibi, dropout_p,
        int(dropout[1].item()) & 0xFFFFFFFFFFFFFFFF if dropout else None,
    )
    return out.to(q.dtype), lse.to(torch.float32)
