#!/usr/bin/env python
"""Regenerate benchmarks/RESULTS.md from the JSON files under benchmarks/results/ (never edit it by hand).

    python benchmarks/make_results.py           # rewrite RESULTS.md
    python benchmarks/make_results.py --check   # exit 1 if RESULTS.md is out of date

Every ``*.json`` under the results folder becomes one section, CPU runs first, then GPU
runs, each by date. PNGs in ``results/plots/<json stem>/`` are embedded under their section.
Three layouts are read:

1. ``attnkern-bench/1`` (``attnkern bench --json`` / ``attnkern memory --json``; schema in
   attnkern/bench/report.py). GPU runs too: scripts/gpu_check.sh writes one per gpu-* preset,
   with the derived tables (ratios to each baseline, errors against float64, time against L,
   decoding bandwidth) rendered by attnkern.bench.report.summary_tables.
2. pytest-benchmark output (``pytest benchmarks/ --benchmark-only --benchmark-json=...``):
   top-level ``machine_info`` and ``benchmarks``; attnkern's figures are in ``extra_info``.
3. Anything else, read tolerantly as a generic GPU report (e.g. from an older tool)::

       {"device": "NVIDIA H100 ..." | {"name": ...},     # also: gpu, device_name
        "versions": {"torch": ..., "triton": ..., ...},  # or those keys at top level
        "date": "2026-01-31T12:00:00Z",                   # also: datetime, timestamp
        "cases": [                                        # also: results, benchmarks, tests
          {"name": str,                                   # also: case, label, id, test
           "backend": str,                                # also: impl, kernel
           "status": "ok" | "skip" | "fail",              # also: outcome, result
           "error": float,                                # also: max_error, rel_err, err
           "tflops": float,                               # also: tflops_per_s, TFLOP/s
           "time_ms": float,                              # also: ms, median_ms
           "reason": str}, ...]}                          # also: message, note

   Missing fields are left blank; a file whose cases cannot be found is listed with its
   top-level keys so that it is not silently dropped.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the checkout's attnkern, for the case wording

from attnkern.bench.cases import case_from_row  # noqa: E402
from attnkern.bench.report import summary_tables  # noqa: E402
RESULTS_DIR = os.path.join(HERE, "results")
OUT = os.path.join(HERE, "RESULTS.md")

ALIASES = {
    "device": ("device", "gpu", "device_name"),
    "date": ("date", "datetime", "timestamp"),
    "cases": ("cases", "results", "benchmarks", "tests"),
    "name": ("name", "case", "label", "id", "test"),
    "backend": ("backend", "impl", "kernel"),
    "status": ("status", "outcome", "result"),
    "error": ("error", "max_error", "rel_err", "err"),
    "tflops": ("tflops", "tflops_per_s", "TFLOP/s"),
    "time_ms": ("time_ms", "ms", "median_ms"),
    "reason": ("reason", "message", "note"),
}
VERSION_KEYS = ("attnkern", "torch", "triton", "cuda", "python", "flash_attn", "xformers")


def pick(d: Dict[str, Any], field: str, default=None):
    for key in ALIASES[field]:
        if key in d and d[key] is not None:
            return d[key]
    return default


def fmt(value, spec: str) -> str:
    if value is None or value == "":
        return ""
    try:
        return format(float(value), spec)
    except (TypeError, ValueError):
        return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(x) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# one reader per layout; each returns (device kind, date, title, markdown body)


def device_line(device: Any) -> str:
    if isinstance(device, dict):
        extras = [f"{k} {device[k]}" for k in ("capability", "threads", "attnkern_isa", "memory_gib", "loadavg_1m")
                  if device.get(k)]
        return f"{device.get('name', '?')} ({device.get('type', '?')}" + (", " + ", ".join(extras) if extras else "") + ")"
    return str(device)


def versions_line(versions: Dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in versions.items() if v)


def skipped_summary(rows: Sequence[dict]) -> str:
    reasons: Dict[tuple, int] = {}
    for row in rows:
        if row.get("status") != "ok":
            key = (row.get("backend", "?"), row.get("status", "?"), row.get("reason", ""))
            reasons[key] = reasons.get(key, 0) + 1
    if not reasons:
        return ""
    lines = ["Skipped cases:", ""]
    lines += [f"- {backend} ({status}, {n} case{'s' if n > 1 else ''}): {reason}"
              for (backend, status, reason), n in reasons.items()]
    return "\n".join(lines)


def not_run(doc: dict) -> str:
    lines = [f"- {name}: {reason}" for name, reason in (doc.get("unavailable") or {}).items()]
    lines += [f"- {name}: left out by --{doc.get('preset')}: {reason}" for name, reason in
              (doc.get("left_out") or {}).items()]
    return "\n".join(["Not run:", ""] + lines) if lines else ""


def read_attnkern_bench(doc: dict) -> str:
    rows = doc.get("results", [])
    baseline = doc.get("baseline")
    peaks = doc.get("peak_tflops") or {}
    out = []
    if peaks:
        out.append("Matmul peak measured in the same run: "
                   + ", ".join(f"{k} {v:.3f} TFLOP/s" for k, v in peaks.items()) + ".")
    body = [[case_from_row(r).label(), r["backend"], fmt(r.get("time_ms"), ".3f"), fmt(r.get("time_ms_iqr"), ".3f"),
             fmt(r.get("tflops"), ".3f"), fmt(r.get("pct_peak"), ".0f"),
             fmt(r.get("speedup"), ".2f") + ("x" if r.get("speedup") else ""), fmt(r.get("error"), ".1e")]
            for r in rows if r.get("status") == "ok"]
    out.append(table(["case", "backend", "median ms", "IQR ms", "TFLOP/s", "% matmul peak",
                      f"speed-up vs {baseline}", "rel. error"], body))
    for title, headers, summary, _ in summary_tables(doc):
        out.append(f"{title}:\n\n{table(headers, summary)}")
    if doc.get("cases_done", 0) < doc.get("cases_planned", 0):
        out.append(f"Run cut short: {doc['cases_done']} of {doc['cases_planned']} cases measured.")
    skipped = skipped_summary(rows)
    if skipped:
        out.append(skipped)
    return "\n\n".join(out)


def read_attnkern_memory(doc: dict) -> str:
    rows = [r for r in doc.get("results", []) if r.get("status") == "ok"]
    out = [f"Method: {doc.get('method', '?')}; extra = peak during the call minus the returned tensors."]
    fits = doc.get("fits", [])
    out.append(table(["series", "backend", "lengths", "fitted exponent", "growth"],
                     [[f["series"], f["backend"], ", ".join(str(n) for n in f["lengths"]),
                       fmt(f.get("exponent"), ".2f"), f.get("growth", "")] for f in fits]))
    lengths = sorted({r["len_q"] for r in rows})
    series: Dict[tuple, Dict[int, float]] = {}
    for r in rows:
        series.setdefault((r["backend"], case_from_row(r).series_label()), {})[r["len_q"]] = r["extra_bytes"]
    out.append(table(["backend", "series"] + [f"extra MiB at L={n}" for n in lengths],
                     [[b, label] + [fmt(v[n] / (1 << 20), ".2f") if n in v else "" for n in lengths]
                      for (b, label), v in series.items()]))
    skipped = skipped_summary(doc.get("results", []))
    if skipped:
        out.append(skipped)
    return "\n\n".join(out)


def read_pytest_benchmark(doc: dict) -> str:
    body = []
    for b in doc.get("benchmarks", []):
        info, stats = b.get("extra_info", {}), b.get("stats", {})
        speedup = next((f"{v:.2f}x vs {k[len('speedup_vs_'):]}" for k, v in info.items()
                        if k.startswith("speedup_vs_") and v), "")
        shown = {"tflops", "pct_peak"} | {k for k in info if k.startswith("speedup_vs_")}
        notes = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in info.items() if k not in shown)
        body.append([b.get("name", "?"), fmt(stats.get("median", 0) * 1e3, ".3f"), fmt(stats.get("iqr", 0) * 1e3, ".3f"),
                     stats.get("rounds", ""), fmt(info.get("tflops"), ".3f"), fmt(info.get("pct_peak"), ".0f"), speedup,
                     notes])
    return table(["benchmark", "median ms", "IQR ms", "rounds", "TFLOP/s", "% matmul peak", "speed-up", "other figures"],
                 body)


def read_generic(doc: dict) -> str:
    cases = pick(doc, "cases")
    if isinstance(cases, dict):  # {name: {...}} form
        cases = [{"name": k, **(v if isinstance(v, dict) else {"result": v})} for k, v in cases.items()]
    if not isinstance(cases, list):
        return f"Unrecognised layout (top-level keys: {', '.join(sorted(doc))}); see the JSON file."
    body = []
    for c in cases:
        if not isinstance(c, dict):
            body.append([str(c), "", "", "", "", "", ""])
            continue
        body.append([pick(c, "name", ""), pick(c, "backend", ""), pick(c, "status", ""), fmt(pick(c, "error"), ".1e"),
                     fmt(pick(c, "tflops"), ".2f"), fmt(pick(c, "time_ms"), ".3f"), pick(c, "reason", "")])
    return table(["case", "backend", "status", "error", "TFLOP/s", "ms", "note"], body)


def describe(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as exc:
        return {"kind": "?", "date": "", "title": os.path.basename(path), "body": f"Could not be read: {exc}",
                "gpu": False}
    if not isinstance(doc, dict):
        return {"kind": "?", "date": "", "title": os.path.basename(path), "body": "Not a JSON object.", "gpu": False}
    if str(doc.get("schema", "")).startswith("attnkern-bench/"):
        device = doc.get("device", {})
        kind = doc.get("kind", "bench")
        body = read_attnkern_memory(doc) if kind == "memory" else read_attnkern_bench(doc)
        if not_run(doc):
            body += "\n\n" + not_run(doc)
        title = f"{device_line(device)}: attnkern {kind} --{doc.get('preset', '?')}"
        if doc.get("note"):
            body = f"Note: {doc['note']}\n\n{body}"
        return {"kind": kind, "date": doc.get("date", ""), "title": title, "body": body,
                "gpu": device.get("type") == "cuda", "versions": doc.get("versions", {})}
    if "benchmarks" in doc and "machine_info" in doc:
        info = doc["machine_info"]
        devices = {b.get("extra_info", {}).get("device") for b in doc["benchmarks"]}
        cpu = info.get("cpu", {}).get("brand_raw") if isinstance(info.get("cpu"), dict) else None
        title = f"{cpu or info.get('processor') or info.get('machine')}: pytest-benchmark"
        return {"kind": "pytest-benchmark", "date": doc.get("datetime", ""), "title": title,
                "body": read_pytest_benchmark(doc), "gpu": "cuda" in devices,
                "versions": {"python": info.get("python_version")}}
    versions = doc.get("versions") if isinstance(doc.get("versions"), dict) else {
        k: doc[k] for k in VERSION_KEYS if k in doc}
    return {"kind": "gpu-check", "date": str(pick(doc, "date", "")), "title": f"{device_line(pick(doc, 'device', '?'))}: "
            f"GPU check", "body": read_generic(doc), "gpu": True, "versions": versions}


def render(results_dir: str = RESULTS_DIR, out_path: str = OUT) -> str:
    paths = sorted(p for p in glob.glob(os.path.join(results_dir, "**", "*.json"), recursive=True))
    sections = [dict(describe(p), path=p) for p in paths]
    sections.sort(key=lambda s: (s["gpu"], str(s["date"]), s["path"]))
    base = os.path.dirname(os.path.abspath(out_path))
    lines = [
        "# attnkern benchmark results",
        "",
        "Generated by `python benchmarks/make_results.py` from the JSON files under `benchmarks/results/`;",
        "do not edit by hand. Times are medians; speed-ups are ratios against the named baseline in the",
        "same run. TFLOP/s use attnkern/bench/flops.py (causal counted as half the dense pairs, windows",
        "by their exact pairs, backward 2.5x the forward), so a kernel that computes masked-out blocks",
        "anyway is not credited for them. \"% matmul peak\" is relative to torch.matmul timed in the",
        "same run, which on CPUs can sit below what the hardware does (then it exceeds 100).",
        "",
    ]
    if not any(s["gpu"] for s in sections):
        lines += ["No GPU results are committed yet: every GPU figure is unverified.", ""]
    for s in sections:
        rel = os.path.relpath(s["path"], base)
        lines += [f"## {s['title']}", "", f"Source: `{rel}`" + (f", {s['date']}" if s["date"] else "") + ".", ""]
        if s.get("versions"):
            lines += [f"Versions: {versions_line(s['versions'])}.", ""]
        lines += [s["body"], ""]
        stem = os.path.splitext(os.path.basename(s["path"]))[0]
        for png in sorted(glob.glob(os.path.join(os.path.dirname(s["path"]), "plots", stem, "*.png"))):
            lines += [f"![{stem} {os.path.basename(png)[:-4]}]({os.path.relpath(png, base)})", ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=RESULTS_DIR, help="folder of JSON results (default: %(default)s)")
    parser.add_argument("--out", default=OUT, help="markdown file to write (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="exit 1 if --out differs from what would be written")
    args = parser.parse_args(argv)
    text = render(args.results, args.out)
    if args.check:
        current = open(args.out).read() if os.path.exists(args.out) else ""
        if current != text:
            print(f"{args.out} is out of date: run python benchmarks/make_results.py", file=sys.stderr)
            return 1
        return 0
    with open(args.out, "w") as f:
        f.write(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
