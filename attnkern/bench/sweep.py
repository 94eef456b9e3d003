"""One sweep: every case against every selected subject, skipped with a reason where it cannot run.

Nothing a subject does stops the sweep: a subject that cannot serve a case is skipped
with the reason its ``limits`` (for attnkern: the capability table) give; one that raises
anyway is recorded as an error with the exception's message.
"""

from __future__ import annotations

import warnings
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..reference import relative_error
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


CHECK_SCORE_BYTES = 512 << 20  # float64 scores of the reference per batch entry; it holds several such tensors
CHECK_MIN_ROWS = 16


def check_rows(case: Case) -> Optional[torch.Tensor]:
    """Query rows the correctness check compares: all (None) while the float64 reference's
    (H, rows, S) scores of one batch entry fit CHECK_SCORE_BYTES, else evenly spaced rows, first
    and last included. A query row's output depends on its own row only, so the reference on a
    subset of rows is exact for those rows."""
    per_row = case.heads_q * case.len_k * 8
    if per_row * case.len_q <= CHECK_SCORE_BYTES:
        return None
    count = min(case.len_q, max(CHECK_MIN_ROWS, CHECK_SCORE_BYTES // per_row))
    return torch.linspace(0, case.len_q - 1, count).round().long().unique()


def _rows(t: torch.Tensor, rows: Optional[torch.Tensor]) -> torch.Tensor:
    return t if rows is None else t[:, :, rows.to(t.device)]


def check_grad_out(case: Case, rows: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Output gradient of the check, torch layout: random on the checked rows, zero elsewhere,
    so that dK and dV of the full problem equal those of the reference on the checked rows."""
    shape = (case.batch, case.heads_q, case.len_q, case.head_dim_v)
    grad = torch.randn(shape, device=like.device, dtype=torch.float32)
    if rows is not None:
        keep = torch.zeros(case.len_q, dtype=torch.bool, device=like.device)
        keep[rows.to(like.device)] = True
        grad = grad * keep.view(1, 1, -1, 1)
    return grad.to(like.dtype)


def _band_rows(case: Case, rows: Optional[torch.Tensor], device) -> Optional[torch.Tensor]:
    """The band of query rows ``rows`` (all when None) as a boolean (1, 1, rows, S) mask."""
    from .._semantics import band_mask

    if not case.causal and case.window is None:
        return None
    left, right = case.band
    if rows is None:
        mask = band_mask(case.len_q, case.len_k, left, right, 0, device=device)
    else:  # row i of the band is the one row of a length-1 query at offset i
        mask = torch.cat([band_mask(1, case.len_k, left, right, int(i), device=device) for i in rows])
    return mask.view(1, 1, -1, case.len_k)


def _sinks64(case: Case, device) -> Optional[torch.Tensor]:
    sinks = case.sinks_tensor(device)
    return None if sinks is None else sinks.double()


def _reference(case: Case, q, k, v, rows: Optional[torch.Tensor], grad_out: Optional[torch.Tensor]):
    """The float64 oracle on query rows ``rows`` (torch layout), one batch entry at a time (so
    its memory does not grow with the batch): the output, and dQ (those rows), dK, dV for
    ``grad_out`` when given. The band enters as a boolean mask of those rows."""
    from ..functional import scaled_dot_product_attention

    mask = _band_rows(case, rows, q.device)
    need_grad = grad_out is not None
    outs, grads = [], []
    for b in range(case.batch):
        q64 = _rows(q[b:b + 1].detach().double(), rows).requires_grad_(need_grad)
        k64, v64 = (t[b:b + 1].detach().double().requires_grad_(need_grad) for t in (k, v))
        with torch.set_grad_enabled(need_grad):
            if case.top_k is not None:
                from ..topk import topk_attention

                out = topk_attention(q64, k64, v64, case.top_k, attn_mask=mask, enable_gqa=case.gqa, backend="math")
            else:
                out = scaled_dot_product_attention(q64, k64, v64, attn_mask=mask, enable_gqa=case.gqa, backend="math",
                                                   softcap=case.softcap, sinks=_sinks64(case, q.device))
        if need_grad:
            grads.append(torch.autograd.grad(out, (q64, k64, v64), _rows(grad_out[b:b + 1], rows).double()))
        outs.append(out.detach())
    return torch.cat(outs), [torch.cat(g) for g in zip(*grads)] if need_grad else None


def _torch_layout(layout: str, tensors):
    return [t.transpose(1, 2) if layout == "blhd" else t for t in tensors]


def _check(case: Case, fn, layout: str, inputs, rows: Optional[torch.Tensor], grad_out: Optional[torch.Tensor],
           ref) -> dict:
    """Relative norm errors of the subject's output (and gradients) against the reference:
    ``error`` for the output, ``error_dq``/``error_dk``/``error_dv`` when the case has a backward."""
    need_grad = grad_out is not None
    # grad mode left as the timed calls had it: a compiled subject (FlexAttention) would recompile
    xs = [t.detach().requires_grad_(need_grad) for t in inputs]
    out = fn(*xs)
    ref_out, ref_grads = ref
    errors = {"error": relative_error(_rows(_torch_layout(layout, [out])[0], rows), ref_out)}
    if need_grad:
        grads = _torch_layout(layout, torch.autograd.grad(out, xs, _torch_layout(layout, [grad_out])[0]))
        grads[0] = _rows(grads[0], rows)
        for name, got, want in zip(("error_dq", "error_dk", "error_dv"), grads, ref_grads):
            errors[name] = relative_error(got, want)
    return errors


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
        try:
            sets = {layout: make_input_sets(case, layout, device, count) for layout in layouts}
        except (RuntimeError, MemoryError) as exc:  # out of memory for the inputs: an error row, not an abort
            for name in fns:
                rows[name] = _result(case, name, "error", f"making the inputs: {_error_reason(exc, [])}")
            return [rows[s.name] for s in subjects if s.name in rows]
        runners = {name: Runner(fn, case.mode, sets[by_name[name].layout]) for name, fn in fns.items()}

        def on_error(name: str, exc: BaseException, caught: Sequence = ()) -> None:
            rows[name] = _result(case, name, failure_status(exc), _error_reason(exc, caught))

        stats = measure(runners, device, settings, on_error)
        refs, grad_outs, rows_checked = {}, {}, check_rows(case)
        if check and stats:
            for layout, layout_sets in sets.items():
                q, k, v = _torch_layout(layout, layout_sets[0][:3])
                grad_outs[layout] = check_grad_out(case, rows_checked, q) if case.mode != "fwd" else None
                try:
                    refs[layout] = _reference(case, q, k, v, rows_checked, grad_outs[layout])
                except Exception as exc:  # e.g. out of memory: the timings stand, unchecked
                    refs[layout] = RuntimeError(f"reference: {_error_reason(exc, [])}")
        for name, st in stats.items():
            flops = case.flops()
            row = _result(case, name, "ok", st.note, time_ms=st.median_s * 1e3, time_ms_min=st.min_s * 1e3,
                          time_ms_mean=st.mean_s * 1e3, time_ms_iqr=st.iqr_s * 1e3, reps=st.reps,
                          first_call_ms=st.first_call_s * 1e3, timer=st.timer, input_sets=st.input_sets,
                          tflops=flops / st.median_s / 1e12)
            if refs:
                layout = by_name[name].layout
                row["check_rows"] = case.len_q if rows_checked is None else len(rows_checked)
                try:
                    if isinstance(refs[layout], Exception):
                        raise refs[layout]
                    row.update(_check(case, fns[name], layout, sets[layout][0][:3], rows_checked, grad_outs[layout],
                                      refs[layout]))
                except Exception as exc:
                    row["error"] = None
                    row["reason"] = (row["reason"] + "; " if row["reason"] else "") + f"check failed: {exc}"
            rows[name] = row
    return [rows[s.name] for s in subjects if s.name in rows]


def run_sweep(cases: Sequence[Case], subjects: Sequence[Subject], device: str, settings: TimingSettings,
              excluded: Optional[Dict[str, str]] = None, max_memory: Optional[int] = None, check: bool = False,
              progress: Optional[Callable[[str], None]] = None,
              partial: Optional[Callable[[List[dict]], None]] = None) -> List[dict]:
    """Rows of every case; ``partial(rows so far)`` after each case (to save a run that may be cut short)."""
    excluded = excluded or {}
    max_memory = max_memory if max_memory is not None else available_memory(device) // 2
    rows = []
    for case in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # per-call warnings would tear the progress bar
            rows += run_case(case, subjects, device, settings, excluded, max_memory, check)
        if device == "cuda":  # the next case's shapes (a 64k x 64k mask, say) start from a clean pool
            torch.cuda.empty_cache()
        if partial:
            partial(rows)
        if progress:
            progress(case.label())
    return rows
