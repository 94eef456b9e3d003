"""The benchmark grid: one :class:`Case` per attention problem, and the named presets.

A case is one call shape in torch's layout (B, H, L, E) with top-left alignment (the
meaning of torch's ``is_causal`` and of attnkern's ``scaled_dot_product_attention``), so
every backend in a sweep is asked the same question.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from .._semantics import Problem, normalize_window
from .flops import MODE_FACTOR, attention_flops

DTYPES: Dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp64": "float64"}
MODES = tuple(MODE_FACTOR)


def dtype_name(name: str) -> str:
    key = DTYPE_ALIASES.get(name.lower(), name.lower())
    if key not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} (or fp32/fp16/bf16), got {name!r}")
    return key


@dataclass(frozen=True)
class Case:
    """One benchmarked call. ``window`` is (left, right) as attnkern takes it, or None."""

    dtype: str
    batch: int
    heads_q: int
    heads_kv: int
    len_q: int
    len_k: int
    head_dim: int
    causal: bool = False
    window: Optional[Tuple[int, int]] = None
    mode: str = "fwd"
    head_dim_v: Optional[int] = None
    model: str = ""  # preset shape name (e.g. "llama3-8b"), for labels only
    top_k: Optional[int] = None  # top-k attention (attnkern.topk_attention) instead of dense
    softcap: float = 0.0  # score modifiers (attnkern._semantics): logit cap, one sink per query head
    sinks: bool = False

    def __post_init__(self):
        if self.head_dim_v is None:
            object.__setattr__(self, "head_dim_v", self.head_dim)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.heads_kv <= 0 or self.heads_q % self.heads_kv:
            raise ValueError(f"heads_q {self.heads_q} must be a multiple of heads_kv {self.heads_kv}")
        normalize_window(self.window, self.causal)  # raises on a malformed window

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def band(self) -> Tuple[int, int]:
        """(left, right) with causality folded in, -1 unbounded."""
        return normalize_window(self.window, self.causal)

    @property
    def gqa(self) -> bool:
        return self.heads_q != self.heads_kv

    @property
    def has_modifiers(self) -> bool:
        return self.softcap > 0 or self.sinks

    def sinks_tensor(self, device) -> Optional[torch.Tensor]:
        """The case's sink logits (fp32, (heads_q,)): fixed values of both signs, or None."""
        return torch.linspace(-2.0, 2.0, self.heads_q, device=device) if self.sinks else None

    @property
    def masking(self) -> str:
        """Short description of the band (dense, causal, or the window), top-k and the score modifiers."""
        mods = (f" top-{self.top_k}" if self.top_k is not None else "") + (
            f" softcap{self.softcap:g}" if self.softcap > 0 else "") + (" sinks" if self.sinks else "")
        if self.window is None:
            return ("causal" if self.causal else "dense") + mods
        left, right = self.band
        return f"{'causal ' if self.causal else ''}win({left},{right})" + mods

    def flops(self) -> float:
        if self.top_k is not None:  # every attended score, then P V over the kept keys only
            scores = attention_flops(self.batch, self.heads_q, self.len_q, self.len_k, self.head_dim, 0,
                                     self.causal, self.window, False, self.mode)
            kept = min(self.top_k, self.len_k)
            return scores + 2.0 * self.batch * self.heads_q * self.len_q * kept * self.head_dim_v * MODE_FACTOR[self.mode]
        return attention_flops(self.batch, self.heads_q, self.len_q, self.len_k, self.head_dim, self.head_dim_v,
                               self.causal, self.window, False, self.mode)

    def kv_bytes(self) -> int:
        """Bytes of K and V: what a decoding step must read at least once."""
        elems = self.batch * self.heads_kv * self.len_k * (self.head_dim + self.head_dim_v)
        return elems * torch.empty((), dtype=self.torch_dtype).element_size()

    def problem(self, device_type: str) -> Problem:
        left, right = self.band
        return Problem(
            batch=self.batch, heads_q=self.heads_q, heads_kv=self.heads_kv, len_q=self.len_q, len_k=self.len_k,
            head_dim=self.head_dim, head_dim_v=self.head_dim_v, scale=self.head_dim ** -0.5, window_left=left,
            window_right=right, bottom_right=False, dropout_p=0.0, mask_kind=None, dtype=self.torch_dtype,
            device_type=device_type, softcap=self.softcap, has_sinks=self.sinks,
        )

    def shape_label(self) -> str:
        heads = f"H{self.heads_q}" + (f"/{self.heads_kv}" if self.gqa else "")
        seq = f"L{self.len_q}" + (f" S{self.len_k}" if self.len_k != self.len_q else "")
        dims = f"D{self.head_dim}" + (f"/{self.head_dim_v}" if self.head_dim_v != self.head_dim else "")
        prefix = f"{self.model} " if self.model else ""
        return f"{prefix}B{self.batch} {heads} {seq} {dims}"

    def label(self) -> str:
        return f"{self.dtype} {self.shape_label()} {self.masking} {self.mode}"

    def series_key(self) -> Tuple:
        """Everything but the sequence lengths: the cases one throughput-vs-length line joins."""
        return (self.dtype, self.batch, self.heads_q, self.heads_kv, self.head_dim, self.head_dim_v, self.causal,
                self.window, self.mode, self.model, self.len_k == self.len_q, self.top_k, self.softcap, self.sinks)

    def series_label(self) -> str:
        heads = f"H{self.heads_q}" + (f"/{self.heads_kv}" if self.gqa else "")
        prefix = f"{self.model} " if self.model else ""
        return f"{prefix}{self.dtype} B{self.batch} {heads} D{self.head_dim} {self.masking} {self.mode}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["window"] = list(self.window) if self.window is not None else None
        return d


