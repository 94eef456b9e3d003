"""``attnkern bench`` and ``attnkern memory``: argument parsing and the run's output.

``main(argv)`` takes the arguments after the program name, starting with the subcommand
("bench" or "memory"); it returns the exit status: 0, or 1 when an attnkern backend raised
during the run (a skip is not a failure; a baseline that raises is reported, not fatal).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import cases as cases_mod
from .cases import DTYPES, MODES, Case, Preset, dtype_name, grid
from .progress import Progress
from .subjects import Subject, all_subjects, default_baseline

GRID_FLAGS = ("dtypes", "head_dims", "batch", "heads", "kv_heads", "seqlens", "causal", "windows", "modes")


# ---------------------------------------------------------------------------------------
# argument types: errors name the flag and the value


def _int_list(text: str) -> List[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _seqlens(text: str) -> List[Tuple[int, int]]:
    """``1024,2048`` (L = S) or ``512:4096`` entries (L:S)."""
    out = []
    for item in text.split(","):
        parts = item.split(":")
        try:
            lq, lk = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (0, 0)
        except ValueError:
            lq = lk = 0
        if lq <= 0 or lk <= 0:
            raise argparse.ArgumentTypeError(f"sequence lengths are positive L or L:S entries, got {item!r}")
        out.append((lq, lk))
    return out


def _window(text: str) -> Optional[Tuple[int, int]]:
    """``left,right`` (-1 unbounded) or ``none``."""
    if text.lower() == "none":
        return None
    try:
        left, right = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a window is 'left,right' or 'none', got {text!r}")
    if left < -1 or right < -1:
        raise argparse.ArgumentTypeError(f"window entries must be >= -1, got {text!r}")
    if max(left, right) >= 2**62:
        raise argparse.ArgumentTypeError(f"window entries must be below 2^62 (-1: unbounded), got {text!r}")
    return left, right


# a window with a negative entry ("-1,0") would be read by argparse as an option
_NEGATIVE_WINDOW = re.compile(r"^-\d+,-?\d+$")


def _dtypes(text: str) -> List[str]:
    try:
        return [dtype_name(x) for x in text.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc))


def _modes(text: str) -> List[str]:
    modes = [x.strip() for x in text.split(",")]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise argparse.ArgumentTypeError(f"modes are {', '.join(MODES)}; got {', '.join(bad)}")
    return modes


def _names(text: str) -> List[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


WHERE_FIELDS = ("dtype", "batch", "heads_q", "heads_kv", "len_q", "len_k", "head_dim", "head_dim_v", "causal", "mode",
                "model")
_TRUE, _FALSE = {"true", "yes", "1"}, {"false", "no", "0"}


def _where(text: str) -> Tuple[str, List[str]]:
    """``FIELD=V1[,V2...]``: keep the cases whose FIELD is one of the values."""
    field, sep, values = text.partition("=")
    items = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or field not in WHERE_FIELDS or not items:
        raise argparse.ArgumentTypeError(f"expected FIELD=V1[,V2...] with FIELD one of {', '.join(WHERE_FIELDS)}, "
                                         f"got {text!r}")
    try:
        if field == "dtype":
            items = [dtype_name(v) for v in items]
        elif field == "causal":
            if any(v.lower() not in _TRUE | _FALSE for v in items):
                raise ValueError(f"causal takes true/false, got {values!r}")
            items = [str(v.lower() in _TRUE) for v in items]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc))
    return field, items


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value
    return parse


def _common(p: argparse.ArgumentParser, presets: Sequence[str]) -> None:
    group = p.add_mutually_exclusive_group()
    for name in presets:
        group.add_argument(f"--{name}", dest="preset", action="store_const", const=name,
                           help=f"the {name!r} preset" + (" (default)" if name == "quick" else ""))
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    p.add_argument("--backends", type=_names, help="comma-separated subjects (see --list); default: all available")
    p.add_argument("--list", action="store_true", help="list the subjects and whether they can run here, then exit")
    g = p.add_argument_group("grid (any of these replaces the preset's cases by a product of the given values)")
    g.add_argument("--dtypes", type=_dtypes, help="e.g. float32,bfloat16")
    g.add_argument("--head-dims", type=_int_list, help="e.g. 64,128")
    g.add_argument("--batch", type=_positive(int))
    g.add_argument("--heads", type=_positive(int), help="query heads")
    g.add_argument("--kv-heads", type=_positive(int), help="key/value heads (GQA when fewer than --heads)")
    g.add_argument("--seqlens", type=_seqlens, help="L (= S) or L:S entries, e.g. 512,1024,256:4096")
    g.add_argument("--causal", choices=("no", "yes", "both"), help="default: no")
    g.add_argument("--windows", type=_window, nargs="+", metavar="L,R",
                   help="local windows (left,right; -1 unbounded; 'none' for no window)")
    g.add_argument("--modes", type=_modes, help=f"comma-separated of {', '.join(MODES)}")
    p.add_argument("--where", type=_where, action="append", metavar="FIELD=V1,V2",
                   help="keep only the cases (of the preset or the grid) whose FIELD is one of the values, e.g. "
                        "mode=bwd or len_q=32768,65536; repeatable (all must hold); splits a preset across runs")
    p.add_argument("--max-memory", type=_positive(float), metavar="GIB",
                   help="skip score-materialising backends above this estimate (default: half the free memory)")
    p.add_argument("--threads", type=_positive(int), help="torch.set_num_threads (CPU)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON (schema in attnkern/bench/report.py)")
    p.add_argument("--csv", metavar="PATH", help="write the result rows as CSV")
    p.add_argument("--plot", metavar="DIR", help="write PNG charts into DIR (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it shows only on a terminal anyway)")
    p.add_argument("--note", help="free text stored with the results (e.g. what else ran on the machine)")
    p.add_argument("--from-json", metavar="PATH",
                   help="measure nothing: show (and --plot, --csv) the results of an earlier --json run")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnkern", description="attnkern benchmarks and memory profiles")
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="time attnkern's backends against the baselines found here",
                           description="Sweep a grid of attention problems over attnkern's backends and the "
                                       "baselines present (torch SDPA kernels, FlexAttention, flash-attn, xformers).")
    _common(bench, tuple(cases_mod.PRESETS))
    bench.add_argument("--baseline", help="subject the speed-ups are relative to (default: sdpa-flash; in the "
                                          "gpu-* presets sdpa-fastest: the fastest of torch's flash, "
                                          "memory-efficient and cuDNN kernels on each case)")
    bench.add_argument("--dry-run", action="store_true",
                       help="list the cases, their FLOPs and the subjects, measure nothing (with --device cuda: "
                            "the GPU grid, also without a GPU)")
    t = bench.add_argument_group("timing")
    t.add_argument("--budget", type=_positive(float), metavar="S", help="measuring seconds per case")
    t.add_argument("--min-reps", type=_positive(int))
    t.add_argument("--max-reps", type=_positive(int))
    t.add_argument("--warmup", type=_positive(float), metavar="S", help="warm-up seconds per backend and case")
    t.add_argument("--no-rotate", action="store_true", help="reuse one input set (warm caches)")
    t.add_argument("--cuda-graph", action="store_true", help="time forwards as CUDA-graph replays")
    bench.add_argument("--check", action="store_true",
                       help="also report each subject's relative error (output, and gradients for modes with a "
                            "backward) against the float64 reference; on in the gpu-* presets")

    memory = sub.add_parser("memory", help="peak extra memory per backend across sequence lengths",
                            description="Peak memory of forward and forward+backward beyond the returned "
                                        "tensors, with the growth exponent fitted over sequence length.")
    _common(memory, tuple(cases_mod.MEMORY_PRESETS))
    memory.add_argument("--snapshot", metavar="DIR",
                        help="CUDA: dump a torch.cuda.memory snapshot per measurement into DIR "
                             "(open with https://pytorch.org/memory_viz)")
    return parser


# ---------------------------------------------------------------------------------------
# shared pieces


def _device(args) -> str:
    if args.device == "cuda" and not torch.cuda.is_available() and not getattr(args, "dry_run", False):
        raise SystemExit("attnkern: --device cuda given but torch sees no CUDA device")
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _grid_from_args(args, base: Preset) -> List[Case]:
    """The preset's cases, or the product of the grid flags; unset flags take the preset's first
    case's value (its modes: all the preset's modes)."""
    if not any(getattr(args, f) is not None for f in GRID_FLAGS):
        return list(base.cases)
    first = base.cases[0]
    heads = args.heads or first.heads_q
    kv_heads = args.kv_heads or (heads if args.heads else first.heads_kv)
    if heads % kv_heads:
        raise SystemExit(f"attnkern: --heads {heads} must be a multiple of --kv-heads {kv_heads}")
    lengths = args.seqlens or sorted({(c.len_q, c.len_k) for c in base.cases})
    causal = {"no": [False], "yes": [True], "both": [False, True]}[args.causal or "no"]
    windows = args.windows or [None]
    bands = []
    for c in causal:
        bands += [(c, w) for w in windows]
    return grid(args.dtypes or [first.dtype], args.head_dims or [first.head_dim],
                [(args.batch or first.batch, heads, kv_heads)], lengths, bands,
                args.modes or list(dict.fromkeys(c.mode for c in base.cases)))


def _subjects(args, device: str, preset: Preset) -> Tuple[List[Subject], Dict[str, str], Dict[str, str]]:
    """Selected subjects that can run on ``device``, the reasons for those that cannot, and those
    the preset leaves out (a subject named in --backends is never left out)."""
    known = all_subjects()
    if args.backends:
        unknown = [n for n in args.backends if n not in known]
        if unknown:
            raise SystemExit(f"attnkern: unknown --backends {', '.join(unknown)}; known: {', '.join(known)}")
    runnable, unavailable, left_out = [], {}, {}
    for name in args.backends or list(known):
        reason = known[name].unavailable(device)
        if reason:
            unavailable[name] = reason
        elif name in preset.exclude and not args.backends:
            left_out[name] = preset.exclude[name]
        else:
            runnable.append(known[name])
    return runnable, unavailable, left_out


def _prepare(args, device: str, presets):
    """(preset, cases, subjects, unavailable, left_out) of a bench or memory run; sets the threads."""
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = presets[args.preset or "quick"](device)
    cases = _grid_from_args(args, preset)
    for field, values in args.where or []:
        cases = [c for c in cases if str(getattr(c, field)) in values]
    if not cases:
        kept = " ".join(f + "=" + ",".join(v) for f, v in args.where)
        raise SystemExit(f"attnkern: --where {kept} keeps none of the cases")
    return (preset, cases) + _subjects(args, device, preset)


def _load(path: str, kind: str) -> dict:
    import json

    from .report import SCHEMA

    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"attnkern: --from-json {path}: {exc}")
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA or doc.get("kind") != kind:
        raise SystemExit(f"attnkern: --from-json {path} is not an {SCHEMA} {kind} file")
    return doc


def _list_subjects(device: str) -> int:
    from .report import format_table

    rows = [[s.name, s.unavailable(device) or "yes", s.description] for s in all_subjects().values()]
    print(format_table(["subject", f"runs on {device}", "what"], rows))
    return 0


def _settings_dict(args) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("list",)}


def _plot_or_say(kind: str, draw) -> List[str]:
    from .plots import matplotlib_missing

    reason = matplotlib_missing()
    if reason:
        print(f"plots: skipped: {reason}")
        return []
    written = [p for p in draw() if p]
    if not written:
        print(f"plots: no {kind} data to plot")
    return written


def _attnkern_errors(rows: Sequence[dict]) -> List[dict]:
    return [r for r in rows if r["status"] == "error" and r["backend"].startswith("attnkern-")]


def _write_outputs(doc: dict, rows: List[dict], args) -> None:
    """--json and --csv as they stand (called after every case, so a run cut short keeps its rows)."""
    from .report import write_csv, write_json

    if args.json:
        write_json(args.json, doc)
    if args.csv:
        write_csv(args.csv, rows)


def _finish(doc: dict, rows: List[dict], args, plots: List[str]) -> int:
    _write_outputs(doc, rows, args)
    for path in (args.json, args.csv):
        if path:
            print(f"wrote {path}")
    for path in plots:
        print(f"wrote {path}")
    errors = _attnkern_errors(rows)
    if errors:
        print(f"attnkern: {len(errors)} attnkern backend call(s) raised (status 'error' above)", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------------------
# commands


def _baseline(args, preset: Preset, device: str, names: List[str]) -> Optional[str]:
    from .derived import SDPA_FASTEST, SDPA_FUSED

    baseline = args.baseline or preset.baseline or default_baseline(device, names)
    if baseline == SDPA_FASTEST:
        if not any(n in names for n in SDPA_FUSED):
            if args.baseline:
                raise SystemExit(f"attnkern: --baseline {SDPA_FASTEST} needs one of {', '.join(SDPA_FUSED)} "
                                 f"among the subjects run: {', '.join(names)}")
            baseline = default_baseline(device, names)
    elif args.baseline and args.baseline not in names:
        raise SystemExit(f"attnkern: --baseline {args.baseline} is not among the subjects run: {', '.join(names)}")
    return baseline


def dry_run(args, device: str, preset: Preset, cases: List[Case], subjects: List[Subject],
            unavailable: Dict[str, str], left_out: Dict[str, str]) -> int:
    from .derived import is_decode
    from .report import format_table

    body = [[c.label(), f"{c.flops() / 1e12:.4g}", f"{c.kv_bytes() / 1e9:.3g}" if is_decode(c) else ""]
            for c in cases]
    print(f"preset {preset.name} on {device}: {len(cases)} cases; baseline "
          f"{_baseline(args, preset, device, [s.name for s in subjects])}; "
          f"check against float64: {'yes' if args.check or preset.check else 'no'}")
    print(format_table(["case", "TFLOP", "K+V GB"], body, "lrr"))
    print("runs here: " + (", ".join(s.name for s in subjects) or "none"))
    for name, reason in unavailable.items():
        print(f"unavailable here: {name}: {reason}")
    for name, reason in left_out.items():
        print(f"left out by --{preset.name}: {name}: {reason}")
    return 0


def bench(args, device: str, preset: Preset, cases: List[Case], subjects: List[Subject],
          unavailable: Dict[str, str], left_out: Dict[str, str]) -> int:
    from . import report
    from .derived import add_bandwidth, add_ratios, is_decode, linearity
    from .sweep import run_sweep
    from .timing import TimingSettings, copy_bandwidth_gbps, matmul_peak_tflops, nominal_bandwidth_gbps

    if args.dry_run:
        return dry_run(args, device, preset, cases, subjects, unavailable, left_out)
    baseline = _baseline(args, preset, device, [s.name for s in subjects])
    settings = TimingSettings(
        budget_s=args.budget or preset.budget_s, min_reps=args.min_reps or preset.min_reps,
        max_reps=max(args.max_reps or preset.max_reps, args.min_reps or preset.min_reps),
        warmup_s=args.warmup if args.warmup is not None else preset.warmup_s, rotate=not args.no_rotate,
        cuda_graph=args.cuda_graph,
    )
    start = time.perf_counter()
    peaks = {dt: matmul_peak_tflops(DTYPES[dt], device)
             for dt in sorted({c.dtype for c in cases})}
    doc = report.document("bench", device, _settings_dict(args), [], preset=preset.name,
                          peak_tflops={k: v["tflops"] for k, v in peaks.items()},
                          peak_matmul_n={k: v["n"] for k, v in peaks.items()},
                          baseline=baseline, unavailable=unavailable, left_out=left_out,
                          cases_planned=len(cases), cases_done=0)
    decoding = any(is_decode(c) for c in cases)
    if decoding:
        doc["copy_gbps"] = copy_bandwidth_gbps(device)
        doc["nominal_hbm_gbps"] = nominal_bandwidth_gbps(doc["device"]["name"]) if device == "cuda" else None
    check = args.check or preset.check
    print(report.header(doc))
    print(f"preset {preset.name}: {len(cases)} cases x {len(subjects)} backends; speed-ups vs {baseline}"
          + ("; every subject checked against the float64 reference" if check else ""))

    def derive(rows: List[dict]) -> None:
        add_ratios(rows, baseline, doc["peak_tflops"])
        if decoding:
            add_bandwidth(rows, doc["copy_gbps"], doc["nominal_hbm_gbps"])
        doc["linearity"] = linearity(rows)
        doc["results"] = rows
        doc["wall_s"] = round(time.perf_counter() - start, 2)

    def case_done(rows: List[dict]) -> None:
        doc["cases_done"] += 1
        if args.json or args.csv:  # after every case: a run cut short (a time limit) keeps what it measured
            derive(rows)
            _write_outputs(doc, rows, args)

    progress = Progress(len(cases), enabled=False if args.no_progress else None)
    progress.show()
    rows = run_sweep(cases, subjects, device, settings, None,
                     int(args.max_memory * (1 << 30)) if args.max_memory else None, check, progress.advance,
                     case_done)
    progress.close()
    # again at the end, keeping the better: on a shared machine one measurement can catch a busy moment
    for dt, first in peaks.items():
        again = matmul_peak_tflops(DTYPES[dt], device, start_n=first["n"])
        doc["peak_tflops"][dt] = max(first["tflops"], again["tflops"])
    if decoding:
        doc["copy_gbps"] = max(doc["copy_gbps"], copy_bandwidth_gbps(device))
    derive(rows)
    return show_bench(doc, args)


def _title(doc: dict, detail: str) -> str:
    return f"{doc['device'].get('name')} ({doc['device'].get('type')}), {detail}"


def show_bench(doc: dict, args) -> int:
    """Table, plots and files of a bench document (just measured, or read with --from-json)."""
    from . import report

    rows, baseline = doc["results"], doc.get("baseline")
    print(report.bench_table(rows, baseline))
    print("%peak is against the matmul peak, best of the start and the end of the run: "
          + ", ".join(f"{k} {v:.3f} TFLOP/s" for k, v in (doc.get("peak_tflops") or {}).items()))
    for title, headers, body, align in report.summary_tables(doc):
        print(f"\n{title}")
        print(report.format_table(headers, body, align))
    print(f"{sum(r['status'] == 'ok' for r in rows)} timed, {sum(r['status'] == 'skip' for r in rows)} skipped, "
          f"{sum(r['status'] == 'error' for r in rows)} errors in {doc.get('wall_s', 0):.1f} s")
    if doc.get("cases_done", 0) < doc.get("cases_planned", 0):
        print(f"run cut short: {doc['cases_done']} of {doc['cases_planned']} cases measured")
    plots = []
    if args.plot:
        from .plots import plot_speedup, plot_throughput

        title = _title(doc, f"torch {doc['versions'].get('torch')}")
        plots = _plot_or_say("bench", lambda: [
            plot_throughput(rows, os.path.join(args.plot, "bench-throughput.png"), title),
            plot_speedup(rows, os.path.join(args.plot, "bench-speedup.png"), baseline, title)])
    return _finish(doc, rows, args, plots)


def memory(args, device: str, preset: Preset, cases: List[Case], subjects: List[Subject],
           unavailable: Dict[str, str], left_out: Dict[str, str]) -> int:
    from . import report
    from .memory import fits, run_memory

    start = time.perf_counter()
    doc = report.document("memory", device, _settings_dict(args), [], preset=preset.name, unavailable=unavailable,
                          left_out=left_out,
                          method="torch.cuda.max_memory_allocated" if device == "cuda"
                          else "torch.profiler memory events (profile_memory=True)")
    print(report.header(doc))
    progress = Progress(len(cases), enabled=False if args.no_progress else None)
    progress.show()

    def case_done(rows: List[dict]) -> None:  # written as it goes, as bench does
        doc["results"], doc["fits"] = rows, fits(rows)
        doc["wall_s"] = round(time.perf_counter() - start, 2)
        _write_outputs(doc, rows, args)

    rows = run_memory(cases, subjects, device, None,
                      int(args.max_memory * (1 << 30)) if args.max_memory else None, args.snapshot,
                      progress.advance, case_done)
    progress.close()
    growth = fits(rows)
    doc["results"], doc["fits"] = rows, growth
    doc["wall_s"] = round(time.perf_counter() - start, 2)
    return show_memory(doc, args)


def show_memory(doc: dict, args) -> int:
    """Tables, plot and files of a memory document (just measured, or read with --from-json)."""
    rows, growth = doc["results"], doc.get("fits", [])
    print(memory_table(rows))
    print()
    print(fits_table(growth))
    plots = []
    if args.plot:
        from .plots import plot_memory

        title = _title(doc, doc.get("method", ""))
        plots = _plot_or_say("memory", lambda: [plot_memory(rows, growth, os.path.join(args.plot, "memory.png"), title)])
    return _finish(doc, rows, args, plots)


def _mib(n: Optional[int]) -> str:
    return "" if n is None else f"{n / (1 << 20):.2f}"


def memory_table(rows: Sequence[dict]) -> str:
    from .cases import case_from_row
    from .report import format_table

    body, last = [], None
    for row in rows:
        label = case_from_row(row).label()
        shown = label if label != last else ""
        last = label
        if row["status"] == "ok":
            body.append([shown, row["backend"], _mib(row["peak_bytes"]), _mib(row["output_bytes"]),
                         _mib(row["extra_bytes"]), ""])
        else:
            body.append([shown, row["backend"], row["status"], "", "", row["reason"]])
    return format_table(["case", "backend", "peak MiB", "returned MiB", "extra MiB", "note"], body, "llrrrl")


def fits_table(growth: Sequence[dict]) -> str:
    from .report import format_table

    body = [[f["series"], f["backend"], ",".join(str(n) for n in f["lengths"]),
             "" if f["exponent"] is None else f"{f['exponent']:.2f}", f["growth"]] for f in growth]
    return format_table(["series", "backend", "lengths", "exponent", "growth of extra memory"], body, "lllrl")


def check_output_paths(args) -> None:
    """Refuse, before measuring, output paths the run could not write or should not replace:
    --json/--csv must be a regular file or a new name in an existing, writable directory (not a
    device, a directory or a symlink, which a replace would turn into a regular file); --plot a
    directory or a new one."""
    for flag, path in (("--json", args.json), ("--csv", args.csv)):
        if not path:
            continue
        parent = os.path.dirname(os.path.abspath(path))
        if os.path.islink(path) or (os.path.lexists(path) and not os.path.isfile(path)):
            raise SystemExit(f"attnkern: {flag} {path}: not a regular file (refusing to replace it)")
        if not os.path.isdir(parent):
            raise SystemExit(f"attnkern: {flag} {path}: directory {parent} does not exist")
        if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
            raise SystemExit(f"attnkern: {flag} {path}: not writable")
    plot = getattr(args, "plot", None)
    if plot and os.path.lexists(plot) and not os.path.isdir(plot):
        raise SystemExit(f"attnkern: --plot {plot}: exists and is not a directory")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # " -1,0": argparse takes a leading space for a value, and int() ignores it
    argv = [" " + a if _NEGATIVE_WINDOW.match(a) else a for a in argv]
    args = build_parser().parse_args(argv)
    # A KeyboardInterrupt propagates (the `attnkern` command turns it into exit status 130): a
    # caller in the same process, pytest included, must see it. Swallowed here, it let a pytest
    # run under scripts/gpu_check.sh's SIGINT guard go on to the next test until it was killed.
    try:
        return _main(args)
    except OSError as exc:  # writing an output: disk full, permissions, ...
        print(f"attnkern: {exc.filename or 'output'}: {exc.strerror or exc}", file=sys.stderr)
        return 1


def _main(args) -> int:
    show, measure, presets = {"bench": (show_bench, bench, cases_mod.PRESETS),
                              "memory": (show_memory, memory, cases_mod.MEMORY_PRESETS)}[args.command]
    check_output_paths(args)
    if args.from_json:
        return show(_load(args.from_json, args.command), args)
    device = _device(args)
    if args.list:
        return _list_subjects(device)
    return measure(args, device, *_prepare(args, device, presets))


if __name__ == "__main__":
    sys.exit(main())
