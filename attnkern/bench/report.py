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
      "results": [row, ...],
      "fits": [...]                            # memory: growth exponents
    }

A bench row: the case (dtype, batch, heads_q, heads_kv, len_q, len_k, head_dim, head_dim_v,
causal, window [left, right] | null, mode, model), ``backend``, ``status`` ("ok", "skip",
"error"), ``reason``, ``flops`` (attnkern.bench.flops), and when ok: ``time_ms`` (median),
``time_ms_min``, ``time_ms_mean``, ``time_ms_iqr``, ``reps``, ``first_call_ms``, ``timer``,
``input_sets``, ``tflops``, ``pct_peak``, ``speedup`` (baseline time / this time), and
``error`` (relative norm error of the forward against the float64 reference, with --check).
"""

from __future__ import annotations

import csv
import datetime
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
                    attnkern_isa=ops._C.cpu_isa() if ops._C is not None else None)
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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, allow_nan=False, default=_jsonable)
        f.write("\n")


def _jsonable(value):
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def write_csv(path: str, rows: Sequence[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
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


def header(doc: dict) -> str:
    dev, ver = doc["device"], doc["versions"]
    parts = [f"device: {dev.get('name')} ({dev['type']}, {dev.get('threads')} threads"
             + (f", attnkern ISA {dev['attnkern_isa']}" if dev.get("attnkern_isa") else "")
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