def grid(dtypes: Iterable[str], head_dims: Iterable[int], batch_heads: Iterable[Tuple[int, int, int]],
         seqlens: Iterable[Tuple[int, int]], bands: Iterable[Tuple[bool, Optional[Tuple[int, int]]]],
         modes: Iterable[str], model: str = "") -> List[Case]:
    """Cartesian product; ``batch_heads`` holds (batch, heads_q, heads_kv), ``bands`` (causal, window)."""
    cases = []
    for dt, d, (b, hq, hkv), (lq, lk), (causal, window), mode in itertools.product(
            dtypes, head_dims, batch_heads, seqlens, bands, modes):
        cases.append(Case(dt, b, hq, hkv, lq, lk, d, causal, window, mode, model=model))
    return cases


# ---------------------------------------------------------------------------------------
# presets


@dataclass
class Preset:
    """Cases plus the timing budget and backends that suit them."""

    name: str
    cases: List[Case]
    budget_s: float  # measuring time per case, shared by its backends
    min_reps: int
    max_reps: int
    warmup_s: float
    exclude: Dict[str, str] = field(default_factory=dict)  # backend -> reason it sits this preset out
    baseline: Optional[str] = None  # default --baseline (None: subjects.default_baseline)
    check: bool = False  # check every subject against the float64 reference (as --check)


def _squares(lengths: Sequence[int]) -> List[Tuple[int, int]]:
    return [(n, n) for n in lengths]


