"""Timing: warm-up, round-robin repetitions, medians, rotating buffers, matmul peak.

* CUDA: CUDA events around each sample (a sample is ``inner`` back-to-back calls when one
  call is too short for the events' resolution), or one CUDA-graph replay per sample.
* CPU: ``time.perf_counter_ns`` around each call.

The backends of one case are timed round-robin (one sample of each per round), so a
neighbour's load on a shared machine slows them alike and the ratios stay fair. Each call
reads the next of ``n`` input sets whose total size exceeds twice the cache (L2 on a GPU,
the last-level cache on a CPU), so no call finds its inputs hot from the previous one.
"""

from __future__ import annotations

import glob
import math
import os
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .cases import Case
from .subjects import Fn

MAX_INPUT_SETS = 16


@dataclass
class TimingSettings:
    budget_s: float = 1.0  # measuring time per case, shared by its backends
    min_reps: int = 5
    max_reps: int = 100
    warmup_s: float = 0.1
    rotate: bool = True
    cuda_graph: bool = False
    min_sample_s: float = 5e-4  # CUDA: batch calls into samples at least this long


@dataclass
class Stats:
    median_s: float
    min_s: float
    mean_s: float
    iqr_s: float
    reps: int
    first_call_s: float
    timer: str
    input_sets: int
    note: str = ""

    @staticmethod
    def of(samples: Sequence[float], first_call_s: float, timer: str, input_sets: int, note: str = "") -> "Stats":
        ordered = sorted(samples)
        q1, _, q3 = statistics.quantiles(ordered, n=4) if len(ordered) >= 2 else (ordered[0],) * 3
        return Stats(statistics.median(ordered), ordered[0], statistics.fmean(ordered), q3 - q1, len(ordered),
                     first_call_s, timer, input_sets, note)


# ---------------------------------------------------------------------------------------
# caches and input sets


def _parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * scale


def cache_bytes(device: str) -> int:
    """L2 of the GPU, or the largest CPU cache (sysfs); 32 MiB where neither can be read."""
    if device == "cuda":
        size = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0)
        return int(size) or (50 << 20)
    largest = 0
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(os.path.join(index, "size")) as f:
                largest = max(largest, _parse_size(f.read()))
        except (OSError, ValueError):
            continue
    return largest or (32 << 20)


def _shape(layout: str, batch: int, heads: int, length: int, dim: int):
    return (batch, heads, length, dim) if layout == "bhld" else (batch, length, heads, dim)


def input_set_bytes(case: Case) -> int:
    elems = case.batch * (case.heads_q * case.len_q * (case.head_dim + case.head_dim_v)
                          + case.heads_kv * case.len_k * (case.head_dim + case.head_dim_v))
    return elems * torch.empty((), dtype=case.torch_dtype).element_size()


def input_set_count(case: Case, device: str, rotate: bool) -> int:
    if not rotate:
        return 1
    return max(1, min(MAX_INPUT_SETS, math.ceil(2 * cache_bytes(device) / max(1, input_set_bytes(case)))))


def make_input_sets(case: Case, layout: str, device: str, count: int) -> List[List[torch.Tensor]]:
    """``count`` independent [q, k, v, grad_out] sets (grad_out None for "fwd")."""
    dtype, grad = case.torch_dtype, case.mode != "fwd"
    shapes = [
        _shape(layout, case.batch, case.heads_q, case.len_q, case.head_dim),
        _shape(layout, case.batch, case.heads_kv, case.len_k, case.head_dim),
        _shape(layout, case.batch, case.heads_kv, case.len_k, case.head_dim_v),
        _shape(layout, case.batch, case.heads_q, case.len_q, case.head_dim_v),
    ]
    first = [torch.randn(s, device=device, dtype=torch.float32).to(dtype) for s in shapes]
    sets = []
    for i in range(count):
        tensors = first if i == 0 else [t.clone() for t in first]  # same values, different memory
        q, k, v, g = tensors
        sets.append([q.requires_grad_(grad), k.requires_grad_(grad), v.requires_grad_(grad), g if grad else None])
    return sets


