"""Figures derived from a sweep's rows after the measurements: ratios to the baselines, the
bandwidth of decoding cases, and the growth of time with sequence length.

* ``add_ratios``: every ok row gets ``pct_peak`` (of the matmul peak measured in the run) and
  ``speedup`` (the run's baseline time / this time). attnkern's rows also get ``speedups``
  (every other subject timed on the case, and "sdpa-fastest") and ``sdpa_fastest`` (which of
  torch's fused kernels was fastest on that case).
* ``add_bandwidth``: forward rows with at most DECODE_MAX_LEN_Q query rows over more keys
  (decoding, where reading K and V is the whole cost) get ``kv_bytes``, ``kv_gbps`` and that as a share of
  the copy bandwidth measured in the run and of the card's nominal HBM figure.
* ``linearity``: per series of windowed cases differing only in L = S, and per backend: time
  at each L, time per query row, and the least-squares exponent of time against L (1: linear).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from .cases import Case, case_from_row
from .memory import fit_exponent

SDPA_FASTEST = "sdpa-fastest"
SDPA_FUSED = ("sdpa-flash", "sdpa-efficient", "sdpa-cudnn")  # the kernels "sdpa-fastest" picks from
DECODE_MAX_LEN_Q = 16  # the split-KV (flash-decoding) regime of the CUDA backend issue


def case_key(row: dict) -> tuple:
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in row.items()
                 if k in Case.__dataclass_fields__)


def _ok_by_case(rows: Sequence[dict]) -> Dict[tuple, List[dict]]:
    groups: Dict[tuple, List[dict]] = {}
    for row in rows:
        if row["status"] == "ok":
            groups.setdefault(case_key(row), []).append(row)
    return groups


def add_ratios(rows: List[dict], baseline: Optional[str], peaks: Dict[str, float]) -> None:
    for group in _ok_by_case(rows).values():
        times = {r["backend"]: r["time_ms"] for r in group}
        fused = {name: t for name, t in times.items() if name in SDPA_FUSED}
        fastest = min(fused, key=fused.get) if fused else None
        if fastest:
            times[SDPA_FASTEST] = fused[fastest]
        base = times.get(baseline)
        for row in group:
            peak = peaks.get(row["dtype"])
            row["pct_peak"] = 100.0 * row["tflops"] / peak if peak else None
            row["speedup"] = base / row["time_ms"] if base else None
            if row["backend"].startswith("attnkern-"):
                row["speedups"] = {name: t / row["time_ms"] for name, t in times.items() if name != row["backend"]}
                row["sdpa_fastest"] = fastest


def is_decode(case: Case) -> bool:
    """A forward of a few query rows over a longer key sequence (a KV cache)."""
    return case.mode == "fwd" and case.len_q <= DECODE_MAX_LEN_Q < case.len_k


def add_bandwidth(rows: List[dict], copy_gbps: Optional[float], nominal_gbps: Optional[float]) -> None:
    for row in rows:
        case = case_from_row(row)
        if row["status"] != "ok" or not is_decode(case):
            continue
        nbytes = case.kv_bytes()
        gbps = nbytes / (row["time_ms"] * 1e-3) / 1e9
        row.update(kv_bytes=nbytes, kv_gbps=gbps,
                   pct_copy_bw=100.0 * gbps / copy_gbps if copy_gbps else None,
                   pct_nominal_bw=100.0 * gbps / nominal_gbps if nominal_gbps else None)


def linearity(rows: Sequence[dict]) -> List[dict]:
    series: Dict[tuple, Dict[int, float]] = {}
    labels: Dict[tuple, str] = {}
    for row in rows:
        if row["status"] != "ok":
            continue
        case = case_from_row(row)
        if case.window is None or case.len_q != case.len_k:
            continue
        key = (case.series_key(), row["backend"])
        series.setdefault(key, {})[case.len_q] = row["time_ms"]
        labels[key] = case.series_label()
    out = []
    for key, times in series.items():
        if len(times) < 2:
            continue
        lengths = sorted(times)
        ms = [times[n] for n in lengths]
        out.append({"series": labels[key], "backend": key[1], "lengths": lengths, "time_ms": ms,
                    "us_per_row": [t * 1e3 / n for t, n in zip(ms, lengths)], "exponent": fit_exponent(lengths, ms),
                    "time_ratio": ms[-1] / ms[0], "length_ratio": lengths[-1] / lengths[0]})
    return out