def quick(device: str) -> Preset:
    """A first look in well under a minute on a 2-core CPU (a few seconds on a GPU)."""
    if device == "cuda":
        dtypes, b, h, lengths, win = ["bfloat16"], 4, 16, [1024, 2048, 4096], (512, 0)
        d = 128
    else:
        dtypes, b, h, lengths, win = ["float32"], 1, 8, [512, 1024, 2048], (256, 0)
        d = 64
    top = lengths[-1]
    cases = grid(dtypes, [d], [(b, h, h)], _squares(lengths), [(False, None), (True, win)], ["fwd"])
    cases += grid(dtypes, [d], [(b, h, h)], [(top, top)], [(True, None)], ["fwd"])
    cases += grid(dtypes, [d], [(b, h, h // 4)], [(lengths[1], lengths[1])], [(True, None)], ["fwd"])
    cases += grid(dtypes, [d], [(b, h, h)], [(lengths[1], lengths[1])], [(False, None), (True, win)], ["fwd+bwd"])
    exclude = {"attnkern-math": "the float64-capable oracle is not a contender; run --standard or --backends "
                                "attnkern-math"}
    if device == "cpu":
        exclude["flex"] = ("FlexAttention on CPU compiles every shape with Inductor (seconds each); "
                           "run --standard or --backends flex")
    return Preset("quick", cases, budget_s=0.5 if device == "cpu" else 0.3, min_reps=5, max_reps=50,
                  warmup_s=0.05, exclude=exclude)


def standard(device: str) -> Preset:
    """The full grid: dtypes, head dims, lengths, causal, windows, GQA, fwd / bwd / fwd+bwd."""
    if device == "cuda":
        dtypes, head_dims, lengths, tokens = ["bfloat16", "float16"], [64, 128], [512, 1024, 2048, 4096, 8192, 16384], 16384
        heads = {64: 32, 128: 16}
        windows = [(256, 0), (1024, 1024)]
    else:
        dtypes, head_dims, lengths, tokens = ["float32", "bfloat16"], [64, 128], [256, 512, 1024, 2048, 4096], 4096
        heads = {64: 8, 128: 4}
        windows = [(256, 0), (128, 128)]
    bands = [(False, None), (True, None)] + [(w[1] == 0, w) for w in windows]
    cases = []
    for d in head_dims:
        h = heads[d]
        for n in lengths:
            b = max(1, tokens // n)  # constant tokens per batch, as FlashAttention's benchmarks do
            cases += grid(dtypes, [d], [(b, h, h)], [(n, n)], bands, MODES)
        mid = lengths[len(lengths) // 2]
        cases += grid(dtypes, [d], [(max(1, tokens // mid), h, max(1, h // 4))], [(mid, mid)],
                      [(True, None)], MODES)
        cases += grid(dtypes, [d], [(1, h, h)], [(lengths[0], lengths[-1])], [(False, None)], ["fwd"])  # L != S
    return Preset("standard", cases, budget_s=2.0 if device == "cpu" else 0.5, min_reps=7, max_reps=200,
                  warmup_s=0.2)


# (heads_q, heads_kv, head_dim, causal, window) of common decoder models
MODELS = {
    "llama3-8b": (32, 8, 128, True, None),
    "mistral-7b": (32, 8, 128, True, (4095, 0)),  # sliding_window 4096: key j > i - 4096
    "gpt2": (12, 12, 64, True, None),
}


def llm(device: str) -> Preset:
    """Attention shapes of Llama-3-8B, Mistral-7B (sliding window 4096) and GPT-2."""
    if device == "cuda":
        lengths = {"llama3-8b": [2048, 4096, 8192], "mistral-7b": [4096, 8192, 16384], "gpt2": [1024]}
        modes, gpt2_batch = ["fwd", "fwd+bwd"], 16
    else:
        lengths = {"llama3-8b": [1024, 2048], "mistral-7b": [2048, 8192], "gpt2": [1024]}
        modes, gpt2_batch = ["fwd"], 4
    dtype = "bfloat16"
    cases = []
    for model, (hq, hkv, d, causal, window) in MODELS.items():
        b = gpt2_batch if model == "gpt2" else 1
        cases += grid([dtype], [d], [(b, hq, hkv)], _squares(lengths[model]), [(causal, window)], modes, model=model)
    return Preset("llm", cases, budget_s=2.0 if device == "cpu" else 0.5, min_reps=5, max_reps=100, warmup_s=0.1)


# ---------------------------------------------------------------------------------------
# GPU presets: the measurements of the Triton and CUDA backend issues, bfloat16, both backends
# side by side with every baseline, speed-ups against the fastest of torch's SDPA kernels on
# each case, every subject checked against the float64 reference. On a CPU they run the same
def cpu_targets(device: str) -> Preset:
    """The CPU cases of issue 10's targets, B=1, H=8, D=64 unless said: dense fp32 and bf16
    forward at L=2048, causal fp32 and bf16 forward+backward at L=1024, causal forward at
    L=2048 and window (255, 0) at L=8192 against FlexAttention's block mask and SDPA given the
    dense mask, GQA decoding (L=1, S=8192, 32/8 heads, D=128, bf16). Thread scaling needs two
    thread counts in one process: benchmarks/test_cpu_vs_torch.py measures it."""
    cases = grid(["float32", "bfloat16"], [64], [(1, 8, 8)], [(2048, 2048)], [(False, None)], ["fwd"])
    cases += grid(["float32", "bfloat16"], [64], [(1, 8, 8)], [(1024, 1024)], [(True, None)], ["fwd+bwd"])
    cases += grid(["float32"], [64], [(1, 8, 8)], [(2048, 2048)], [(True, None)], ["fwd"])
    cases += grid(["float32"], [64], [(1, 8, 8)], [(8192, 8192)], [(True, (255, 0))], ["fwd"])
    cases += grid(["bfloat16"], [128], [(1, 32, 8)], [(1, 8192)], [(False, None)], ["fwd"])
    exclude = dict(_NOT_CONTENDERS)
    return Preset("cpu-targets", cases, budget_s=1.0, min_reps=5, max_reps=30, warmup_s=0.1, exclude=exclude)


# grid scaled down (lengths / 64, fewer heads and tokens) so that the whole path, checks and
# summaries included, runs without a GPU; those numbers say nothing about the GPU targets.

_NOT_CONTENDERS = {
    "attnkern-math": "the float64-capable oracle is not a contender (it checks every subject instead)",
    "sdpa-math": "torch's math kernel materialises the scores; the issues compare the fused kernels",
}
_FLEX_COMPILES = "FlexAttention compiles every shape (tens of seconds each); --gpu-window compares it"


@dataclass(frozen=True)
class _GpuScale:
    tokens: int  # B * L of the dense cases
    hidden: int  # H * D of the dense cases
    length: int  # divisor of every sequence length
    heads: int  # divisor of the window and decode cases' heads and batch


_GPU_SCALE = {"cuda": _GpuScale(16384, 2048, 1, 1), "cpu": _GpuScale(256, 256, 64, 4)}


def _gpu_preset(name: str, device: str, cases: List[Case], exclude: Dict[str, str]) -> Preset:
    if device == "cuda":
        budget_s, min_reps, max_reps, warmup_s = 0.5, 5, 100, 0.2
    else:
        budget_s, min_reps, max_reps, warmup_s = 0.05, 3, 10, 0.0
    exclude = dict(_NOT_CONTENDERS, **exclude)
    if device == "cpu":
        exclude.setdefault("flex", "FlexAttention on CPU compiles every shape with Inductor (seconds each)")
    return Preset(name, cases, budget_s, min_reps, max_reps, warmup_s, exclude, baseline="sdpa-fastest", check=True)


def gpu_dense(device: str) -> Preset:
    """Head dim 64 and 128, L = S in {1k, 4k, 16k}, causal and not, forward and backward, with
    B * L = 16k tokens and H * D = 2048 (FlashAttention's benchmark setting: enough blocks to
    fill an H100). Baselines: torch SDPA's flash, memory-efficient and cuDNN kernels (the
    fastest per case is "sdpa-fastest"), flash-attn and xformers when installed."""
    scale = _GPU_SCALE.get(device, _GPU_SCALE["cpu"])
    cases = []
    for d in (64, 128):
        for n in (1024 // scale.length, 4096 // scale.length, 16384 // scale.length):
            b, h = max(1, scale.tokens // n), max(1, scale.hidden // d)
            cases += grid(["bfloat16"], [d], [(b, h, h)], [(n, n)], [(False, None), (True, None)], ["fwd", "bwd"])
    return _gpu_preset("gpu-dense", device, _forwards_first(cases), {"flex": _FLEX_COMPILES})


def _forwards_first(cases: List[Case]) -> List[Case]:
    """A run stopped by a time limit then has every forward figure (cheaper: less compiling)."""
    return sorted(cases, key=lambda c: MODES.index(c.mode))  # stable: the grid order within a mode


GPU_WINDOW = (1023, 0)  # W = 1024 keys: the query's own and the 1023 before it


def gpu_window(device: str) -> Preset:
    """Window (1023, 0) at L = S in {8k, 16k, 32k, 64k}, B = 1, H = 16, head dim 64 and 128,
    forward and backward: attnkern's Triton and CUDA backends against FlexAttention with the
    sliding-window mask_mod and torch SDPA given the dense (L, S) boolean mask. The summary
    fits the growth of time with L (linear: exponent 1)."""
    scale = _GPU_SCALE.get(device, _GPU_SCALE["cpu"])
    window = ((GPU_WINDOW[0] + 1) // scale.length - 1, 0)
    lengths = [n // scale.length for n in (8192, 16384, 32768, 65536)]
    heads = 16 // scale.heads
    cases = grid(["bfloat16"], [64, 128], [(1, heads, heads)], _squares(lengths), [(True, window)], ["fwd", "bwd"])
    return _gpu_preset("gpu-window", device, _forwards_first(cases), {})


def gpu_decode(device: str) -> Preset:
    """Decoding: L = 1, S = 32k, 32 query heads over 4 KV heads (GQA 8:1), batch 16, head dim
    128, forward. The summary gives the bandwidth of reading K and V once, as a share of a
    device-to-device copy measured in the same run and of the card's nominal HBM bandwidth."""
    scale = _GPU_SCALE.get(device, _GPU_SCALE["cpu"])
    cases = grid(["bfloat16"], [128], [(16 // scale.heads, 32 // scale.heads, 4 // scale.heads)],
                 [(1, 32768 // scale.length)], [(False, None)], ["fwd"])
    return _gpu_preset("gpu-decode", device, cases, {"flex": "not among the decoding baselines the issue names"})


TOPK_VALUES = (1, 16, 64)


def topk(device: str) -> Preset:
    """Top-k attention (top_k 1/16/64) against materialising the scores and torch.topk, and the
    dense case of the same shape for attnkern's dense fused forward: L = S = 4096, head dim 64."""
    dtype, b, h, n = ("bfloat16", 1, 16, 4096) if device == "cuda" else ("float32", 1, 4, 4096)
    cases = [Case(dtype, b, h, h, n, n, 64, top_k=k) for k in TOPK_VALUES]
    cases.append(Case(dtype, b, h, h, n, n, 64))
    return Preset("topk", cases, budget_s=1.0, min_reps=3, max_reps=20, warmup_s=0.1, baseline="torch-topk",
                  exclude={"attnkern-math": "the float64-capable oracle is not a contender",
                           "flex": "FlexAttention on CPU compiles every shape with Inductor (seconds each)"})


def modifiers(device: str) -> Preset:
    """Score modifiers (issue 13): each modifier against the same call without it, in one run
    (the plain path must not pay), and Gemma-2-like (head dim 256, sliding window 4096, softcap
    50) and gpt-oss-like (head dim 64, GQA 64/8, sinks, window 128 alternating with full)
    shapes against HF's eager attention and FlexAttention with the equivalent score_mod."""
    if device == "cuda":
        dtype, length, gemma_lengths, oss_length, oss_heads = "bfloat16", 4096, [4096, 8192], 4096, (64, 8)
    else:
        dtype, length, gemma_lengths, oss_length, oss_heads = "float32", 1024, [2048, 4096], 1024, (16, 2)
    cases = []
    for mods in (dict(), dict(softcap=50.0), dict(sinks=True)):
        cases += [Case(dtype, 1, 8, 8, length, length, 64, causal=True, mode="fwd+bwd", **mods)]
    gemma = [(dtype, n) for n in gemma_lengths]
    if device != "cuda":  # bf16 too on a CPU: its AMX variant is where a bf16 model runs there
        gemma.append(("bfloat16", gemma_lengths[-1]))
    for gemma_dtype, n in gemma:  # Gemma 2 2B: 8 query heads, 4 kv heads
        cases.append(Case(gemma_dtype, 1, 8, 4, n, n, 256, causal=True, window=(4095, 0), mode="fwd+bwd",
                          softcap=50.0, model="gemma2-like"))
    hq, hkv = oss_heads  # gpt-oss: 64 query heads, 8 kv heads (fewer on a CPU)
    for window in ((127, 0), None):
        cases.append(Case(dtype, 1, hq, hkv, oss_length, oss_length, 64, causal=True, window=window,
                          mode="fwd+bwd", sinks=True, model="gpt-oss-like"))
    exclude = {"attnkern-math": "the float64-capable oracle is not a contender"}
    return Preset("modifiers", cases, budget_s=2.0 if device == "cpu" else 0.5, min_reps=3, max_reps=50,
                  warmup_s=0.1, exclude=exclude, baseline="eager")


def gpu_first(device: str) -> Preset:
    """The first GPU run's short benchmark (scripts/gpu_check.sh --phase first-run), a few minutes
    on an H200: gpu-dense's head-dim-128 cases at L = S in {4k, 16k}, causal and not, forward and
    forward+backward, and gpu-decode's case (with the forwards). The window at 32k runs beside it as
    ``--gpu-window --where head_dim=128 --where len_q=32768 --where mode=fwd``, where FlexAttention
    is a baseline; here it would compile every dense shape."""
    scale = _GPU_SCALE.get(device, _GPU_SCALE["cpu"])
    cases = []
    for n in (4096 // scale.length, 16384 // scale.length):
        b, h = max(1, scale.tokens // n), max(1, scale.hidden // 128)
        cases += grid(["bfloat16"], [128], [(b, h, h)], [(n, n)], [(False, None), (True, None)], ["fwd", "fwd+bwd"])
    return _gpu_preset("gpu-first", device, _forwards_first(cases + gpu_decode(device).cases), {"flex": _FLEX_COMPILES})


PRESETS = {"quick": quick, "standard": standard, "llm": llm, "cpu-targets": cpu_targets, "gpu-dense": gpu_dense,
           "gpu-window": gpu_window, "gpu-decode": gpu_decode, "gpu-first": gpu_first, "topk": topk,
           "modifiers": modifiers}


def case_from_row(row: dict) -> Case:
    """The case of a result row (rows carry the case's fields, window as a list)."""
    fields = {k: v for k, v in row.items() if k in Case.__dataclass_fields__}
    if fields.get("window") is not None:
        fields["window"] = tuple(fields["window"])
    return Case(**fields)


# ---------------------------------------------------------------------------------------
# memory presets: one shape, growing length, so the growth exponent can be read off


def memory_quick(device: str) -> Preset:
    if device == "cuda":
        cases = grid(["bfloat16"], [128], [(1, 16, 16)], _squares([1024, 2048, 4096, 8192]), [(False, None)],
                     ["fwd", "fwd+bwd"])
    else:
        cases = grid(["float32"], [64], [(1, 8, 8)], _squares([256, 512, 1024, 2048]), [(False, None)],
                     ["fwd", "fwd+bwd"])
    exclude = {}
    if device == "cpu":
        exclude["flex"] = "FlexAttention on CPU compiles every shape with Inductor (seconds each); run --standard"
    return Preset("quick", cases, budget_s=0, min_reps=1, max_reps=1, warmup_s=0, exclude=exclude)


def memory_standard(device: str) -> Preset:
    if device == "cuda":
        lengths, dtype, d, h = [1024, 2048, 4096, 8192, 16384, 32768], "bfloat16", 128, 16
    else:
        lengths, dtype, d, h = [256, 512, 1024, 2048, 4096], "float32", 64, 8
    cases = grid([dtype], [d], [(1, h, h)], _squares(lengths), [(False, None), (True, (256, 0))],
                 ["fwd", "fwd+bwd"])
    return Preset("standard", cases, budget_s=0, min_reps=1, max_reps=1, warmup_s=0)


def memory_topk(device: str) -> Preset:
    """Top-k attention's memory against growing length (top_k 64, and the dense case alongside)."""
    lengths = [1024, 2048, 4096, 8192] if device == "cuda" else [512, 1024, 2048, 4096]
    cases = [Case("float32", 1, 4, 4, n, n, 64, mode=mode, top_k=k) for k in (64, None) for mode in ("fwd", "fwd+bwd")
             for n in lengths]
    return Preset("topk", cases, budget_s=0, min_reps=1, max_reps=1, warmup_s=0,
                  exclude={"flex": "FlexAttention on CPU compiles every shape with Inductor (seconds each)"})


MEMORY_PRESETS = {"quick": memory_quick, "standard": memory_standard, "topk": memory_topk}
