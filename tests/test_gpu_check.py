"""scripts/gpu_check.sh's timed phases (first-run, follow-up) without a GPU: the plan (--dry-run),
the smoke selection (every test id exists), and the bookkeeping of a whole run on CPU
(--cpu-selftest): one record per step in the summary JSON, test outcomes from junit, bench
cases, a step stopped by its time guard, steps skipped when no time is left, and few enough
files for the device tool to return them all. No timing is asserted."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from attnkern import dispatch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
FIRST_RUN = ["build", "env", "smoke-triton", "smoke-cuda", "smoke-hopper", "bench-first", "bench-window", "tests-gpu",
             "tests-cpu"]
MAX_FILES = 8  # the device tool returns at most 8 files from $OUT, named in [A-Za-z0-9._-]
needs_cpu_backend = pytest.mark.skipif("cpu" not in dispatch.available_backends("cpu"),
                                       reason="attnkern C++ extension not built")


# build knobs the script takes from the environment: CI exports some (.ci/run sets
# TORCH_CUDA_ARCH_LIST=9.0a), so the tests see the script's own defaults without them
BUILD_KNOBS = ("TORCH_CUDA_ARCH_LIST", "ATTNKERN_CUDA_HDIMS", "ATTNKERN_CUDA_DTYPES", "MAX_JOBS")


def _gpu_check(out, *args, env=None, timeout=120):
    inherited = {k: v for k, v in os.environ.items() if k not in BUILD_KNOBS}
    return subprocess.run(["bash", SCRIPT, str(out), *args], capture_output=True, text=True, timeout=timeout,
                          env={**inherited, "PYTHON": sys.executable, **(env or {})}, cwd=ROOT)


def _planned(stdout):
    """step name -> the command the dry run prints for it, as a list of arguments"""
    steps = {}
    for line in stdout.splitlines():
        m = re.match(r"\[gpu_check\] ([a-z-]+) \(budget (\d+) s\): (.*)$", line)
        if m:
            steps[m.group(1)] = shlex.split(m.group(3))
    return steps


def _smoke_ids(command):
    return [arg for arg in command if arg.startswith("tests/") and "::" in arg]


def test_first_run_plan(tmp_path):
    proc = _gpu_check(tmp_path, "--phase", "first-run", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    steps = _planned(proc.stdout)
    assert list(steps) == FIRST_RUN
    build = steps["build"]
    for setting in ("TORCH_CUDA_ARCH_LIST=9.0a", "ATTNKERN_CUDA_HDIMS=64,128", "ATTNKERN_CUDA_DTYPES=bf16",
                    "ATTNKERN_REQUIRE_CUDA=1", "build_ext", "--inplace"):
        assert setting in build, (setting, build)
    for family in ("smoke-triton", "smoke-cuda", "smoke-hopper"):
        assert "-x" in steps[family] and "--timeout=90" in steps[family]
        assert any(a.startswith("--junitxml=") for a in steps[family])
        ids = _smoke_ids(steps[family])
        assert ids and all("bfloat16" in i or "decode" in i for i in ids)
        for i in ids:  # done in the smoke pass, not again in the rest
            assert steps["tests-gpu"][steps["tests-gpu"].index(i) - 1] == "--deselect"
    assert all("test_gpu_wgmma_parity" in i for i in _smoke_ids(steps["smoke-hopper"]))
    assert "tests/test_cuda.py::test_gpu_larger_shapes[decode-L1-gqa8]" in steps["smoke-cuda"]
    first, window = steps["bench-first"], steps["bench-window"]
    assert "--gpu-first" in first and first[first.index("--json") + 1] == str(tmp_path / "bench-first.json")
    assert "--device cuda" in " ".join(first) and "ATTNKERN_TRITON_AUTOTUNE=0" in first
    assert "--gpu-window --where head_dim=128 --where len_q=32768 --where mode=fwd" in " ".join(window)
    assert " ".join(steps["tests-gpu"]).count("-m gpu") == 1 and "not gpu" in steps["tests-cpu"]
    assert not list(tmp_path.iterdir())  # a dry run writes nothing


def test_follow_up_plan(tmp_path):
    proc = _gpu_check(tmp_path, "--phase", "follow-up", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    steps = _planned(proc.stdout)
    assert list(steps) == ["build", "env", "sanitize", "bench-decode", "bench-window", "bench-dense"]
    assert "SANITIZE_TOOLS=memcheck racecheck" in steps["sanitize"] and "csrc/cuda/sanitize.sh" in steps["sanitize"]
    for preset in ("decode", "window", "dense"):
        assert f"--gpu-{preset} --json {tmp_path}/bench-{preset}.json" in " ".join(steps[f"bench-{preset}"])


@pytest.mark.parametrize("args", [["--phase", "first-run", "--", "-x"], ["--phase", "test", "--cpu-selftest"]])
def test_timed_phase_rejects_bad_arguments(tmp_path, args):
    proc = _gpu_check(tmp_path, *args)
    assert proc.returncode == 2 and "gpu_check:" in proc.stderr


def test_smoke_ids_exist(tmp_path):
    """A renamed test would make the smoke pass fail at collection on the GPU machine: catch it here."""
    steps = _planned(_gpu_check(tmp_path, "--phase", "first-run", "--dry-run").stdout)
    ids = [i for family in ("smoke-triton", "smoke-cuda", "smoke-hopper") for i in _smoke_ids(steps[family])]
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *ids],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    collected = [line for line in proc.stdout.splitlines() if "::" in line]
    assert sorted(collected) == sorted(ids)


def _check_files(out):
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= MAX_FILES, files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in files), files
    return {p.name for p in files}


@needs_cpu_backend
@pytest.mark.timeout(300)
def test_cpu_selftest_records_every_step(tmp_path):
    """A first run on CPU, limited to one step of each kind (GPU_CHECK_ONLY) to keep it short; tests-cpu
    gets 3 s, so its time guard stops it (SIGINT, then KILL) and the run still ends with its summary."""
    only = ["build", "env", "smoke-hopper", "bench-window", "tests-cpu"]
    proc = _gpu_check(tmp_path, "--phase", "first-run", "--cpu-selftest",
                      env={"GPU_CHECK_BUDGET_TESTS_CPU": "3", "GPU_CHECK_ONLY": ",".join(only)}, timeout=280)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # incomplete
    assert _check_files(tmp_path) == {"gpu_check-first-run.json", "gpu_check-first-run.log", "bench-window32k.json"}
    doc = json.loads((tmp_path / "gpu_check-first-run.json").read_text())
    assert (doc["phase"], doc["mode"], doc["status"], doc["not_reached"]) == ("first-run", "cpu-selftest",
                                                                             "incomplete", [])
    steps = {s["name"]: s for s in doc["steps"]}
    assert list(steps) == FIRST_RUN  # every step has its record, in the plan's order
    status = {name: s["status"] for name, s in steps.items()}
    assert status == {name: "ok" if name in only else "skipped" for name in FIRST_RUN} | {"tests-cpu": "timed_out"}
    assert all("not in GPU_CHECK_ONLY" in steps[name]["note"] for name in FIRST_RUN if name not in only)
    # 124: pytest stopped on the guard's SIGINT; 137: it was still exiting 10 s later and was
    # killed. Both are a timed-out step; which one depends on the load (CI once saw 137; here, with
    # the suite running alongside, a pytest interrupted 50 s into its run took 7.7 s to exit)
    assert steps["tests-cpu"]["limit_s"] == 3 and steps["tests-cpu"]["rc"] in (124, 137)
    assert doc["env"]["torch"] and "cpu" in doc["env"]["attnkern"]["backends_cpu"]
    # the Hopper smoke tests were all collected (a renamed one would fail the step), and skip on CPU
    tests = steps["smoke-hopper"]["tests"]
    assert (tests["total"], tests["skipped"], tests["failed"]) == (4, 4, 0), tests
    bench = steps["bench-window"]["bench"]
    assert bench["cases_done"] == bench["cases_planned"] == 1
    ok = [r for r in bench["attnkern_rows"] if r["status"] == "ok"]
    assert ok and all(r["error"] < 2e-2 for r in ok)  # bfloat16 against the float64 reference
    log = (tmp_path / "gpu_check-first-run.log").read_text()
    assert all(f"] {name} (limit " in log for name in only)
    table = proc.stdout[proc.stdout.rindex("step "):]
    assert all(name in table for name in FIRST_RUN) and "timed_out" in table


def test_record_counts_junit_outcomes(tmp_path):
    """The summary's test counts come from the junit file; a selection that ran nothing fails."""
    record = [sys.executable, os.path.join(ROOT, "scripts", "gpu_check_record.py")]
    summary = str(tmp_path / "s.json")
    subprocess.run(record + ["start", summary, "--phase", "first-run", "--mode", "gpu", "--total-s", "60",
                             "--plan", "a,b,c"], check=True)
    (tmp_path / "a.xml").write_text(
        '<testsuites><testsuite><testcase classname="tests.t" name="ok"/>'
        '<testcase classname="tests.t" name="bad"><failure message="assert 0.3 &lt; 0.02">tb</failure></testcase>'
        '<testcase classname="tests.t" name="skip"><skipped message="no GPU"/></testcase></testsuite></testsuites>')
    (tmp_path / "b.xml").write_text("<testsuites><testsuite/></testsuites>")
    for name, xml in (("a", "a.xml"), ("b", "b.xml")):
        subprocess.run(record + ["step", summary, "--name", name, "--status", "ok", "--rc", "0", "--seconds", "1",
                                 "--budget", "9", "--limit", "9", "--junit", str(tmp_path / xml)], check=True)
    proc = subprocess.run(record + ["finish", summary], capture_output=True, text=True)
    assert proc.returncode == 1
    doc = json.loads(open(summary).read())
    a, b = doc["steps"]
    assert {k: a["tests"][k] for k in ("passed", "failed", "skipped", "errors", "total")} == \
        {"passed": 1, "failed": 1, "skipped": 1, "errors": 0, "total": 3}
    assert a["tests"]["failures"] == [{"test": "tests.t::bad", "kind": "failure", "message": "assert 0.3 < 0.02"}]
    assert b["status"] == "failed" and b["note"] == "the selection ran no test"
    assert (doc["status"], doc["not_reached"]) == ("failed", ["c"])
    assert "FAILED tests.t::bad" in proc.stdout and "not run" in proc.stdout


