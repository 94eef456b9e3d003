"""The benchmark tools: FLOP and memory accounting against hand-computed cases, the
``bench`` / ``memory`` commands end to end on the CPU (JSON, CSV, PNG), and skips with
reasons instead of crashes. No timing is asserted anywhere."""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import subprocess
import sys

import pytest
import torch

from attnkern import dispatch
from attnkern._semantics import band_mask
from attnkern.bench import cli, memory, plots
from attnkern.bench.cases import Case, case_from_row
from attnkern.bench.flops import attended, attention_flops
from attnkern.bench.subjects import Subject, all_subjects, band_mask_mod
from attnkern.bench.sweep import run_sweep
from attnkern.bench.timing import MAX_INPUT_SETS, TimingSettings, cache_bytes, input_set_bytes, input_set_count

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1 << 20
FAST = TimingSettings(budget_s=0.02, min_reps=3, max_reps=5, warmup_s=0.0)


# ---------------------------------------------------------------------------------------
# FLOP accounting: every expected value below is counted by hand


def test_flops_dense_counts_every_pair():
    # 2 flops per multiply-add, L*S pairs, (E + Ev) multiply-adds per pair, per (batch, head)
    assert attention_flops(2, 3, 5, 7, 4) == 2 * 2 * 3 * 5 * 7 * (4 + 4)
    assert attention_flops(1, 1, 4, 4, 4, head_dim_v=8) == 2 * 16 * (4 + 8)


def test_flops_causal_is_half_of_dense_by_convention():
    # L = S = 4: exact causal pairs are 1+2+3+4 = 10, the convention counts 16 / 2 = 8
    assert attended(4, 4, causal=True) == 8
    assert attention_flops(1, 1, 4, 4, 2, causal=True) == 2 * 8 * (2 + 2)
    # the same band written as a window is counted exactly
    assert attended(4, 4, window=(100, 0)) == 10
    assert attended(4, 4, causal=True, window=(100, -1)) == 10


@pytest.mark.parametrize("len_q,len_k,window,causal,bottom_right,pairs", [
    # rows 0..3 of a (1, 0) window: keys {0}, {0,1}, {1,2}, {2,3}
    (4, 4, (1, 0), False, False, 7),
    # (2, 1) on 5x5: {0,1} {0,1,2} {0..3} {1..4} {2..4}
    (5, 5, (2, 1), False, False, 2 + 3 + 4 + 4 + 3),
    # L > S top-left, (0, 0): rows 0..2 see their own key, rows 3 and 4 see none
    (5, 3, (0, 0), False, False, 3),
    # bottom-right, L=3, S=5, causal (1, 0): rows sit at key positions 2, 3, 4 -> {1,2} {2,3} {3,4}
    (3, 5, (1, 0), True, True, 6),
    # window wider than the sequence on both sides: every pair
    (3, 4, (10, 10), False, False, 12),
    # right-only window (-1, 1) on 3x3: {0,1} {0,1,2} {0,1,2}
    (3, 3, (-1, 1), False, False, 8),
])
def test_flops_windows_at_sequence_edges(len_q, len_k, window, causal, bottom_right, pairs):
    assert attended(len_q, len_k, causal, window, bottom_right) == pairs
    assert attention_flops(1, 1, len_q, len_k, 3, causal=causal, window=window, bottom_right=bottom_right) == \
        2 * pairs * 6


def test_flops_windows_match_brute_force_count():
    rng = torch.Generator().manual_seed(0)
    for _ in range(40):
        lq, lk = (int(x) for x in torch.randint(1, 24, (2,), generator=rng))
        left, right = (int(x) for x in torch.randint(-1, 8, (2,), generator=rng))
        if (left, right) == (-1, -1):
            continue
        bottom = bool(torch.randint(0, 2, (1,), generator=rng))
        off = lk - lq if bottom else 0
        count = sum(1 for i in range(lq) for j in range(lk)
                    if (left < 0 or j >= i + off - left) and (right < 0 or j <= i + off + right))
        assert attended(lq, lk, False, (left, right), bottom) == count, (lq, lk, left, right, bottom)


def test_flops_gqa_counts_query_heads():
    case = Case("float32", batch=1, heads_q=8, heads_kv=2, len_q=4, len_k=4, head_dim=2)
    # 8 query heads x 16 pairs x 2 x (2 + 2): the shared K/V heads do not reduce the work
    assert case.flops() == 8 * 16 * 2 * 4


def test_flops_modes():
    # B=H=1, L=S=2, D=1: forward 2 * 4 * 2 = 16; backward 2.5x; both 3.5x
    assert attention_flops(1, 1, 2, 2, 1, mode="fwd") == 16
    assert attention_flops(1, 1, 2, 2, 1, mode="bwd") == 40
    assert attention_flops(1, 1, 2, 2, 1, mode="fwd+bwd") == 56
    with pytest.raises(ValueError, match="mode"):
        attention_flops(1, 1, 2, 2, 1, mode="backward")


