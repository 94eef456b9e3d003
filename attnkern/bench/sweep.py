"""One sweep: every case against every selected subject, skipped with a reason where it cannot run.

Nothing a subject does stops the sweep: a subject that cannot serve a case is skipped
with the reason its ``limits`` (for attnkern: the capability table) give; one that raises
anyway is recorded as an error with the exception's message.
"""

from __future__ import annotations

import warnings
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .cases import Case
from .subjects import Subject
from .timing import Runner, TimingSettings, input_set_count, make_input_sets, measure

SCORE_BYTES = 4  # materialising kernels keep fp32 (or wider) scores
SCORE_COPIES = {"fwd": 3, "bwd": 6, "fwd+bwd": 6}  # scores, probabilities, temporaries / their gradients


def available_memory(device: str) -> int:
    if device == "cuda":
        return int(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def score_memory(case: Case) -> int:
    """Rough bytes a backend that materialises the scores needs for this case."""
    return case.batch * case.heads_q * case.len_q * case.len_k * SCORE_BYTES * SCORE_COPIES[case.mode]


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def skip_reason(subject: Subject, case: Case, device: str, excluded: Dict[str, str], max_memory: int) -> Optional[str]:
    """Why ``subject`` sits ``case`` out, or None: excluded by the preset, unable, or too big."""
    reason = excluded.get(subject.name) or subject.why_not(case, device)
    if reason is None and subject.materialises_scores and score_memory(case) > max_memory:
        reason = f"materialises the L x S scores: ~{_gib(score_memory(case))} > memory limit {_gib(max_memory)}"
    return reason


def failure_status(exc: BaseException) -> str:
    """"skip" when the library says the case is unsupported, "error" for anything else."""
    if isinstance(exc, NotImplementedError) or "No viable backend" in str(exc):
        return "skip"
    return "error"


def _error_reason(exc: BaseException, caught: Sequence) -> str:
    text = str(exc).strip().splitlines()
    reason = f"{type(exc).__name__}: {text[0] if text else ''}"
    # torch explains "No viable backend" only in warnings: keep their first lines
    details = []
    for w in caught:
        line = str(w.message).strip().splitlines()[0] if str(w.message).strip() else ""
        if line and line not in details and "flex_attention called without torch.compile" not in line:
            details.append(line)
    if details:
        reason += " [" + "; ".join(details[:3]) + "]"
    return reason[:400]


def _result(case: Case, subject: str, status: str, reason: str = "", **fields) -> dict:
    row = case.to_dict()
    row.update(backend=subject, status=status, reason=reason, flops=case.flops())
    row.update(fields)
    return row


def _reference(case: Case, q, k, v) -> torch.Tensor:
    """The float64 oracle on the first input set (torch layout)."""
    from ..functional import scaled_dot_product_attention

    with torch.no_grad():
        return scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=case.causal,
                                            enable_gqa=case.gqa, window_size=case.window, backend="math")


def _torch_layout(layout: str, tensors):
    return [t.transpose(1, 2) if layout == "blhd" else t for t in tensors]


def _forward_error(fn, layout: str, ref: torch.Tensor, inputs) -> float:
    """Relative norm error of the subject's forward against the float64 oracle."""
    with torch.no_grad():
        out = fn(*(t.detach() for t in inputs))
    out = _torch_layout(layout, [out])[0].double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def run_case(case: Case, subjects: Sequence[Subject], device: str, settings: TimingSettings,
             excluded: Dict[str, str], max_memory: int, check: bool) -> List[dict]:
    rows: Dict[str, dict] = {}
    fns = {}
    for subject in subjects:
        reason = skip_reason(subject, case, device, excluded, max_memory)
        if reason is None:
            try:
                fns[subject.name] = subject.build(case, device)
            except Exception as exc:
                reason = f"could not be set up: {_error_reason(exc, [])}"
        if reason is not None:
            rows[subject.name] = _result(case, subject.name, "skip", reason)

    by_name = {s.name: s for s in subjects}
    if fns:
        count = input_set_count(case, device, settings.rotate)
        layouts = {by_name[name].layout for name in fns}
        sets = {layout: make_input_sets(case, layout, device, count) for layout in layouts}
        runners = {name: Runner(fn, case.mode, sets[by_name[name].layout]) for name, fn in fns.items()}

        def on_error(name: str, exc: BaseException, caught: Sequence = ()) -> None:
            rows[name] = _result(case, name, failure_status(exc), _error_reason(exc, caught))

        stats = measure(runners, device, settings, on_error)
        refs = {}
        if check and stats:
            for layout, layout_sets in sets.items():
                q, k, v = _torch_layout(layout, layout_sets[0][:3])
                refs[layout] = _reference(case, q, k, v)
        for name, st in stats.items():
            flops = case.flops()
            row = _result(case, name, "ok", st.note, time_ms=st.median_s * 1e3, time_ms_min=st.min_s * 1e3,
                          time_ms_mean=st.mean_s * 1e3, time_ms_iqr=st.iqr_s * 1e3, reps=st.reps,
                          first_call_ms=st.first_call_s * 1e3, timer=st.timer, input_sets=st.input_sets,
                          tflops=flops / st.median_s / 1e12)
            if refs:
                layout = by_name[name].layout
                try:
                    row["error"] = _forward_error(fns[name], layout, refs[layout], sets[layout][0][:3])
                except Exception as exc:
                    row["error"] = None
                    row["reason"] = (row["reason"] + "; " if row["reason"] else "") + f"check failed: {exc}"
            rows[name] = row
    return [rows[s.name] for s in subjects if s.name in rows]


def add_ratios(rows: List[dict], baseline: Optional[str], peaks: Dict[str, float]) -> None:
    """Fill ``pct_peak`` (of the same run's matmul peak for the dtype) and ``speedup`` vs ``baseline``."""
    base_time = {}
    for row in rows:
        if row["backend"] == baseline and row["status"] == "ok":
            base_time[case_key(row)] = row["time_ms"]
    for row in rows:
        if row["status"] != "ok":
            continue
        peak = peaks.get(row["dtype"])
        row["pct_peak"] = 100.0 * row["tflops"] / peak if peak else None
        base = base_time.get(case_key(row))
        row["speedup"] = base / row["time_ms"] if base else None


def case_key(row: dict) -> tuple:
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in row.items()
                 if k in Case.__dataclass_fields__)


def run_sweep(cases: Sequence[Case], subjects: Sequence[Subject], device: str, settings: TimingSettings,
              excluded: Optional[Dict[str, str]] = None, max_memory: Optional[int] = None, check: bool = False,
              progress: Optional[Callable[[str], None]] = None) -> List[dict]:
    excluded = excluded or {}
    max_memory = max_memory if max_memory is not None else available_memory(device) // 2
    rows = []
    for case in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # per-call warnings would tear the progress bar
            rows += run_case(case, subjects, device, settings, excluded, max_memory, check)
        if progress:
            progress(case.label())
    return rows
