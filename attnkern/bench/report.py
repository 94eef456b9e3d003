"""Reports: the environment header, the terminal table, and the JSON / CSV files.

JSON schema ``attnkern-bench/1`` (what ``attnkern bench --json`` and ``attnkern memory --json``
write, and what benchmarks/make_results.py reads first)::

    {
      "schema": "attnkern-bench/1",
      "kind": "bench" | "memory",
      "date": "2026-01-31T12:00:00+00:00",
      "device": {"type": "cpu" | "cuda", "name": str, "threads": int, ...},
      "versions": {"attnkern": str, "torch": str, "python": str, "triton": str | null, ...},
      "settings": {...},                      # the command line, as parsed
      "note": str,                             # --note: free text about the run (optional)
      "peak_tflops": {"bfloat16": float, ...}, # bench: matmul peak per dtype, best of a measurement
                                               #   at the start and one at the end of the run
      "peak_matmul_n": {"bfloat16": int, ...}, # bench: the n of the n x n x n matmul that gave it
      "baseline": str | null,                  # bench: the subject speed-ups are relative to
      "unavailable": {backend: reason},        # subjects that cannot run on this device at all
      "left_out": {backend: reason},           # subjects the preset does not run (--backends NAME runs them)
      "cases_planned": int, "cases_done": int, # bench: fewer done than planned: the run was cut short
      "copy_gbps": float, "nominal_hbm_gbps": float | null,  # bench with decoding cases (derived.py)
      "linearity": [...],                      # bench: time against L per windowed series (derived.py)
      "results": [row, ...],
      "fits": [...]                            # memory: growth exponents
    }

A bench row: the case (dtype, batch, heads_q, heads_kv, len_q, len_k, head_dim, head_dim_v,
causal, window [left, right] | null, mode, model), ``backend``, ``status`` ("ok", "skip",
"error"), ``reason``, ``flops`` (attnkern.bench.flops), and when ok: ``time_ms`` (median),
``time_ms_min``, ``time_ms_mean``, ``time_ms_iqr``, ``reps``, ``first_call_ms``, ``timer``,
``input_sets``, ``tflops``, ``pct_peak``, ``speedup`` (baseline time / this time); attnkern's
rows also ``speedups`` {subject or "sdpa-fastest": its time / this time} and ``sdpa_fastest``;
decoding rows ``kv_bytes``, ``kv_gbps``, ``pct_copy_bw``, ``pct_nominal_bw`` (derived.py). With
--check (on in the gpu-* presets): ``check_rows`` (query rows compared: all, or an even sample
on large cases), ``error`` (relative norm error of the output against the float64 reference)
and, for modes with a backward, ``error_dq``, ``error_dk``, ``error_dv``.
"""

from __future__ import annotations

import csv
import datetime
import errno
import importlib
import json
import os
import platform
from typing import Dict, List, Optional, Sequence

import torch

SCHEMA = "attnkern-bench/1"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: str) -> dict:
    from .. import ops

    info = {"type": device, "threads": torch.get_num_threads()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(name=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / (1 << 30), 1), sms=props.multi_processor_count)
    else:
        info.update(name=cpu_name(), cpus=os.cpu_count(),
                    attnkern_isa=ops._C.cpu_isa() if ops._C is not None else None,
                    attnkern_amx=ops._C.cpu_amx() if ops._C is not None else None,
                    attnkern_fp32_amx_terms=ops._C.cpu_fp32_amx_terms() if ops._C is not None else None,
                    attnkern_parallel=ops._C.cpu_parallel() if ops._C is not None else None)
        if hasattr(os, "getloadavg"):  # other work on a shared machine shows here
            info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    return info


def versions() -> dict:
    from .._version import __version__

    found = {"attnkern": __version__, "torch": torch.__version__, "python": platform.python_version(),
             "cuda": torch.version.cuda}
    for module in ("triton", "flash_attn", "xformers"):
        try:
            found[module] = importlib.import_module(module).__version__
        except Exception:
            found[module] = None
    return found


def document(kind: str, device: str, settings: dict, results: List[dict], **extra) -> dict:
    doc = {
        "schema": SCHEMA,
        "kind": kind,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_info(device),
        "versions": versions(),
        "settings": settings,
    }
    if settings.get("note"):
        doc["note"] = settings["note"]
    doc.update(extra)
    doc["results"] = results
    return doc


def write_json(path: str, doc: dict) -> None:
    """Written whole or not at all (a run killed while writing keeps the previous file). Only a
    regular file or a new name is replaced: a device or a symlink would become a regular file."""
    _refuse_special(path)
    partial = path + ".partial"
    with open(partial, "w") as f:
        json.dump(doc, f, indent=1, allow_nan=False, default=_jsonable)
        f.write("\n")
    os.replace(partial, path)


def _jsonable(value):
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _refuse_special(path: str) -> None:
    if os.path.islink(path) or (os.path.lexists(path) and not os.path.isfile(path)):
        raise OSError(errno.EEXIST, "not a regular file (refusing to replace it)", path)


def write_csv(path: str, rows: Sequence[dict]) -> None:
    _refuse_special(path)
    columns: List[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: _cell(row.get(c)) for c in columns})


def _cell(value):
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return "" if value is None else value