def test_gpu_first_is_the_issue_short_benchmark():
    from attnkern.bench.cases import PRESETS

    preset = PRESETS["gpu-first"]("cuda")
    dense = [c for c in preset.cases if c.len_q > 1]
    assert {(c.len_q, c.causal, c.mode) for c in dense} == {(n, causal, mode) for n in (4096, 16384)
                                                           for causal in (False, True) for mode in ("fwd", "fwd+bwd")}
    assert all((c.dtype, c.head_dim, c.batch * c.len_q, c.heads_q, c.window) == ("bfloat16", 128, 16384, 16, None)
               for c in dense)
    assert [c for c in preset.cases if c.len_q == 1] == PRESETS["gpu-decode"]("cuda").cases
    modes = [c.mode for c in preset.cases]
    assert modes == sorted(modes, key=("fwd", "fwd+bwd").index)  # a cut-off run keeps every forward
    assert (preset.baseline, preset.check) == ("sdpa-fastest", True) and "flex" in preset.exclude


def test_time_guard_skips_what_no_longer_fits(tmp_path):
    proc = _gpu_check(tmp_path, "--phase", "follow-up", "--cpu-selftest", env={"GPU_CHECK_TOTAL_S": "30"})
    assert proc.returncode == 1, proc.stderr
    _check_files(tmp_path)
    doc = json.loads((tmp_path / "gpu_check-follow-up.json").read_text())
    assert [s["status"] for s in doc["steps"]] == ["skipped"] * 6
    assert all("left of GPU_CHECK_TOTAL_S=30" in s["note"] for s in doc["steps"])