# ---------------------------------------------------------------------------------------
# memory accounting


def test_allocation_peak_of_running_sum():
    assert memory.allocation_peak([4, 1, -4, 2]) == 5
    assert memory.allocation_peak([-3, 1]) == 0  # frees of memory allocated before the call
    assert memory.allocation_peak([]) == 0


def test_cpu_call_peak_of_known_allocation_pattern():
    def pattern():
        a = torch.empty(4 * MIB, dtype=torch.uint8)
        b = torch.empty(1 * MIB, dtype=torch.uint8)
        del a
        c = torch.empty(2 * MIB, dtype=torch.uint8)
        return [b, c, c[:10]]  # a view of c is not counted twice

    peak, kept = memory.call_peak(pattern, "cpu")
    assert peak == 5 * MIB  # 4, then 4 + 1, then 1, then 1 + 2
    assert kept == 3 * MIB


def test_measure_case_extra_memory_of_a_known_workspace():
    """A subject that allocates an fp32 (B, H, L, S) workspace and returns a fresh output."""
    case = Case("float32", batch=2, heads_q=3, heads_kv=3, len_q=64, len_k=32, head_dim=16, mode="fwd")

    def build(case, device):
        def fn(q, k, v):
            scores = torch.empty(case.batch, case.heads_q, case.len_q, case.len_k)
            out = torch.empty(case.batch, case.heads_q, case.len_q, case.head_dim)
            del scores
            return out
        return fn

    subject = Subject("workspace", "test", lambda d: None, lambda c, d: None, build)
    row = memory.measure_case(case, subject, "cpu", max_memory=1 << 30)
    assert row["status"] == "ok", row
    assert row["output_bytes"] == 2 * 3 * 64 * 16 * 4
    assert row["extra_bytes"] == 2 * 3 * 64 * 32 * 4


def test_fit_exponent_and_growth_label():
    lengths = [256, 512, 1024, 2048]
    assert memory.fit_exponent(lengths, [3 * n * n for n in lengths]) == pytest.approx(2.0)
    assert memory.fit_exponent(lengths, [5 * n for n in lengths]) == pytest.approx(1.0)
    assert memory.fit_exponent([256], [1.0]) is None
    assert memory.growth_label(1.04) == "O(L)"
    assert memory.growth_label(2.02) == "O(L^2)"
    assert memory.growth_label(None) == "n/a"


# ---------------------------------------------------------------------------------------
# what every subject computes


@pytest.mark.parametrize("left,right", [(3, 0), (-1, 2), (2, 5), (0, 0)])
def test_flex_mask_mod_is_the_band(left, right):
    rows = torch.arange(9).view(-1, 1)
    cols = torch.arange(13).view(1, -1)
    assert torch.equal(band_mask_mod(left, right)(0, 0, rows, cols), band_mask(9, 13, left, right, 0))


def test_every_subject_computes_the_same_band(seed):
    """--check: forward error against the float64 reference, for each subject that runs here."""
    cases = [Case("float32", 1, 4, 2, 40, 40, 16, causal=True, window=(7, 0)),
             Case("float32", 1, 2, 2, 24, 40, 16, window=(5, 3))]
    names = [n for n in ("attnkern-cpu", "attnkern-math", "sdpa-math", "sdpa-flash")
             if all_subjects()[n].unavailable("cpu") is None]
    rows = run_sweep(cases, [all_subjects()[n] for n in names], "cpu", FAST, check=True)
    assert {r["backend"] for r in rows} == set(names)
    for row in rows:
        assert row["status"] == "ok", row
        assert row["error"] < 1e-5, row


# ---------------------------------------------------------------------------------------
# the sweep never crashes


def _raising(exc):
    def build(case, device):
        def fn(q, k, v):
            raise exc
        return fn
    return build


def test_sweep_records_errors_and_unsupported_without_stopping():
    case = Case("float32", 1, 2, 2, 32, 32, 16)
    subjects = [
        Subject("broken", "raises", lambda d: None, lambda c, d: None, _raising(RuntimeError("kernel exploded"))),
        Subject("partial", "not implemented", lambda d: None, lambda c, d: None,
                _raising(NotImplementedError("no backward here"))),
        Subject("limited", "refuses", lambda d: None, lambda c, d: "head dim too small for me",
                _raising(AssertionError("must not be called"))),
        all_subjects()["sdpa-math"],
    ]
    rows = {r["backend"]: r for r in run_sweep([case], subjects, "cpu", FAST)}
    assert rows["broken"]["status"] == "error" and "kernel exploded" in rows["broken"]["reason"]
    assert rows["partial"]["status"] == "skip" and "no backward here" in rows["partial"]["reason"]
    assert rows["limited"]["status"] == "skip" and rows["limited"]["reason"] == "head dim too small for me"
    assert rows["sdpa-math"]["status"] == "ok" and rows["sdpa-math"]["time_ms"] > 0


