"""What a sweep times: attnkern's backends and the baselines found on this machine.

A :class:`Subject` answers three questions: can it run on this device at all
(``unavailable``), can it serve this case (``limits``: attnkern's own rows come straight
from the capability table in attnkern.dispatch), and how to call it (``build`` returns
``fn(q, k, v) -> out`` in the subject's layout). Every subject computes the same top-left
aligned band as attnkern.scaled_dot_product_attention.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .. import dispatch
from .._semantics import band_mask
from .cases import Case

Fn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Subject:
    name: str
    description: str
    unavailable: Callable[[str], Optional[str]]  # device type -> reason it cannot run there at all
    limits: Callable[[Case, str], Optional[str]]  # (case, device type) -> reason it cannot serve the case
    build: Callable[[Case, str], Fn]
    layout: str = "bhld"  # "bhld": torch's (B, H, L, D); "blhd": flash-attn's (B, L, H, D)
    materialises_scores: bool = False  # holds the (L, S) score matrix: bounded by --max-memory
    top_k: bool = False  # serves top-k cases (Case.top_k set) and only those

    def why_not(self, case: Case, device: str) -> Optional[str]:
        if (case.top_k is not None) != self.top_k:
            return "a top-k subject; this is a dense case" if self.top_k else "dense attention; this is a top-k case"
        return self.unavailable(device) or self.limits(case, device)


def _torch_version() -> Tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def _module_missing(name: str) -> Optional[str]:
    try:
        importlib.import_module(name)
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return f"{name} is not installed ({type(exc).__name__})"
    return None


def _cuda_only(what: str, device: str) -> Optional[str]:
    return None if device == "cuda" else f"{what} runs on CUDA tensors only"


# ---------------------------------------------------------------------------------------
# attnkern: one subject per row of the capability table


def _attnkern_subject(backend: str) -> Subject:
    cap = dispatch.CAPABILITIES[backend]

    def unavailable(device: str) -> Optional[str]:
        reason = cap.available()
        if reason:
            return reason
        if device not in cap.devices:
            return f"backend {backend!r} does not run on {device} tensors"
        if backend == "triton" and device == "cpu":
            return "Triton on CPU tensors runs only in its interpreter, whose timings mean nothing"
        return None

    def build(case: Case, device: str) -> Fn:
        from ..functional import scaled_dot_product_attention

        sinks = case.sinks_tensor(device)

        def fn(q, k, v):
            return scaled_dot_product_attention(q, k, v, is_causal=case.causal, enable_gqa=case.gqa,
                                                window_size=case.window, softcap=case.softcap, sinks=sinks,
                                                backend=backend)
        return fn

    return Subject(
        name=f"attnkern-{backend}", description=f"attnkern backend={backend!r}", unavailable=unavailable,
        limits=lambda case, device: cap.why_not(case.problem(device)), build=build,
        materialises_scores=backend == "math",
    )


def _wgmma_subject() -> Subject:
    """backend="cuda" with the Hopper wgmma kernels switched on (ATTNKERN_CUDA_WGMMA=1 around each
    call: they are opt-in until verified on a GPU)."""
    base = _attnkern_subject("cuda")

    def unavailable(device: str) -> Optional[str]:
        reason = base.unavailable(device)
        if reason:
            return reason
        from .. import ops

        if not ops._C_cuda.sm90_instances():
            return "the CUDA extension was built without 9.0a, so without the wgmma kernels"
        if torch.cuda.get_device_capability() != (9, 0):
            return "the wgmma kernels run on compute capability 9.0 only"
        return None

    def build(case: Case, device: str) -> Fn:
        call = base.build(case, device)

        def fn(q, k, v):
            before = os.environ.get("ATTNKERN_CUDA_WGMMA")
            os.environ["ATTNKERN_CUDA_WGMMA"] = "1"
            try:
                return call(q, k, v)
            finally:
                if before is None:
                    del os.environ["ATTNKERN_CUDA_WGMMA"]
                else:
                    os.environ["ATTNKERN_CUDA_WGMMA"] = before
        return fn

    def limits(case: Case, device: str) -> Optional[str]:
        if case.len_q <= 16:
            return "decoding (L <= 16) takes the split-KV kernel, as attnkern-cuda does"
        return base.limits(case, device)

    return dataclasses.replace(base, name="attnkern-cuda-wgmma", unavailable=unavailable, build=build, limits=limits,
                               description="attnkern backend='cuda' with the Hopper wgmma kernels (sm_90a)")


# ---------------------------------------------------------------------------------------
# torch SDPA, one subject per kernel (torch.nn.attention.sdpa_kernel pins it)

_SDPA_KERNELS = {
    "math": ("MATH", "torch SDPA math (materialises the scores)"),
    "flash": ("FLASH_ATTENTION", "torch SDPA flash (on CPU: ATen's CPU flash kernel)"),
    "efficient": ("EFFICIENT_ATTENTION", "torch SDPA memory-efficient (CUDA)"),
    "cudnn": ("CUDNN_ATTENTION", "torch SDPA cuDNN (CUDA)"),
}


def _sdpa_subject(kernel: str) -> Subject:
    enum_name, description = _SDPA_KERNELS[kernel]

    def unavailable(device: str) -> Optional[str]:
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: F401
        except ImportError:
            return "torch.nn.attention.sdpa_kernel is missing (torch < 2.3)"
        if not hasattr(SDPBackend, enum_name):
            return f"this torch has no SDPBackend.{enum_name}"
        if kernel in ("efficient", "cudnn"):
            return _cuda_only(f"torch SDPA {kernel!r}", device)
        return None

    def limits(case: Case, device: str) -> Optional[str]:
        if case.has_modifiers:
            return "torch SDPA has no softcap or sinks"
        if case.gqa and _torch_version() < (2, 5):
            return "torch < 2.5 has no enable_gqa"
        if case.window is not None and kernel == "flash" and device == "cuda":
            return "torch's CUDA flash kernel takes no attn_mask, which a window needs"
        return None

    def build(case: Case, device: str) -> Fn:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        pinned = [getattr(SDPBackend, enum_name)]
        mask = None
        if case.window is not None:
            left, right = case.band
            mask = band_mask(case.len_q, case.len_k, left, right, 0, device=device)
        extra = {"enable_gqa": True} if case.gqa else {}
        is_causal = case.causal and mask is None

        def fn(q, k, v):
            with sdpa_kernel(pinned):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, **extra)
        return fn

    return Subject(name=f"sdpa-{kernel}", description=description, unavailable=unavailable, limits=limits,
                   build=build, materialises_scores=kernel == "math")


# ---------------------------------------------------------------------------------------
# FlexAttention with the equivalent mask_mod

_compiled_flex = None


def _flex_unavailable(device: str) -> Optional[str]:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return "this torch has no FlexAttention (torch < 2.5)"
    return None


def band_mask_mod(left: int, right: int):
    """FlexAttention mask_mod of the top-left band: key j allowed iff i - left <= j <= i + right."""
    def mask_mod(b, h, q_idx, kv_idx):
        back = q_idx - kv_idx  # how far the key lies behind the query
        if left >= 0 and right >= 0:
            return (back <= left) & (back >= -right)
        if left >= 0:
            return back <= left
        return back >= -right
    return mask_mod


def _flex_build(case: Case, device: str) -> Fn:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    global _compiled_flex
    if _compiled_flex is None:
        # eager FlexAttention materialises the scores; only the compiled kernel is the real contender
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
        # every shape and grad mode of a sweep is a recompile; past dynamo's limit (8) flex_attention
        # would silently run eager, materialising the scores, and be timed as such
        config = torch._dynamo.config
        limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, limit, max(getattr(config, limit), 256))
    block_mask = None
    if case.causal or case.window is not None:
        left, right = case.band
        block_mask = create_block_mask(band_mask_mod(left, right), None, None, case.len_q, case.len_k, device=device)
    compiled = _compiled_flex
    score_mod = None
    if case.softcap > 0:
        cap = case.softcap

        def score_mod(score, b, h, q_idx, kv_idx):
            return cap * torch.tanh(score / cap)

    def fn(q, k, v):
        return compiled(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=case.gqa)
    return fn


def _flex_limits(case: Case, device: str) -> Optional[str]:
    # on CPU each shape is an Inductor compile of its own (tens of seconds, more with the
    # backward): FlexAttention is the baseline where its block mask skips work, the causal and
    # windowed forwards
    if device == "cpu" and (case.mode != "fwd" or not case.causal and case.window is None):
        return "on CPU FlexAttention is compared on causal and windowed forwards, where its block mask skips"
    return None


def _flex_subject() -> Subject:
    return Subject(name="flex", description="torch FlexAttention (torch.compile) with the band as mask_mod "
                                            "and softcap as score_mod",
                   unavailable=_flex_unavailable,
                   limits=lambda case, device: "a sink is not a score_mod (it adds a logit no key has)"
                   if case.sinks else _flex_limits(case, device),
                   build=_flex_build)


# ---------------------------------------------------------------------------------------
# the eager attention Hugging Face models fall back to for softcap (Gemma 2) and sinks (gpt-oss)


def _eager_build(case: Case, device: str) -> Fn:
    """As transformers' Gemma 2 / gpt-oss eager_attention_forward: repeat K/V for GQA, scores,
    softcap, an additive finfo.min band mask, the sink as an extra logit column, fp32 softmax."""
    mask = None
    if case.causal or case.window is not None:
        left, right = case.band
        allowed = band_mask(case.len_q, case.len_k, left, right, 0, device=device)
        mask = torch.zeros(allowed.shape, dtype=case.torch_dtype, device=device).masked_fill(
            ~allowed, torch.finfo(case.torch_dtype).min)
    sinks = case.sinks_tensor(device)
    group = case.heads_q // case.heads_kv
    scale = case.head_dim ** -0.5

    def fn(q, k, v):
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) * scale
        if case.softcap > 0:
            scores = torch.tanh(scores / case.softcap) * case.softcap
        if mask is not None:
            scores = scores + mask
        if sinks is not None:
            column = sinks.to(scores.dtype).view(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[2], 1)
            combined = torch.cat([scores, column], dim=-1)
            combined = combined - combined.max(dim=-1, keepdim=True).values
            probs = torch.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1]
        else:
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs.to(v.dtype), v)
    return fn


def _eager_subject() -> Subject:
    return Subject(name="eager", description="HF eager attention (Gemma 2 / gpt-oss eager_attention_forward)",
                   unavailable=lambda device: None,
                   limits=lambda case, device: None if case.has_modifiers else
                   "the eager baseline serves the score-modifier cases (--modifiers)",
                   build=_eager_build,
                   materialises_scores=True)


# ---------------------------------------------------------------------------------------
# flash-attn and xformers, when installed (layout (B, L, H, D))


def _bottom_right_differs(case: Case) -> Optional[str]:
    if (case.causal or case.window is not None) and case.len_q != case.len_k:
        return "aligns causal/window masks bottom-right; this case is top-left with L != S"
    return None


def _flash_attn_limits(case: Case, device: str) -> Optional[str]:
    if case.dtype not in ("float16", "bfloat16"):
        return f"flash-attn takes float16/bfloat16, not {case.dtype}"
    if max(case.head_dim, case.head_dim_v) > 256:
        return "flash-attn supports head dims up to 256"
    reason = _bottom_right_differs(case)
    return f"flash-attn {reason}" if reason else None


def _flash_attn_build(case: Case, device: str) -> Fn:
    from flash_attn import flash_attn_func

    window = case.band if case.window is not None else (-1, -1)

    def fn(q, k, v):
        return flash_attn_func(q, k, v, causal=case.causal, window_size=window)
    return fn


def _xformers_limits(case: Case, device: str) -> Optional[str]:
    if case.gqa:
        return "xformers takes GQA only in its 5-D (B, M, G, H, K) layout, not wired here"
    if case.dtype == "float64":
        return "xformers does not take float64"
    reason = _bottom_right_differs(case)
    return f"xformers {reason}" if reason else None


def _xformers_build(case: Case, device: str) -> Fn:
    import xformers.ops as xops
    from xformers.ops import fmha

    if case.window is not None:
        left, right = case.band
        bias = fmha.attn_bias.LocalAttentionFromBottomRightMask(window_left=left, window_right=max(right, 0))
    elif case.causal:
        bias = fmha.attn_bias.LowerTriangularMask()
    else:
        bias = None

    def fn(q, k, v):
        return xops.memory_efficient_attention(q, k, v, attn_bias=bias)
    return fn


def _external(name: str, module: str, description: str, limits, build) -> Subject:
    def limits_here(case: Case, device: str) -> Optional[str]:
        return "not wired up for softcap or sinks here" if case.has_modifiers else limits(case, device)

    return Subject(name=name, description=description,
                   unavailable=lambda device: _module_missing(module) or _cuda_only(name, device),
                   limits=limits_here, build=build, layout="blhd")


# ---------------------------------------------------------------------------------------
# top-k attention: attnkern's op, and the usual implementation (scores + torch.topk)


def _attnkern_topk_subject() -> Subject:
    def limits(case: Case, device: str) -> Optional[str]:
        problem = case.problem(device)
        names = dispatch.AUTO_ORDER.get(device, ("math",))
        fused = [n for n in names if n != "math" and
                 dispatch.topk_why_not(n, problem, min(case.top_k, case.len_k), False) is None]
        return None if fused else "no fused backend serves this top-k case (auto would run the math reference)"

    def build(case: Case, device: str) -> Fn:
        from ..topk import topk_attention

        def fn(q, k, v):
            return topk_attention(q, k, v, case.top_k, is_causal=case.causal, window_size=case.window,
                                  enable_gqa=case.gqa)
        return fn

    return Subject(name="attnkern-topk", description="attnkern.topk_attention (fused top-k kernel)",
                   unavailable=lambda device: None, limits=limits, build=build, top_k=True)


def _torch_topk_build(case: Case, device: str) -> Fn:
    left, right = case.band
    allowed = band_mask(case.len_q, case.len_k, left, right, 0, device=device)
    scale = case.head_dim ** -0.5

    def fn(q, k, v):
        if case.gqa:
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
        top, idx = scores.topk(min(case.top_k, case.len_k), dim=-1)
        probs = torch.softmax(top, dim=-1)
        return torch.zeros_like(scores).scatter(-1, idx, probs) @ v
    return fn


def _torch_topk_subject() -> Subject:
    return Subject(name="torch-topk", description="torch: materialised scores, torch.topk, softmax, scatter, P V",
                   unavailable=lambda device: None, limits=lambda case, device: None, build=_torch_topk_build,
                   materialises_scores=True, top_k=True)


def all_subjects() -> Dict[str, Subject]:
    """Every subject this module knows, available here or not, in report order."""
    subjects = [_attnkern_subject(b) for b in dispatch.CAPABILITIES]
    subjects.append(_wgmma_subject())
    subjects += [_sdpa_subject(k) for k in _SDPA_KERNELS]
    subjects.append(_flex_subject())
    subjects.append(_eager_subject())
    subjects.append(_external("flash-attn", "flash_attn", "flash-attn flash_attn_func", _flash_attn_limits,
                              _flash_attn_build))
    subjects.append(_external("xformers", "xformers", "xformers memory_efficient_attention", _xformers_limits,
                              _xformers_build))
    subjects += [_attnkern_topk_subject(), _torch_topk_subject()]
    return {s.name: s for s in subjects}


def default_baseline(device: str, names: List[str]) -> Optional[str]:
    """The torch kernel users would otherwise get: its flash kernel (CPU flash on CPU)."""
    for candidate in ("sdpa-flash", "sdpa-efficient", "sdpa-math"):
        if candidate in names:
            return candidate
    return names[0] if names else None