# ---------------------------------------------------------------------------------------
# runners: one timed unit of work per mode


@dataclass
class Runner:
    """Calls ``fn`` for ``mode`` on rotating input sets. ``prepare(i)`` is untimed, ``run(i)`` timed."""

    fn: Fn
    mode: str
    sets: List[List[torch.Tensor]]
    _pending: Dict[int, torch.Tensor] = field(default_factory=dict)

    def prepare(self, i: int) -> None:
        if self.mode == "bwd":  # the forward that the timed backward differentiates
            q, k, v, _ = self.sets[i % len(self.sets)]
            self._pending[i % len(self.sets)] = self.fn(q, k, v)

    def run(self, i: int):
        q, k, v, g = self.sets[i % len(self.sets)]
        if self.mode == "fwd":
            return self.fn(q, k, v)
        out = self._pending.pop(i % len(self.sets)) if self.mode == "bwd" else self.fn(q, k, v)
        return torch.autograd.grad(out, (q, k, v), g)

    def once(self, i: int = 0):
        self.prepare(i)
        return self.run(i)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _warm_up(runner: Runner, device: str, warmup_s: float):
    """Returns (first call seconds, estimated seconds per call)."""
    _sync(device)
    start = time.perf_counter()
    runner.once(0)
    _sync(device)
    first = time.perf_counter() - start
    calls, start = 0, time.perf_counter()
    while calls < 2 or (time.perf_counter() - start < warmup_s and calls < 1000):
        runner.once(calls + 1)
        _sync(device)  # else a GPU queue could fill with far more work than warmup_s
        calls += 1
    return first, (time.perf_counter() - start) / calls


def _graph_for(runner: Runner):
    """A CUDA graph of one forward per input set; None plus the reason when capture fails."""
    if runner.mode != "fwd":
        return None, "CUDA graphs time the forward only; events used"
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for i in range(len(runner.sets)):
                runner.run(i)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(len(runner.sets)):
                runner.run(i)
        graph.replay()
        torch.cuda.synchronize()
        return graph, ""
    except Exception as exc:  # capture is refused by many ops; fall back, say why
        torch.cuda.synchronize()
        return None, f"CUDA graph capture failed ({type(exc).__name__}: {str(exc).splitlines()[0][:80]}); events used"


def measure(runners: Dict[str, Runner], device: str, settings: TimingSettings,
            on_error: Callable[[str, BaseException, Sequence], None]) -> Dict[str, Stats]:
    """Time every runner round-robin. A runner that raises is reported to ``on_error`` (with the
    warnings it raised while warming up) and dropped."""
    live = dict(runners)
    first, estimate = {}, {}
    for name, runner in list(live.items()):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # torch says why a pinned SDPA kernel refused only in warnings
            try:
                first[name], estimate[name] = _warm_up(runner, device, settings.warmup_s)
            except Exception as exc:
                on_error(name, exc, caught)
                del live[name]
    if not live:
        return {}

    graphs, notes, inner = {}, {}, {}
    for name, runner in live.items():
        inner[name] = 1
        if device == "cuda" and settings.cuda_graph:
            graphs[name], notes[name] = _graph_for(runner)
            if graphs[name] is None:
                del graphs[name]
        if device == "cuda" and name not in graphs and runner.mode == "fwd":
            inner[name] = max(1, math.ceil(settings.min_sample_s / max(estimate[name], 1e-9)))

    per_round = sum(estimate.values())
    rounds = int(max(settings.min_reps, min(settings.max_reps, settings.budget_s / max(per_round, 1e-9))))
    samples: Dict[str, List] = {name: [] for name in live}
    calls = {name: 0 for name in live}
    for _ in range(rounds):
        for name in list(live):
            runner = live[name]
            try:
                samples[name].append(_sample(runner, device, graphs.get(name), inner[name], calls[name]))
            except Exception as exc:
                on_error(name, exc, ())
                del live[name]
                continue
            calls[name] += inner[name]
    _sync(device)

    stats = {}
    for name in live:
        if device == "cuda":
            per_call = len(live[name].sets) if name in graphs else inner[name]
            values = [start.elapsed_time(end) / 1e3 / per_call for start, end in samples[name]]
            timer = "cuda-graph" if name in graphs else "cuda-events"
        else:
            values, timer = samples[name], "perf_counter"
        stats[name] = Stats.of(values, first[name], timer, len(live[name].sets), notes.get(name, ""))
    return stats


