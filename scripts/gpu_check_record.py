"""Bookkeeping of scripts/gpu_check.sh's timed phases (first-run, follow-up): one JSON summary
in the output folder, rewritten after every step, so a run cut off at its limit still returns
what finished. Standard library only: it must work when torch or the build is broken.

  gpu_check_record.py start SUMMARY --phase P --mode gpu|cpu-selftest --total-s N --plan a,b,c
  gpu_check_record.py step SUMMARY --name N --status S --rc RC --seconds S --budget B --limit L
                                   [--junit FILE] [--bench FILE] [--note TEXT]
  gpu_check_record.py env SUMMARY          # versions, GPU, attnkern build (imports torch)
  gpu_check_record.py finish SUMMARY       # total time, overall status, a short table on stdout

Step status: ok, failed, timed_out (its time guard stopped it), skipped (no time left, or not in
GPU_CHECK_ONLY). Overall: ok, failed (a step failed), incomplete (stopped, skipped or not reached).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from typing import Dict, List, Optional

SCHEMA = "attnkern-gpu-check/1"
MESSAGE_CHARS = 400  # of each failure's message kept in the summary (the log has all of it)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _save(path: str, doc: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)  # a reader (or a cut-off) never sees half a file


def junit_outcomes(path: str) -> Optional[dict]:
    """Counts and failing test ids of a pytest --junitxml file; None if it is missing or unreadable
    (pytest killed before it wrote it)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures: List[dict] = []
    for case in root.iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "errors"
                text = (child.get("message") or child.text or "").strip()
                failures.append({"test": test_id, "kind": child.tag, "message": text[:MESSAGE_CHARS]})
                break
            if child.tag == "skipped":
                outcome = "skipped"
        counts[outcome] += 1
    counts["total"] = sum(counts.values())
    counts["failures"] = failures
    return counts


def bench_outcome(path: str) -> Optional[dict]:
    """Cases measured and attnkern's rows (time, speed-up over the run's baseline, error against
    float64) of an ``attnkern bench --json`` file; None if missing (the bench never got to a case)."""
    try:
        doc = _load(path)
    except (OSError, ValueError):
        return None
    rows = []
    for row in doc.get("results", []):
        if not row.get("backend", "").startswith("attnkern-"):
            continue
        label = (f"{row.get('dtype')} B{row.get('batch')} H{row.get('heads_q')}/{row.get('heads_kv')} "
                 f"L{row.get('len_q')} S{row.get('len_k')} D{row.get('head_dim')} "
                 f"{'causal ' if row.get('causal') else ''}{'win' + str(row['window']) + ' ' if row.get('window') else ''}"
                 f"{row.get('mode')}")
        rows.append({k: row.get(k) for k in ("backend", "status", "time_ms", "tflops", "speedup", "error", "reason",
                                            "pct_copy_bw") if row.get(k) is not None} | {"case": label})
    return {"file": os.path.basename(path), "preset": doc.get("preset"), "baseline": doc.get("baseline"),
            "cases_done": doc.get("cases_done"), "cases_planned": doc.get("cases_planned"),
            "wall_s": doc.get("wall_s"), "attnkern_rows": rows}


def cmd_start(args) -> int:
    doc = {"schema": SCHEMA, "phase": args.phase, "mode": args.mode, "started": _now(), "total_s": args.total_s,
           "plan": [s for s in args.plan.split(",") if s], "steps": [], "finished": None}
    _save(args.summary, doc)
    return 0


def cmd_step(args) -> int:
    doc = _load(args.summary)
    step: Dict = {"name": args.name, "status": args.status, "rc": args.rc, "seconds": args.seconds,
                  "budget_s": args.budget, "limit_s": args.limit, "ended": _now()}
    if args.note:
        step["note"] = args.note
    if args.junit:
        tests = junit_outcomes(args.junit)
        step["tests"] = tests if tests is not None else "no junit file (pytest stopped before writing it; see the log)"
        if tests is not None and tests["total"] == 0 and step["status"] == "ok":
            step["status"], step["note"] = "failed", "the selection ran no test"
    if args.bench:
        step["bench"] = bench_outcome(args.bench) or f"{os.path.basename(args.bench)} not written"
    doc["steps"].append(step)
    _save(args.summary, doc)
    return 0