# ---------------------------------------------------------------------------------------
# terminal


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: Optional[str] = None) -> str:
    """Plain text table; ``align`` is one of "l"/"r" per column (default: left)."""
    align = align or "l" * len(headers)
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]

    def line(cells):
        parts = [str(c).rjust(w) if a == "r" else str(c).ljust(w) for c, w, a in zip(cells, widths, align)]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _num(value, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def bench_table(rows: Sequence[dict], baseline: Optional[str]) -> str:
    """Grouped by case: one line per backend, skips and errors with their reasons."""
    from .cases import case_from_row

    lines, body, last = [], [], None
    for row in rows:
        full = case_from_row(row).label()
        label = full if full != last else ""
        last = full
        if row["status"] == "ok":
            body.append([label, row["backend"], _num(row["time_ms"], ".3f"), _num(row["time_ms_iqr"], ".3f"),
                         _num(row["tflops"], ".3f"), _num(row.get("pct_peak"), ".0f"),
                         _num(row.get("speedup"), ".2f") + ("x" if row.get("speedup") else ""),
                         _num(row.get("error"), ".1e"), row.get("reason", "")])
        else:
            body.append([label, row["backend"], row["status"], "", "", "", "", "", row["reason"]])
    vs = f"vs {baseline}" if baseline else "vs base"
    lines.append(format_table(["case", "backend", "ms", "iqr", "TFLOP/s", "%peak", vs, "err", "note"], body,
                              "llrrrrrrl"))
    return "\n".join(lines)


def _ratio(value) -> str:
    return "" if value is None else f"{value:.2f}x"


def _values(values, fmt: str) -> str:
    return ", ".join(format(v, fmt) for v in values)


def summary_tables(doc: dict) -> List[tuple]:
    """(title, headers, rows, align) of the figures derived from a bench run (attnkern/bench/derived.py),
    for the terminal and for benchmarks/make_results.py alike; empty where a run has none."""
    from .cases import case_from_row

    rows = doc.get("results", [])
    tables = []
    ours = [r for r in rows if r.get("speedups")]
    if ours:
        order = ["sdpa-fastest", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "flex", "flash-attn", "xformers"]
        names = list(dict.fromkeys(n for n in order if any(n in r["speedups"] for r in ours)))
        names += sorted({n for r in ours for n in r["speedups"]} - set(names))
        body = [[case_from_row(r).label(), r["backend"], r.get("sdpa_fastest") or ""]
                + [_ratio(r["speedups"].get(n)) for n in names] for r in ours]
        tables.append(("attnkern against each baseline: its time / attnkern's (above 1: attnkern is faster)",
                       ["case", "backend", "fastest SDPA"] + [f"vs {n}" for n in names], body,
                       "lll" + "r" * len(names)))
    checked = [r for r in rows if r.get("status") == "ok" and "check_rows" in r]
    if checked:
        body = [[case_from_row(r).label(), r["backend"], r["check_rows"]]
                + [_num(r.get(k), ".1e") for k in ("error", "error_dq", "error_dk", "error_dv")] for r in checked]
        tables.append(("relative error against the float64 reference (rows: query rows compared per head)",
                       ["case", "backend", "rows", "out", "dq", "dk", "dv"], body, "llrrrrr"))
    if doc.get("linearity"):
        body = [[f["series"], f["backend"], _values(f["lengths"], "d"), _values(f["time_ms"], ".3f"),
                 _values(f["us_per_row"], ".4f"), _num(f["exponent"], ".2f"),
                 f"{f['time_ratio']:.2f} (L x{f['length_ratio']:.0f})"] for f in doc["linearity"]]
        tables.append(("time against sequence length (exponent of the least-squares fit; 1 is linear)",
                       ["series", "backend", "L", "ms", "us per query row", "exponent", "time ratio"], body,
                       "lllllrl"))
    decode = [r for r in rows if r.get("kv_gbps") is not None]
    if decode:
        copy, nominal = doc.get("copy_gbps"), doc.get("nominal_hbm_gbps")
        body = [[case_from_row(r).label(), r["backend"], _num(r["time_ms"], ".4f"), _num(r["kv_bytes"] / 1e9, ".3f"),
                 _num(r["kv_gbps"], ".0f"), _num(r.get("pct_copy_bw"), ".0f"), _num(r.get("pct_nominal_bw"), ".0f")]
                for r in decode]
        tables.append((f"decoding: bandwidth of reading K and V once (copy in this run: {_num(copy, '.0f')} GB/s, "
                       f"nominal: {_num(nominal, '.0f') + ' GB/s' if nominal else 'unknown'})",
                       ["case", "backend", "ms", "K+V GB", "GB/s", "% of copy", "% of nominal"], body, "llrrrrr"))
    return tables


def header(doc: dict) -> str:
    dev, ver = doc["device"], doc["versions"]
    parts = [f"device: {dev.get('name')} ({dev['type']}, {dev.get('threads')} threads"
             + (f", attnkern ISA {dev['attnkern_isa']}" if dev.get("attnkern_isa") else "")
             + (f", fp32 forward products on AMX by the {dev['attnkern_fp32_amx_terms']}-term bf16 split"
                if dev.get("attnkern_fp32_amx_terms") else "")
             + (f", load average {dev['loadavg_1m']}" if "loadavg_1m" in dev else "") + ")",
             "versions: " + ", ".join(f"{k} {v}" for k, v in ver.items() if v)]
    peaks, sizes = doc.get("peak_tflops") or {}, doc.get("peak_matmul_n") or {}
    if peaks:
        parts.append("matmul peak (this run): " + ", ".join(
            f"{k} {v:.3f} TFLOP/s (n={sizes.get(k, '?')})" for k, v in peaks.items()))
    for name, reason in (doc.get("unavailable") or {}).items():
        parts.append(f"unavailable: {name}: {reason}")
    for name, reason in (doc.get("left_out") or {}).items():
        parts.append(f"left out by --{doc.get('preset')}: {name}: {reason}")
    return "\n".join(parts)
