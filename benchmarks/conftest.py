"""Shared machinery of the pytest-benchmark suite (``pytest benchmarks/ --benchmark-only``).

The suite times the same cases, subjects and FLOP accounting as ``attnkern bench``
(attnkern.bench); pytest-benchmark does the timing, storage and ``--benchmark-compare``.
CI does not run it (pyproject's testpaths is ``tests``).

Fixtures for benchmark files:

* ``attention_benchmark(case, subject, baseline=None) -> dict``: times one subject
  ("attnkern-cpu", "sdpa-flash", ... as listed by ``attnkern bench --list``) on one
  :class:`attnkern.bench.cases.Case`, skipping with the subject's reason where it cannot
  serve the case. Fills ``extra_info`` with the case, ``flops``, ``tflops`` (from the
  median), ``pct_peak`` (of a matmul timed in this session) and, when ``baseline`` was timed
  on the same case earlier in the session, ``speedup_vs_<baseline>`` (baseline median / this
  median). Returns that ``extra_info``.
* ``bench_device``: "cuda" when available, else "cpu" (ATTNKERN_BENCH_DEVICE overrides;
  bench_grid.py holds the grid helpers that parametrize the files).
* ``speedups``: the session's medians, for a test that wants to assert nothing but report
  a ratio: ``speedups.ratio(case, "attnkern-cpu", "sdpa-flash")``.

Speed-ups missing at test time (the baseline ran later) are filled into the JSON output
(``--benchmark-json``/``--benchmark-save``) by ``pytest_benchmark_update_json`` and shown in
the terminal summary.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import pytest
import torch

from attnkern.bench import cases as bench_cases
from attnkern.bench.cases import Case
from attnkern.bench.subjects import all_subjects, default_baseline
from attnkern.bench.sweep import available_memory, failure_status, skip_reason
from attnkern.bench.timing import Runner, input_set_count, make_input_sets, matmul_peak_tflops
from bench_grid import PRESET, device

class Speedups:
    """Medians of this session per (case, subject)."""

    def __init__(self):
        self.medians: Dict[Tuple[Case, str], float] = {}

    def record(self, case: Case, subject: str, median_s: float) -> None:
        self.medians[(case, subject)] = median_s

    def ratio(self, case: Case, subject: str, baseline: str) -> Optional[float]:
        base, this = self.medians.get((case, baseline)), self.medians.get((case, subject))
        return base / this if base and this else None


_SPEEDUPS = Speedups()
_PEAKS: Dict[str, float] = {}


@pytest.fixture(scope="session")
def bench_device() -> str:
    return device()


@pytest.fixture(scope="session")
def speedups() -> Speedups:
    return _SPEEDUPS


def _peak(dtype: str) -> float:
    if dtype not in _PEAKS:
        _PEAKS[dtype] = matmul_peak_tflops(bench_cases.DTYPES[dtype], device())["tflops"]
    return _PEAKS[dtype]


@pytest.fixture
def attention_benchmark(benchmark, bench_device, speedups):
    preset = bench_cases.PRESETS[PRESET](bench_device)

    def run(case: Case, subject_name: str, baseline: Optional[str] = None) -> dict:
        subject = all_subjects()[subject_name]
        reason = skip_reason(subject, case, bench_device, preset.exclude, available_memory(bench_device) // 2)
        if reason:
            pytest.skip(reason)
        fn = subject.build(case, bench_device)
        runner = Runner(fn, case.mode, make_input_sets(case, subject.layout, bench_device,
                                                       input_set_count(case, bench_device, rotate=True)))
        try:
            runner.once(0)  # compile / lazy init outside the timing
        except Exception as exc:
            if failure_status(exc) == "skip":
                pytest.skip(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            raise
        calls = iter(range(1, 1 << 30))
        sync = torch.cuda.synchronize if bench_device == "cuda" else (lambda: None)

        def setup():
            i = next(calls)
            runner.prepare(i)  # the untimed forward of a "bwd" case
            sync()
            return (i,), {}

        def target(i):
            runner.run(i)
            sync()

        benchmark.pedantic(target, setup=setup, rounds=max(preset.min_reps, 10), warmup_rounds=1)
        median = benchmark.stats.stats.median
        speedups.record(case, subject_name, median)
        flops = case.flops()
        info = benchmark.extra_info
        info.update(case.to_dict(), backend=subject_name, device=bench_device, flops=flops,
                    tflops=flops / median / 1e12, pct_peak=100.0 * flops / median / 1e12 / _peak(case.dtype))
        if baseline and baseline != subject_name:
            ratio = speedups.ratio(case, subject_name, baseline)
            if ratio is not None:
                info[f"speedup_vs_{baseline}"] = ratio
        return info

    return run


def _case_of(info: dict) -> Optional[Case]:
    try:
        return bench_cases.case_from_row(info)
    except (TypeError, ValueError):
        return None


def pytest_benchmark_update_machine_info(config, machine_info):
    """Results get committed: keep the host name out of them, name the torch build instead."""
    machine_info.pop("node", None)
    machine_info["torch"] = torch.__version__
    machine_info["bench_device"] = device()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Speed-ups vs the default baseline for every entry, whichever order the tests ran in."""
    names = [b["extra_info"].get("backend") for b in output_json.get("benchmarks", [])]
    base = default_baseline(device(), [n for n in names if n])
    for bench in output_json.get("benchmarks", []):
        info = bench.get("extra_info", {})
        case = _case_of(info)
        if case is None or not base or info.get("backend") == base:
            continue
        ratio = _SPEEDUPS.ratio(case, info["backend"], base)
        if ratio is not None:
            info[f"speedup_vs_{base}"] = ratio


def pytest_terminal_summary(terminalreporter):
    if not _SPEEDUPS.medians:
        return
    names = sorted({s for _, s in _SPEEDUPS.medians})
    base = default_baseline(device(), names)
    rows = []
    for (case, subject), median in _SPEEDUPS.medians.items():
        ratio = _SPEEDUPS.ratio(case, subject, base) if subject != base else None
        rows.append((case.label(), subject, median * 1e3, ratio))
    terminalreporter.section(f"attnkern: medians and speed-ups vs {base}")
    for label, subject, ms, ratio in rows:
        shown = f"{ratio:6.2f}x" if ratio else "       "
        terminalreporter.write_line(f"{label:55s} {subject:15s} {ms:10.3f} ms {shown}")