_ENV_PROBE = r"""
import json, os, platform, sys
info = {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count()}
try:
    import torch
    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["device"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                          "memory_gib": round(p.total_memory / 2**30, 1)}
except Exception as exc:
    info["torch_error"] = repr(exc)
try:
    import triton
    info["triton"] = triton.__version__
except Exception as exc:
    info["triton_error"] = repr(exc)
try:
    import attnkern
    from attnkern import ops
    info["attnkern"] = {"version": attnkern.__version__, "file": attnkern.__file__,
                        "backends_cpu": attnkern.available_backends("cpu"),
                        "backends_cuda": attnkern.available_backends("cuda"),
                        "cuda_extension": None if ops._C_cuda is None else {
                            "archs": ops._C_cuda.archs(), "instances": [str(i) for i in ops._C_cuda.instances()],
                            "sm90_instances": [str(i) for i in ops._C_cuda.sm90_instances()]},
                        "cuda_import_error": None if ops._C_cuda is not None else str(ops.CUDA_IMPORT_ERROR)}
except Exception as exc:
    info["attnkern_error"] = repr(exc)
print(json.dumps(info))
"""


def _run(cmd: List[str]) -> Optional[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def cmd_env(args) -> int:
    doc = _load(args.summary)
    proc = subprocess.run([args.python, "-c", _ENV_PROBE], capture_output=True, text=True)
    print(proc.stdout + proc.stderr, end="")
    env = {}
    if proc.returncode == 0 and proc.stdout.strip():
        env = json.loads(proc.stdout.strip().splitlines()[-1])
    else:
        env["probe_error"] = proc.stderr[-2000:]
    env["nvidia_smi"] = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm",
                              "--format=csv,noheader"])
    nvcc = _run(["nvcc", "--version"])
    env["nvcc"] = nvcc.splitlines()[-1] if nvcc else None
    env["git_commit"] = _run(["git", "-C", os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "rev-parse", "HEAD"])
    env["load_average"] = os.getloadavg()
    doc["env"] = env
    _save(args.summary, doc)
    return 0 if proc.returncode == 0 else 1


def cmd_finish(args) -> int:
    doc = _load(args.summary)
    doc["finished"] = _now()
    ran = {s["name"] for s in doc["steps"]}
    doc["not_reached"] = [name for name in doc["plan"] if name not in ran]
    doc["status"] = "ok" if all(s["status"] == "ok" for s in doc["steps"]) and not doc["not_reached"] else "incomplete"
    if any(s["status"] == "failed" for s in doc["steps"]):
        doc["status"] = "failed"
    _save(args.summary, doc)
    print(f"{'step':<14} {'status':<10} {'seconds':>7} {'limit':>6}  tests / bench")
    for s in doc["steps"]:
        detail = ""
        tests = s.get("tests")
        if isinstance(tests, dict):
            detail = f"{tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, " \
                     f"{tests['skipped']} skipped"
            detail += "".join(f"\n{'':>41}FAILED {f['test']}" for f in tests["failures"][:10])
        elif isinstance(tests, str):
            detail = tests
        bench = s.get("bench")
        if isinstance(bench, dict):
            detail = f"{bench['cases_done']}/{bench['cases_planned']} cases -> {bench['file']}"
        elif isinstance(bench, str):
            detail = bench
        if s.get("note"):
            detail = (detail + "; " if detail else "") + s["note"]
        print(f"{s['name']:<14} {s['status']:<10} {s['seconds']:>7} {s['limit_s']:>6}  {detail}")
    for name in doc["not_reached"]:
        print(f"{name:<14} {'not run':<10}")
    return 0 if doc["status"] == "ok" else 1


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start")
    start.add_argument("summary")
    start.add_argument("--phase", required=True)
    start.add_argument("--mode", required=True, choices=("gpu", "cpu-selftest"))
    start.add_argument("--total-s", type=int, required=True)
    start.add_argument("--plan", required=True, help="comma-separated step names, in order")
    step = sub.add_parser("step")
    step.add_argument("summary")
    step.add_argument("--name", required=True)
    step.add_argument("--status", required=True, choices=("ok", "failed", "timed_out", "skipped"))
    step.add_argument("--rc", type=int, required=True)
    step.add_argument("--seconds", type=int, required=True)
    step.add_argument("--budget", type=int, required=True)
    step.add_argument("--limit", type=int, required=True)
    step.add_argument("--junit")
    step.add_argument("--bench")
    step.add_argument("--note")
    env = sub.add_parser("env")
    env.add_argument("summary")
    env.add_argument("--python", default=sys.executable)
    finish = sub.add_parser("finish")
    finish.add_argument("summary")
    args = p.parse_args(argv)
    return {"start": cmd_start, "step": cmd_step, "env": cmd_env, "finish": cmd_finish}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