def test_score_memory_guard_skips_instead_of_allocating():
    case = Case("float32", 64, 64, 64, 65536, 65536, 64)  # ~ 2 PiB of scores
    rows = run_sweep([case], [all_subjects()["sdpa-math"]], "cpu", FAST, max_memory=1 << 30)
    assert rows[0]["status"] == "skip" and "scores" in rows[0]["reason"]


def test_rotating_inputs_exceed_twice_the_cache():
    case = Case("float32", 1, 2, 2, 64, 64, 16)
    count = input_set_count(case, "cpu", rotate=True)
    assert count == MAX_INPUT_SETS or count * input_set_bytes(case) >= 2 * cache_bytes("cpu")
    assert input_set_count(case, "cpu", rotate=False) == 1


# ---------------------------------------------------------------------------------------
# the commands, end to end on the CPU


def png_size(path):
    """(width, height) from the PNG signature and IHDR chunk; fails on anything else."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def check_png(path):
    width, height = png_size(path)
    assert width > 100 and height > 100
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(path) as img:
        img.verify()
        assert img.size == (width, height)


needs_matplotlib = pytest.mark.skipif(plots.matplotlib_missing() is not None, reason="matplotlib not installed")
needs_cpu_backend = pytest.mark.skipif("cpu" not in dispatch.available_backends("cpu"),
                                       reason="attnkern C++ extension not built")


@needs_matplotlib
@needs_cpu_backend
def test_bench_quick_writes_json_csv_and_plots(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = cli.main(["bench", "--quick", "--seqlens", "64,128", "--causal", "yes", "--windows", "none", "16,0",
                   "--modes", "fwd,fwd+bwd", "--budget", "0.02", "--min-reps", "3", "--warmup", "0.001",
                   "--json", str(out), "--csv", str(tmp_path / "bench.csv"), "--plot", str(tmp_path / "plots"),
                   "--no-progress"])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["schema"] == "attnkern-bench/1" and doc["kind"] == "bench"
    assert doc["device"]["type"] == "cpu" and doc["peak_tflops"]["float32"] > 0
    ok = [r for r in doc["results"] if r["status"] == "ok"]
    assert {r["backend"] for r in ok} >= {"attnkern-cpu", "sdpa-flash"}
    assert len({case_from_row(r) for r in doc["results"]}) == 2 * 2 * 2  # lengths x bands x modes
    for r in ok:
        assert r["time_ms"] > 0 and r["reps"] >= 3
        assert r["tflops"] == pytest.approx(case_from_row(r).flops() / (r["time_ms"] * 1e-3) / 1e12)
        if r["backend"] == doc["baseline"]:
            assert r["speedup"] == pytest.approx(1.0)
    assert (tmp_path / "bench.csv").read_text().startswith("dtype,")
    check_png(tmp_path / "plots" / "bench-throughput.png")
    check_png(tmp_path / "plots" / "bench-speedup.png")
    shown = capsys.readouterr().out
    assert "attnkern-cpu" in shown and "vs sdpa-flash" in shown
    # the saved run can be shown and plotted again without measuring
    assert cli.main(["bench", "--from-json", str(out), "--plot", str(tmp_path / "again")]) == 0
    check_png(tmp_path / "again" / "bench-speedup.png")
    assert capsys.readouterr().out.splitlines()[0].startswith("case")
    with pytest.raises(SystemExit, match="not an attnkern-bench/1 memory file"):
        cli.main(["memory", "--from-json", str(out)])


@needs_cpu_backend
def test_bench_reports_capability_reason_for_unsupported_dtype(tmp_path):
    out = tmp_path / "bench.json"
    rc = cli.main(["bench", "--seqlens", "32", "--dtypes", "float64,float32", "--backends", "attnkern-cpu,sdpa-math",
                   "--budget", "0.01", "--min-reps", "3", "--json", str(out), "--no-progress"])
    assert rc == 0
    rows = json.loads(out.read_text())["results"]
    f64 = [r for r in rows if r["backend"] == "attnkern-cpu" and r["dtype"] == "float64"]
    expected = dispatch.CAPABILITIES["cpu"].why_not(case_from_row(f64[0]).problem("cpu"))
    assert f64[0]["status"] == "skip" and f64[0]["reason"] == expected and "float64" in expected
    assert all(r["status"] == "ok" for r in rows if r["dtype"] == "float32")


def test_bench_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--windows", "-5,0"])
    assert "--windows" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="unknown --backends"):
        cli.main(["bench", "--backends", "no-such-kernel"])
    with pytest.raises(SystemExit, match="--baseline"):
        cli.main(["bench", "--backends", "sdpa-math", "--baseline", "sdpa-flash", "--seqlens", "16"])


def test_plots_skip_with_a_message_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(plots, "matplotlib_missing", lambda: "matplotlib is not installed (test)")
    rc = cli.main(["bench", "--backends", "sdpa-math", "--seqlens", "16", "--budget", "0.01", "--min-reps", "3",
                   "--plot", str(tmp_path), "--no-progress"])
    assert rc == 0
    assert "plots: skipped: matplotlib is not installed" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


@needs_matplotlib
@needs_cpu_backend
def test_memory_quick_shows_quadratic_math_and_linear_attnkern(tmp_path):
    """Runs the module entry point in a fresh process, as the console script would."""
    out = tmp_path / "memory.json"
    proc = subprocess.run(
        [sys.executable, "-m", "attnkern.bench.cli", "memory", "--quick", "--seqlens", "128,256,512",
         "--backends", "attnkern-cpu,attnkern-math,sdpa-math", "--json", str(out), "--plot", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert proc.returncode == 0, proc.stderr
    assert "profiler_start" not in proc.stderr  # kineto's per-profile log lines are filtered
    doc = json.loads(out.read_text())
    assert doc["kind"] == "memory"
    fits = {(f["backend"], f["series"].split()[-1]): f["exponent"] for f in doc["fits"]}
    for mode in ("fwd", "fwd+bwd"):
        assert 1.8 < fits[("attnkern-math", mode)] < 2.2
        assert 1.8 < fits[("sdpa-math", mode)] < 2.2
        assert 0.8 < fits[("attnkern-cpu", mode)] < 1.2
    for r in doc["results"]:
        assert r["status"] == "ok", r
        assert r["extra_bytes"] == max(0, r["peak_bytes"] - r["output_bytes"])
        if r["mode"] == "fwd":  # the output of B*H*L*Ev floats is what a forward returns
            assert r["output_bytes"] == r["batch"] * r["heads_q"] * r["len_q"] * r["head_dim_v"] * 4
    check_png(tmp_path / "memory.png")


# ---------------------------------------------------------------------------------------
# RESULTS.md generation


def _make_results():
    spec = importlib.util.spec_from_file_location("make_results", os.path.join(ROOT, "benchmarks", "make_results.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_results_reads_every_layout(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    rows = run_sweep([Case("float32", 1, 2, 2, 16, 16, 8)], [all_subjects()["sdpa-math"]], "cpu", FAST)
    from attnkern.bench.report import document, write_json

    write_json(str(results / "cpu.json"), document("bench", "cpu", {}, rows, preset="quick", baseline="sdpa-math"))
    (results / "gpu-h100.json").write_text(json.dumps({
        "gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0", "timestamp": "2026-02-01T00:00:00Z",
        "tests": [{"test": "fwd bf16 L4096 causal", "impl": "triton", "outcome": "ok", "max_error": 0.0031,
                   "tflops_per_s": 402.5}, {"name": "bwd fp8", "status": "skip", "message": "not built"}]}))
    (results / "odd.json").write_text(json.dumps({"something": 1}))
    (results / "broken.json").write_text("{not json")
    text = _make_results().render(str(results), str(tmp_path / "RESULTS.md"))
    assert "fwd bf16 L4096 causal" in text and "402.50" in text and "3.1e-03" in text
    assert "NVIDIA H100 80GB HBM3" in text and "torch 2.11.0" in text
    assert "Unrecognised layout (top-level keys: something)" in text
    assert "Could not be read" in text
    assert "float32 B1 H2 L16 D8 dense fwd" in text
    assert "No GPU results" not in text
    # CPU sections come before GPU sections
    assert text.index("sdpa-math") < text.index("NVIDIA H100")


def test_committed_results_md_is_generated():
    assert _make_results().main(["--check"]) == 0, "run python benchmarks/make_results.py"


def test_progress_bar_draws_and_clears():
    import io

    from attnkern.bench.progress import Progress

    stream = io.StringIO()
    bar = Progress(4, enabled=True, stream=stream)
    bar.advance("first case")
    bar.advance("second case")
    text = stream.getvalue()
    assert "2/4" in text and "second case" in text and "[" in text
    bar.close()
    assert stream.getvalue().endswith("\r")
    silent = io.StringIO()
    Progress(4, stream=silent).advance("x")  # not a terminal: nothing drawn
    assert silent.getvalue() == ""