def _sample(runner: Runner, device: str, graph, inner: int, call: int):
    if device == "cuda":
        runner.prepare(call)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        if graph is not None:
            graph.replay()
        else:
            for j in range(inner):
                runner.run(call + j)
        end.record()
        return start, end
    runner.prepare(call)
    t0 = time.perf_counter_ns()
    runner.run(call)
    return (time.perf_counter_ns() - t0) * 1e-9


# ---------------------------------------------------------------------------------------
# the device's matmul peak, measured in the same run


def matmul_peak_tflops(dtype: torch.dtype, device: str, max_n: int = 8192, target_s: float = 0.05,
                       reps: int = 5, start_n: int = 256) -> Dict[str, float]:
    """Best TFLOP/s of an n x n x n matmul, n doubled from ``start_n`` until one call takes ``target_s``.

    Growing n from small keeps this short where a dtype is slow (float16 GEMM on many CPUs
    runs at well under 1 GFLOP/s).
    """
    n = start_n
    while True:
        a = torch.randn(n, n, device=device, dtype=torch.float32).to(dtype)
        b = torch.randn(n, n, device=device, dtype=torch.float32).to(dtype)
        elapsed = best_time_s(lambda: torch.matmul(a, b), device, 1)
        if elapsed >= target_s or n >= max_n:
            break
        n *= 2
    best = best_time_s(lambda: torch.matmul(a, b), device, reps)
    return {"n": n, "tflops": 2.0 * n ** 3 / best / 1e12}


def best_time_s(fn: Callable[[], object], device: str, reps: int) -> float:
    """Fastest of ``reps`` single calls after one untimed call (CUDA events on a GPU)."""
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter_ns()
            fn()
            best = min(best, (time.perf_counter_ns() - t0) * 1e-9)
    return best


# ---------------------------------------------------------------------------------------
# memory bandwidth: a copy measured in the same run, and the card's nominal figure

# Nominal HBM bandwidth in GB/s (NVIDIA datasheets), by a fragment of torch's device name;
# the first fragment found in the name wins, so the more specific ones come first. None:
# the name does not tell the memory configuration.
NOMINAL_HBM_GBPS = (
    ("H100 PCIe", 2000.0), ("H100 NVL", 3900.0), ("H100", 3350.0),  # "NVIDIA H100 80GB HBM3" is the SXM part
    ("GH200", None), ("H200", 4800.0),
    ("A100-PCIE-40GB", 1555.0), ("A100-SXM4-40GB", 1555.0), ("A100 80GB PCIe", 1935.0), ("A100-SXM4-80GB", 2039.0),
)


def nominal_bandwidth_gbps(device_name: str) -> Optional[float]:
    """The card's nominal HBM bandwidth in GB/s, None where unknown."""
    for fragment, gbps in NOMINAL_HBM_GBPS:
        if fragment in device_name:
            return gbps
    return None


def copy_bandwidth_gbps(device: str, nbytes: Optional[int] = None, reps: int = 5) -> float:
    """Best GB/s of ``dst.copy_(src)`` over ``nbytes`` (default 1 GiB on a GPU, 64 MiB on a CPU,
    both well past the caches), counting bytes read plus bytes written: what the memory
    sustains in a plain stream, the yardstick for a kernel that only reads."""
    nbytes = nbytes or ((1 << 30) if device == "cuda" else (64 << 20))
    src = torch.empty(nbytes // 2, dtype=torch.int16, device=device).random_()
    dst = torch.empty_like(src)
    best = best_time_s(lambda: dst.copy_(src), device, reps)
    return 2 * src.numel() * src.element_size() / best / 1e9
