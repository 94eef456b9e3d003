"""Peak memory of one call beyond what it must return, and how that grows with length.

* CUDA: ``torch.cuda.max_memory_allocated`` after resetting the peak, minus what was
  allocated before the call.
* CPU: the torch profiler's memory events (``profile_memory=True``): every allocation and
  free of torch's CPU allocator in order; the peak of their running sum is the call's peak.

The "extra" memory is that peak minus the storage the call returns (the output, and the
gradients for fwd+bwd): the workspace, saved activations and temporaries. Memory taken
outside torch's allocator is not seen: on the CPU that is attnkern's per-thread scratch
(std::aligned_alloc, a few blocks of block_q x block_k floats per thread, constant in L)
and any library-internal buffers (e.g. oneDNN's).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import tempfile
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .cases import Case, case_from_row
from .subjects import Subject
from .sweep import _error_reason, available_memory, failure_status, skip_reason
from .timing import make_input_sets


def storage_bytes(tensors: Sequence[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one buffer count once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def allocation_peak(deltas: Sequence[int]) -> int:
    """Peak of the running sum of allocation (+) and free (-) sizes, from a zero start."""
    live = peak = 0
    for d in deltas:
        live += d
        peak = max(peak, live)
    return peak


def _cpu_allocation_deltas(prof) -> List[int]:
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
    events.sort(key=lambda e: e.start_ns())
    return [int(e.nbytes()) for e in events]


def call_peak(fn: Callable[[], Sequence[torch.Tensor]], device: str) -> Tuple[int, int]:
    """(peak bytes allocated during ``fn()`` above the start, bytes of the storages it returns)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        kept = fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start, storage_bytes(kept)
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings(), _without_profiler_log():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            kept = fn()
    return allocation_peak(_cpu_allocation_deltas(prof)), storage_bytes(kept)


_PROFILER_LOG_LINE = re.compile(rb"^[A-Z]+:\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \d+:\d+ \S+\.cpp:\d+\]")


@contextlib.contextmanager
def _without_profiler_log():
    """Kineto writes start/stop lines to fd 2 on every profile (KINETO_LOG_LEVEL does not
    silence them here); capture fd 2 meanwhile and pass on every other line."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().splitlines(keepends=True) if not _PROFILER_LOG_LINE.match(line)]
            if kept:
                sys.stderr.buffer.write(b"".join(kept))
                sys.stderr.flush()


def _workload(fn, mode: str, sets) -> Callable[[], Sequence[torch.Tensor]]:
    q, k, v, g = sets[0]
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return [fn(q, k, v)]
    else:
        def run():
            out = fn(q, k, v)
            return [out, *torch.autograd.grad(out, (q, k, v), g)]
    return run


def measure_case(case: Case, subject: Subject, device: str, max_memory: int, snapshot: Optional[str] = None,
                 excluded: Optional[Dict[str, str]] = None) -> dict:
    row = case.to_dict()
    row.update(backend=subject.name, status="skip", reason="")
    reason = skip_reason(subject, case, device, excluded or {}, max_memory)
    if reason:
        row["reason"] = reason
        return row
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn = subject.build(case, device)
            run = _workload(fn, case.mode, make_input_sets(case, subject.layout, device, 1))
            run()  # warm-up: lazy initialisation and compilation are not the call's memory
        if snapshot and device == "cuda":
            torch.cuda.memory._record_memory_history(max_entries=100000)
        peak, kept = call_peak(run, device)
        if snapshot and device == "cuda":
            torch.cuda.memory._dump_snapshot(snapshot)
            torch.cuda.memory._record_memory_history(enabled=None)
            row["snapshot"] = snapshot
    except Exception as exc:
        row.update(status=failure_status(exc), reason=_error_reason(exc, caught))
        return row
    row.update(status="ok", peak_bytes=peak, output_bytes=kept, extra_bytes=max(0, peak - kept))
    return row


def fit_exponent(lengths: Sequence[float], values: Sequence[float]) -> Optional[float]:
    """Least-squares slope of log(value) against log(length): 1 for O(L), 2 for O(L^2)."""
    points = [(math.log(n), math.log(v)) for n, v in zip(lengths, values) if n > 0 and v > 0]
    if len(points) < 2 or len({x for x, _ in points}) < 2:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in points)
    return sxy / sxx


def growth_label(exponent: Optional[float]) -> str:
    if exponent is None:
        return "n/a"
    order = max(0, round(exponent))
    return {0: "O(1)", 1: "O(L)", 2: "O(L^2)"}.get(order, f"O(L^{order})")


def fits(rows: Sequence[dict]) -> List[dict]:
    """Growth exponent of extra memory per (backend, series of cases differing only in length)."""
    groups: Dict[Tuple[str, str], List[Tuple[int, int]]] = {}
    for row in rows:
        if row["status"] == "ok":
            series = case_from_row(row).series_label()
            groups.setdefault((row["backend"], series), []).append((row["len_q"], row["extra_bytes"]))
    out = []
    for (backend, series), points in groups.items():
        points.sort()
        exponent = fit_exponent([n for n, _ in points], [b for _, b in points])
        out.append({"backend": backend, "series": series, "lengths": [n for n, _ in points],
                    "extra_bytes": [b for _, b in points], "exponent": exponent, "growth": growth_label(exponent)})
    return out


def run_memory(cases: Sequence[Case], subjects: Sequence[Subject], device: str,
               excluded: Optional[Dict[str, str]] = None, max_memory: Optional[int] = None,
               snapshot_dir: Optional[str] = None, progress: Optional[Callable[[str], None]] = None,
               partial: Optional[Callable[[List[dict]], None]] = None) -> List[dict]:
    """Rows of every case; ``partial(rows so far)`` after each case (to save a run that may be cut short)."""
    excluded = excluded or {}
    max_memory = max_memory if max_memory is not None else available_memory(device) // 2
    rows = []
    for case in cases:
        for subject in subjects:
            snapshot = None
            if snapshot_dir and device == "cuda":
                os.makedirs(snapshot_dir, exist_ok=True)
                snapshot = os.path.join(snapshot_dir, f"{subject.name}-{case.mode}-L{case.len_q}.pickle")
            rows.append(measure_case(case, subject, device, max_memory, snapshot, excluded))
        if partial:
            partial(rows)
        if progress:
            progress(case.label())
    return rows
